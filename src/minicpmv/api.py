"""Public entry points: ``load()`` a checkpoint into a ``ChatModel``.

``load`` resolves a local directory or a Hugging Face repo id, reads the version from
config.json, loads the safetensors weights strictly in the requested dtype/device and builds the
processor from the checkpoint's tokenizer and preprocessor files. It never imports or executes
code found in the checkpoint. Chatting itself lives in ``engine/chat.py`` and
``engine/session.py``.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import torch

from .config import ModelConfig, ProcessorConfig
from .engine.chat import ChatModel
from .engine.generate import DecodeMode
from .errors import ConfigError, InputError
from .formats.load import open_checkpoint
from .loading.device_map import DeviceMap
from .processing.processor import Processor
from .quant.linear import QuantSpec

log = logging.getLogger(__name__)

_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """'bf16' / 'float32' / torch.float16 ... → torch.dtype (InputError for anything else)."""
    if isinstance(dtype, torch.dtype):
        if dtype not in _DTYPES.values():
            raise InputError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
        return dtype
    key = str(dtype).lower().removeprefix("torch.")
    if key not in _DTYPES:
        raise InputError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[key]


def check_consistency(cfg: ModelConfig, pcfg: ProcessorConfig) -> None:
    """The official chat() asserts these config/preprocessor pairs agree (spec §8.2 step 7)."""
    pairs = {
        "query_num / image_feature_size": (cfg.query_num, pcfg.image_feature_size),
        "patch_size": (cfg.slice.patch_size, pcfg.slice.patch_size),
        "use_image_id": (cfg.use_image_id, pcfg.use_image_id),
        "slice_config.max_slice_nums / max_slice_nums": (cfg.slice.max_slice_nums, pcfg.slice.max_slice_nums),
    }
    bad = [f"{k}: config.json has {a!r}, preprocessor_config.json has {b!r}" for k, (a, b) in pairs.items() if a != b]
    if bad:
        raise ConfigError("inconsistent checkpoint configuration: " + "; ".join(bad))


def load(
    path_or_repo_id: str | Path,
    *,
    dtype: str | torch.dtype = "bfloat16",
    device: str | torch.device = "cpu",
    version: str | None = None,
    revision: str | None = None,
    vision_dtype: str | torch.dtype | None = None,
    quantize: str | None = None,
    group_size: int | None = None,
    compile: bool | str = False,
    device_map: DeviceMap | None = None,
    max_memory: dict[str, int | str] | None = None,
    mmproj: str | Path | None = None,
) -> ChatModel:
    """Load an official MiniCPM-V checkpoint (local directory or hub repo id).

    ``version`` forces a version from the table instead of the config's ``version`` field.
    ``vision_dtype`` runs the vision tower and resampler in another dtype than the LLM (e.g.
    ``dtype="bfloat16", vision_dtype="float32"``); default: ``dtype``.
    ``quantize="int8"`` / ``"int4"`` quantizes the LLM linear layers (weight-only; int4 in groups of
    ``group_size`` input columns, default 128) while loading; a checkpoint written by
    ``minicpmv quantize`` loads quantized without it. bf16 linear layers on CPU (LLM, vision,
    resampler) are prepacked for the native kernels or oneDNN (faster decoding and prefill; not for
    training; `.to()` / `.float()` afterwards unpack them).
    ``compile=True`` decodes with static shapes through ``torch.compile`` (CUDA graphs on CUDA,
    "reduce-overhead"; "default" elsewhere); a string picks the ``torch.compile`` mode and
    "static" the static-shape step without compiling (``engine/generate.DecodeMode``). Off by default.
    ``device_map`` splits the model across devices instead of ``device``: "auto" (GPUs in order,
    then the CPU, by free memory or ``max_memory`` such as ``{"cuda:0": "20GiB", "cpu": "64GiB"}``)
    or a mapping of module names to devices (``loading/device_map.py``).
    The official int4 (bitsandbytes), AWQ and GGUF releases load too (``formats/``): a GGUF
    language model takes its vision part from ``mmproj=`` (or pass a directory holding both).
    """
    torch_dtype = parse_dtype(dtype)
    vdtype = parse_dtype(vision_dtype) if vision_dtype is not None else None
    qspec = QuantSpec.parse(quantize, group_size) if quantize is not None else None
    if qspec is None and group_size is not None:
        raise InputError("group_size applies only with quantize='int4'")
    with open_checkpoint(path_or_repo_id, mmproj=mmproj, revision=revision, version=version) as ckpt:
        raw, spec, path = ckpt.raw, ckpt.spec, ckpt.path
        cfg = ModelConfig.from_hf_dict(raw, **spec.config_kwargs())
        model = ckpt.load_model(cfg=cfg, dtype=torch_dtype, device=torch.device(device), vision_dtype=vdtype,
                                quantize=qspec, device_map=device_map,
                                max_memory=max_memory)
        model.eval()
        processor = Processor.from_dir(ckpt.side_dir, spec, default_cfg=ProcessorConfig.from_model_config(cfg))
    if cfg.audio is not None:  # audio placeholders follow config.json's audio_chunk_length
        processor.audio_cfg = dataclasses.replace(processor.audio_cfg, chunk_seconds=cfg.audio.chunk_length)
    check_consistency(cfg, processor.cfg)
    log.info("loaded MiniCPM-V %s from %s (%s, %s)", spec.name, path, torch_dtype, device)
    mode = DecodeMode.from_compile(compile, model.device)
    return ChatModel(model, processor, spec, cfg, path=str(path), decode_mode=mode)
