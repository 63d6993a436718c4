"""Open a checkpoint in any supported distribution format and build its model.

``open_checkpoint(path, mmproj=None)`` is a context manager giving an ``OpenCheckpoint``: the
official config.json content (``raw``), the release (``spec``), a directory with the tokenizer and
preprocessor files (``side_dir``: the checkpoint itself, or a temporary one rebuilt from GGUF
metadata, removed on exit) and ``load_model(...)``. Safetensors checkpoints (float and
``minicpmv quantize`` output) go through ``loading.load_model`` unchanged; bitsandbytes, AWQ and
GGUF are read by this package's readers and filled in with ``loading.fill_model``; then:

* int4 storage that maps exactly (AWQ, GGUF Q4_0 / Q4_K language-model linears) becomes
  ``QuantLinear`` layers run by the int4 kernels;
* every other weight is dequantized to the requested dtype (bitsandbytes nf4/fp4, GGUF Q8_0 /
  Q5_K / Q6_K ...), the remaining bf16 linears (LLM, vision, resampler) are prepacked, and ``quantize=``
  requantizes them to int8 / int4 like the float release.

The format is taken from recorded metadata (``formats/detect.py``). Nothing here runs a model.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from ..loading.checkpoint import build_on_meta, fill_model, load_model, read_config, resolve_checkpoint, weight_files
from ..loading.device_map import DeviceMap
from ..modeling.vlm import MiniCPMV
from ..quant.linear import (
    GROUP_SIZES,
    QuantLinear,
    QuantSpec,
    can_prepack,
    check_quantizable,
    native_kernels_apply,
    prepack_linears,
    quant_targets,
    replace_module,
)
from ..versions import VersionSpec, detect_version, get_version
from . import awq, bnb
from .detect import Format, detect_format
from .gguf_names import INT4_GROUP

log = logging.getLogger(__name__)

Storage = Callable[[], dict[str, torch.Tensor]]


@dataclass
class OpenCheckpoint:
    """A checkpoint opened for loading (see the module docstring)."""

    path: Path
    format: Format
    raw: dict[str, Any]
    spec: VersionSpec
    side_dir: Path
    mmproj: Path | None = None
    _gguf: Any = field(default=None, repr=False)

    def load_model(
        self, *, cfg: ModelConfig, dtype: torch.dtype, device: torch.device,
        vision_dtype: torch.dtype | None = None, quantize: QuantSpec | None = None,
        device_map: DeviceMap | None = None, max_memory: Mapping[str, int | str] | None = None,
    ) -> MiniCPMV:
        kind = self.format.kind
        if kind in ("safetensors", "minicpmv-weight-only"):
            return load_model(self.path, dtype=dtype, device=device, config=cfg, vision_dtype=vision_dtype,
                              quantize=quantize, prepack=True, device_map=device_map, max_memory=max_memory)
        if device_map is not None or max_memory is not None:
            raise InputError(f"device_map= applies to safetensors checkpoints; {self.path} is {self.format.describe()}")
        floats, int4 = self._tensors(cfg, device)
        modules = self._bnb_layers(cfg, floats, dtype, device) if quantize is None else {}
        if int4 and quantize is not None and quantize != QuantSpec(4, INT4_GROUP, quantize.lm_head):
            log.info("%d layers stay in their stored int4; the others become %s", len(int4), quantize.describe())
        model = _assemble(cfg, floats, int4, dtype=dtype, device=device, vision_dtype=vision_dtype, modules=modules)
        _finish(model, dtype, device, quantize)
        log.info("loaded %s (%s): %d layers kept quantized", self.path, self.format.describe(), len(int4))
        return model

    def _bnb_layers(
        self, cfg: ModelConfig, floats: dict[str, Callable[[], torch.Tensor]], dtype: torch.dtype,
        device: torch.device,
    ) -> dict[str, Callable[[], torch.nn.Module]]:
        """On CUDA with bitsandbytes installed, a bitsandbytes release keeps its 4-bit LLM layers and
        runs them with bitsandbytes' kernels (elsewhere they are dequantized: see bnb.py)."""
        if self.format.kind != "bitsandbytes" or device.type != "cuda" or not bnb.has_bitsandbytes():
            return {}
        targets = set(quant_targets(build_on_meta(cfg), QuantSpec(4, INT4_GROUP, True)))
        layers = bnb.bnb_layers(weight_files(self.path), dtype, device, targets)
        for name in layers:
            del floats[f"{name}.weight"]
        return layers

    def _tensors(
        self, cfg: ModelConfig, device: torch.device
    ) -> tuple[dict[str, Callable[[], torch.Tensor]], dict[str, Storage]]:
        targets = set(quant_targets(build_on_meta(cfg), QuantSpec(4, INT4_GROUP, True)))
        if self.format.kind == "bitsandbytes":
            return bnb.bnb_tensors(weight_files(self.path), bnb.check_config(self.raw["quantization_config"])), {}
        if self.format.kind == "awq":
            group = awq.check_config(self.raw["quantization_config"])
            return awq.awq_tensors(weight_files(self.path), group, targets if group in GROUP_SIZES else set())
        entries = self._gguf.tensors((cfg.text.num_attention_heads, cfg.text.num_key_value_heads))
        floats: dict[str, Callable[[], torch.Tensor]] = {}
        int4: dict[str, Storage] = {}
        keep_int8 = gguf_keeps_int8(device)
        for key, entry in entries.items():
            layer = key.removesuffix(".weight")
            kept = entry.kept_quantized(keep_int8) if layer in targets else None
            if kept is not None:
                int4[layer] = kept
            else:
                floats[key] = entry.as_stored
        return floats, int4


def gguf_keeps_int8(device: torch.device | str) -> bool:
    """Whether GGUF's Q8_0 / Q6_K matrices stay quantized on ``device``: where the native kernels
    run both (elsewhere they are dequantized)."""
    return native_kernels_apply(QuantSpec(8, 32), device) and native_kernels_apply(QuantSpec(6, 16), device)


def _assemble(
    cfg: ModelConfig, floats: dict[str, Callable[[], torch.Tensor]], int4: dict[str, Storage], *,
    dtype: torch.dtype, device: torch.device, vision_dtype: torch.dtype | None,
    modules: dict[str, Callable[[], torch.nn.Module]] | None = None,
) -> MiniCPMV:
    """The meta model with ``int4`` layers swapped for ``QuantLinear`` (group size from the storage)
    and ``modules`` for the layers they build (their weights made already), filled strictly from
    ``floats`` and the int4 storage tensors (int4 storage is made first: it stays in memory anyway)."""
    model = build_on_meta(cfg)
    tensors = dict(floats)
    prefilled = set()
    for name, build in (modules or {}).items():
        replace_module(model, name, build())
        prefilled.add(f"{name}.weight")
    for name, make in int4.items():
        if f"{name}.weight" in tensors:
            raise CheckpointError(f"{name} is stored both quantized and as a float weight")
        old = model.get_submodule(name)
        st = make()
        spec = QuantSpec.of_storage(st, old.in_features, lm_head=name.endswith("lm_head"))
        check_quantizable(name, old.in_features, spec)
        replace_module(model, name, QuantLinear(old.in_features, old.out_features, spec, bias=old.bias is not None,
                                                dtype=dtype, device="meta"))
        tensors.update({f"{name}.{p}": (lambda t=t: t) for p, t in st.items()})
    fill_model(model, tensors, dtype=dtype, device=device, vision_dtype=vision_dtype, prefilled=prefilled)
    return model


def _finish(model: MiniCPMV, dtype: torch.dtype, device: torch.device, quantize: QuantSpec | None) -> None:
    """Pack int4 layers for their kernel; requantize (``quantize``) or prepack the float LLM linears,
    and prepack the bf16 vision and resampler linears."""
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.prepare()
    if quantize is not None:
        targets = [n for n in quant_targets(model, quantize) if not isinstance(model.get_submodule(n), QuantLinear)]
        for name in targets:
            check_quantizable(name, model.get_submodule(name).in_features, quantize)
        for name in targets:
            old = model.get_submodule(name)
            bias = None if old.bias is None else old.bias.detach()
            replace_module(model, name, QuantLinear.from_float(old.weight.detach(), bias, quantize, dtype=dtype,
                                                               device=device))
    if can_prepack(dtype, device):
        prepack_linears(model.llm)
    for part in (model.vpm, model.resampler):  # each layer checked: the vision dtype may differ
        prepack_linears(part, decodes=False)
    model.eval()


def gguf_reader() -> tuple[Any, Any]:
    """``GGUFCheckpoint`` and ``find_pair`` (CheckpointError naming the extra when ``gguf`` is missing)."""
    try:
        from .gguf_read import GGUFCheckpoint, find_pair
    except ImportError as e:
        raise CheckpointError(f"reading GGUF files needs the gguf package: pip install 'minicpmv[gguf]' ({e})") from e
    return GGUFCheckpoint, find_pair


@contextlib.contextmanager
def open_checkpoint(
    path_or_repo_id: str | Path, *, mmproj: str | Path | None = None, revision: str | None = None,
    version: str | None = None,
) -> Iterator[OpenCheckpoint]:
    """Open a checkpoint directory, hub repo id, GGUF file (+ ``mmproj``) or GGUF directory."""
    p = Path(path_or_repo_id).expanduser()
    if p.is_file() or mmproj is not None:
        fmt = detect_format(p)
        if fmt.kind != "gguf":
            raise InputError(f"mmproj= applies to GGUF models; {p} is {fmt.describe()}")
    else:
        p = resolve_checkpoint(str(path_or_repo_id), revision=revision)
        fmt = detect_format(p)
    if fmt.kind != "gguf":
        raw, spec = read_config(p, version=version)
        yield OpenCheckpoint(p, fmt, raw, spec, side_dir=p)
        return
    GGUFCheckpoint, find_pair = gguf_reader()
    pair = find_pair(p, Path(mmproj).expanduser() if mmproj is not None else None)
    ckpt = GGUFCheckpoint(pair)
    raw = ckpt.config()
    spec = get_version(version) if version is not None else detect_version(raw)
    if spec.name != ckpt.version:
        raise CheckpointError(f"{pair.mmproj} is a MiniCPM-V {ckpt.version} mmproj; the model config says {spec.name}")
    with tempfile.TemporaryDirectory(prefix="minicpmv-gguf-") as tmp:
        ckpt.write_side_files(Path(tmp))
        yield OpenCheckpoint(pair.model, Format("gguf", f"{ckpt.arch} + mmproj"), raw, spec, side_dir=Path(tmp),
                             mmproj=pair.mmproj, _gguf=ckpt)
