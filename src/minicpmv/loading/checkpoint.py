"""Find, check and load MiniCPM-V checkpoints (safetensors only, single file or sharded).

``resolve_checkpoint`` maps a local directory or a Hugging Face repo id to a local directory
(downloading only data files: json, safetensors, txt, tokenizer model, jinja, MiniCPM-o's
vocoder state dict; never ``.py`` or pickle ``.bin``). ``load_model`` builds the model on the
meta device (nothing is allocated, no float32 staging) and materialises every parameter
straight from the safetensors files in the requested dtype and device, so no second full copy
of the weights is ever made: a tensor stored
in the target dtype (bf16 checkpoint loaded as bf16, on CPU) *is* a view of the memory-mapped
file (zero copy; pages are read on first use and shared with the page cache), and a tensor that
needs a conversion or another device is read with plain file I/O into a temporary of its own
size and converted, so no mapped pages of converted tensors stay resident. On another device
(a GPU) each tensor is copied from the mapped file straight to the device (``safe_open(device=)``,
no staging copy in host memory) and converted there, several tensors at a time. ``device_map``
splits the model across devices (``loading/device_map.py``). ``vision_dtype``
materialises the vision tower and resampler in another dtype than the LLM. Loading is strict:
every checkpoint tensor must fill a parameter, every parameter must be filled and shapes must
agree, otherwise a typed error lists the offending keys. Python files shipped with a checkpoint
are never imported. This module does not tokenize, build processors or run the model.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..config import ModelConfig, read_json_object
from ..errors import (
    CheckpointError,
    ConfigError,
    InputError,
    MissingWeightsError,
    OfflineError,
    OutputError,
    ShapeMismatchError,
    UnexpectedWeightsError,
    UnsafeCheckpointError,
)
from ..modeling.vlm import MiniCPMV
from ..quant.linear import QuantSpec
from ..quant.load_plan import LoadPlan, check_request, check_stored_tensors, install_layout, stored_spec
from ..versions import VersionSpec, detect_version, get_version
from .device_map import DeviceMap, Placement, resolve_device_map

log = logging.getLogger(__name__)

# MiniCPM-o speech output also needs assets/Vocos.pt (a tensor state dict, read with
# weights_only=True by loading/speech.py) and assets/chattts_tokenizer/ (json + txt)
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "assets/Vocos.pt"]
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# what copy_side_files never copies: weights in any format, their indexes, and code
_NOT_SIDE_FILES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".pkl", ".safetensors.index.json",
                   ".bin.index.json", ".py")
# files that describe one set of weights (the bundled demo model's card): never carried to a copy
_WEIGHT_CARDS = ("DEMO_CARD.json",)
_UNSAFE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
DEVICE_READ_THREADS = 4  # tensors read and copied to a GPU at once
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_MAX_LISTED = 20
VISION_PREFIXES = ("vpm.", "resampler.")  # what ``vision_dtype`` applies to
DEMO_NAME = "minicpmv:demo"  # the bundled demo model (neither a path nor a repo id)
CONFIG_PATTERNS = ["config.json", "*.safetensors.index.json", "generation_config.json"]


# ---------------------------------------------------------------------------------------------
# Locating checkpoints and configs
# ---------------------------------------------------------------------------------------------


def resolve_checkpoint(path_or_repo_id: str | Path, *, revision: str | None = None,
                       config_only: bool = False) -> Path:
    """A local checkpoint directory for a directory path, a Hugging Face repo id (downloaded, or
    read from the local cache when offline) or ``minicpmv:demo`` (the bundled demo model).
    ``config_only`` downloads just the config files of a repo (what ``inspect`` needs)."""
    if str(path_or_repo_id) == DEMO_NAME:
        from ..demo_model import path as demo_path

        return demo_path()
    p = Path(path_or_repo_id).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise CheckpointError(f"{p} is a file; pass the checkpoint directory that contains it")
    text = str(path_or_repo_id)
    if not _REPO_ID.match(text) or text.startswith((".", "~")) or "//" in text:
        raise CheckpointError(f"{text!r} is neither an existing directory nor a Hugging Face repo id")
    return _download(text, revision, CONFIG_PATTERNS if config_only else ALLOW_PATTERNS)


def _download(repo_id: str, revision: str | None, patterns: list[str]) -> Path:
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as e:  # pragma: no cover - declared dependency
        raise CheckpointError(f"{repo_id!r} is not a local directory and huggingface_hub is missing") from e
    try:
        local = snapshot_download(repo_id, revision=revision, allow_patterns=patterns)
    except LocalEntryNotFoundError as e:
        raise OfflineError(
            f"cannot download {repo_id!r}: the Hugging Face Hub is unreachable or offline mode is on "
            "(HF_HUB_OFFLINE) and the repo is not in the local cache; connect, or pass a local "
            "checkpoint directory"
        ) from e
    except GatedRepoError as e:
        raise CheckpointError(f"{repo_id!r} is gated: accept its licence on the Hub and log in") from e
    except RevisionNotFoundError as e:
        raise CheckpointError(f"revision {revision!r} of {repo_id!r} does not exist") from e
    except RepositoryNotFoundError as e:
        raise CheckpointError(f"Hugging Face repo {repo_id!r} not found (or private)") from e
    except (OSError, ValueError) as e:
        raise OfflineError(f"cannot download {repo_id!r}: {e}") from e
    log.info("checkpoint %s resolved to %s", repo_id, local)
    return Path(local)


def copy_side_files(src: Path, dst: Path, *, skip: Iterable[str] = ()) -> list[str]:
    """Copy the files of checkpoint directory ``src`` that a new checkpoint written from it keeps
    (tokenizer, preprocessor and generation configs, ...) into ``dst``: everything but weights,
    weight indexes, code (``*.py``: never carried over), the demo model's ``DEMO_CARD.json`` (its
    figures describe other weights) and the names in ``skip``. Returns the names."""
    skipped = {*skip, *_WEIGHT_CARDS}
    names = [f.name for f in sorted(src.iterdir())
             if f.is_file() and not f.name.endswith(_NOT_SIDE_FILES) and f.name not in skipped]
    for name in names:  # contents only: the copy gets the mode a new file gets (as `cp` does)
        shutil.copyfile(src / name, dst / name)
        os.chmod(dst / name, new_file_mode())
    return names


@contextlib.contextmanager
def new_output_folder(out: Path) -> Iterator[Path]:
    """A temporary sibling folder to write a new checkpoint into, renamed to ``out`` when the block
    ends normally and removed when it fails (a full disk leaves nothing half written). ``out`` must
    not exist or be empty: nothing is overwritten. An ``OSError`` inside becomes ``OutputError``."""
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise OutputError(f"the output {out} exists and is not empty; nothing is overwritten: choose a new folder")
    tmp = out.with_name(f".{out.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        yield tmp
        if out.exists():
            out.rmdir()
        tmp.rename(out)
    except OSError as e:
        raise OutputError(f"writing {out} failed: {e.strerror or e}"
                          + (f" ({e.filename})" if e.filename else "")) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def new_file_mode() -> int:
    """The mode a newly created file gets under this process's umask (0o666 minus the mask)."""
    try:  # Linux: read the mask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, *,
                     metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with the file mode its neighbours get from the umask
    (save_file creates its files 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, new_file_mode())


def read_config(path: str | Path, *, version: str | None = None) -> tuple[dict[str, Any], VersionSpec]:
    """The raw config.json of a checkpoint directory and the release it belongs to (from its
    ``version`` field, or forced with ``version=``, e.g. for a config that lacks the field)."""
    raw = read_json_object(Path(path) / "config.json")
    if raw is None:
        raise ConfigError(f"no config.json in {Path(path)}")
    return raw, (get_version(version) if version is not None else detect_version(raw))


def model_config(path: str | Path, *, version: str | None = None) -> ModelConfig:
    """The typed ModelConfig of a checkpoint directory (version-dependent parsing)."""
    raw, spec = read_config(path, version=version)
    return ModelConfig.from_hf_dict(raw, **spec.config_kwargs())


# ---------------------------------------------------------------------------------------------
# Meta-device models
# ---------------------------------------------------------------------------------------------


def build_on_meta(cfg: ModelConfig) -> MiniCPMV:
    """The model with every parameter on the meta device (no memory allocated)."""
    with torch.device("meta"):
        return MiniCPMV(cfg)


def count_parameters(cfg: ModelConfig | MiniCPMV) -> dict[str, int]:
    """Parameter counts per component (llm, vpm, resampler, audio parts) and total, shared weights
    once, of a config (built on the meta device) or of a model already built."""
    model = cfg if isinstance(cfg, MiniCPMV) else build_on_meta(cfg)
    out = {  # llm, vpm, resampler (+ apm, audio_projection_layer, tts)
        name: n for name, child in model.named_children()
        if (n := sum(p.numel() for p in child.parameters())) or name in ("llm", "vpm", "resampler")
    }
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (checkpoint files can be many GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Weight files
# ---------------------------------------------------------------------------------------------


def weight_files(path: Path) -> dict[str, Path]:
    """Map every tensor key to the safetensors file that holds it (index, single file, or all
    ``*.safetensors`` of the directory). Raises for pickle-only or weightless directories."""
    index = path / INDEX_FILE
    if index.is_file():
        return _from_index(index)
    single = path / SINGLE_FILE
    files = [single] if single.is_file() else sorted(path.glob("*.safetensors"))
    if not files:
        unsafe = sorted(f.name for f in path.iterdir() if f.suffix in _UNSAFE_SUFFIXES)
        if unsafe:
            raise UnsafeCheckpointError(
                f"{path} holds only pickle weights ({', '.join(unsafe[:5])}); minicpmv loads "
                "safetensors only, because unpickling can run arbitrary code. Convert the "
                "checkpoint to safetensors (e.g. with safetensors.torch.save_file) first"
            )
        raise CheckpointError(f"no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file in {path}")
    keys: dict[str, Path] = {}
    for f in files:
        for k in _file_keys(f):
            if k in keys:
                raise CheckpointError(f"tensor {k!r} is stored in both {keys[k].name} and {f.name}")
            keys[k] = f
    return keys


def _from_index(index: Path) -> dict[str, Path]:
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
        weight_map = data["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError("weight_map is not an object")
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index} is not a valid safetensors index: {e}") from e
    shards = {name: _shard_path(index, name) for name in set(weight_map.values())}
    missing = sorted(name for name, f in shards.items() if not f.is_file())
    if missing:
        raise CheckpointError(f"shard file(s) listed in {index.name} are missing: {', '.join(missing)}")
    keys: dict[str, Path] = {}
    for name, f in sorted(shards.items()):
        stored = set(_file_keys(f))
        listed = {k for k, v in weight_map.items() if v == name}
        absent = sorted(listed - stored)
        if absent:
            raise CheckpointError(
                f"{index.name} lists {len(absent)} tensor(s) in {name} that the file lacks: "
                f"{_short(absent)}"
            )
        keys.update({k: f for k in listed})
    return keys


def _shard_path(index: Path, name: Any) -> Path:
    """The file an index entry names, which must lie inside the index's folder: a relative path
    without ``..`` (checked on the name, so the hub cache's symlinked snapshot files still load)."""
    if not isinstance(name, str) or not name or "\0" in name:
        raise CheckpointError(f"{index.name} names a shard that is not a file name: {name!r}")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or PureWindowsPath(name).drive or ".." in rel.parts:
        raise CheckpointError(f"{index.name} names the shard {name!r}, outside the checkpoint folder; "
                              "an index may only list files inside its own folder")
    return index.parent / rel


def _open(f: Path) -> Any:
    try:
        return safe_open(str(f), framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read safetensors file {f}: {e} (truncated or corrupted?)") from e


def _file_keys(f: Path) -> list[str]:
    return list(_open(f).keys())


def _short(keys: Iterable[str]) -> str:
    keys = list(keys)
    head = ", ".join(keys[:_MAX_LISTED])
    return head + (f", ... ({len(keys) - _MAX_LISTED} more)" if len(keys) > _MAX_LISTED else "")


# ---------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------


def _param_slots(model: nn.Module) -> dict[str, list[tuple[nn.Module, str, bool]]]:
    """Canonical key -> every (module, attribute, is_param) that holds it (tied weights share)."""
    slots: dict[str, list[tuple[nn.Module, str, bool]]] = {}
    seen: dict[int, str] = {}
    for mod_name, mod in model.named_modules():
        items = [(n, t, True) for n, t in mod._parameters.items() if t is not None]
        items += [
            (n, t, False) for n, t in mod._buffers.items()
            if t is not None and n not in mod._non_persistent_buffers_set
        ]
        for name, tensor, is_param in items:
            key = f"{mod_name}.{name}" if mod_name else name
            canon = seen.setdefault(id(tensor), key)
            slots.setdefault(canon, []).append((mod, name, is_param))
            if canon != key:
                slots.setdefault(key, [])  # alias: may appear in the checkpoint, not required
    return slots


def _check_keys(slots: dict[str, list], aliases: set[str], stored: dict[str, Path]) -> None:
    required = set(slots) - aliases
    missing = sorted(required - set(stored))
    unexpected = sorted(set(stored) - set(slots))
    if missing:
        extra = ""
        if unexpected:
            extra = f"; the checkpoint also has {len(unexpected)} unused tensor(s): {_short(unexpected)}"
        raise MissingWeightsError(
            f"{len(missing)} parameter(s) have no tensor in the checkpoint: {_short(missing)}{extra}"
        )
    if unexpected:
        raise UnexpectedWeightsError(
            f"the checkpoint holds {len(unexpected)} tensor(s) that no parameter uses: {_short(unexpected)}"
        )


def load_model(
    path: str | Path,
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cpu",
    config: ModelConfig | None = None,
    vision_dtype: torch.dtype | None = None,
    quantize: QuantSpec | None = None,
    prepack: bool = False,
    device_map: DeviceMap | None = None,
    max_memory: Mapping[str, int | str] | None = None,
) -> MiniCPMV:
    """Build a MiniCPMV from a local checkpoint directory (safetensors only, strict).

    Floating-point tensors get ``dtype`` (``vision_dtype``, when given, for the vision tower
    ``vpm.*`` and the ``resampler.*``); integer tensors keep their stored dtype.
    A checkpoint whose config.json records a ``quantization_config`` loads its quantized layers
    as ``QuantLinear``; ``quantize`` quantizes a float checkpoint's LLM linear layers while
    loading; ``prepack`` prepacks the remaining bf16 linear layers (LLM, vision, resampler) on a CPU.
    ``device_map`` ("auto" with optional ``max_memory``, or a mapping) replaces ``device``.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint directory {path} does not exist")
    ignored = sorted(f.name for f in path.glob("*.py"))
    if ignored:
        log.info("ignoring Python files in %s (never imported): %s", path, ", ".join(ignored))
    cfg = config if config is not None else model_config(path)
    stored = weight_files(path)
    qspec = stored_spec(cfg)
    check_request(qspec, quantize)
    _check_tts_present(cfg, stored)
    model = build_on_meta(cfg)
    if qspec is not None:
        install_layout(model, qspec, dtype)
        check_stored_tensors(model, stored, qspec)
    slots = _param_slots(model)
    aliases = {k for k, v in slots.items() if not v}
    _check_keys(slots, aliases, stored)
    _check_shapes(model, stored)

    def dtype_of(key: str) -> torch.dtype:
        return vision_dtype if vision_dtype is not None and key.startswith(VISION_PREFIXES) else dtype

    placement = _placement(model, device, device_map, max_memory, dtype_of)
    plan = LoadPlan.build(model, slots, stored, quantize=None if qspec else quantize, prepack=prepack,
                          dtype=dtype, device=placement.device_of, dtype_of=dtype_of)
    _materialise(slots, stored, dtype_of=dtype_of, device_of=placement.device_of, handlers=plan.handlers)
    plan.finish(model)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left unmaterialised after loading: {_short(leftover)}")
    model.eval()
    where = device if device_map is None else ", ".join(str(d) for d in placement.devices)
    log.info("loaded %s (%d tensors) as %s on %s", path, len(stored), dtype, where)
    return model


def _placement(
    model: MiniCPMV, device: str | torch.device, device_map: DeviceMap | None,
    max_memory: Mapping[str, int | str] | None, dtype_of: Callable[[str], torch.dtype],
) -> Placement:
    if device_map is None:
        if max_memory is not None:
            raise InputError("max_memory applies only to device_map='auto'")
        return Placement({}, default=torch.device(device))
    if torch.device(device).type != "cpu":
        raise InputError("give either device= or device_map=, not both")
    return resolve_device_map(model, device_map, dtype_of=dtype_of, max_memory=max_memory)


def fill_model(
    model: nn.Module,
    tensors: dict[str, Callable[[], torch.Tensor]],
    *,
    dtype: torch.dtype,
    device: torch.device,
    vision_dtype: torch.dtype | None = None,
    prefilled: Iterable[str] = (),
) -> None:
    """Fill a meta ``model`` strictly from tensors made on demand (the readers of other formats in
    ``formats/``): the same key, shape and leftover checks as ``load_model``; floating tensors get
    ``dtype`` (``vision_dtype`` for ``vpm.*`` / ``resampler.*``), integer ones keep theirs. One
    tensor is made at a time. ``prefilled``: keys a swapped-in layer has set already."""
    slots = _param_slots(model)
    aliases = {k for k, v in slots.items() if not v}
    done = set(prefilled)
    _check_keys(slots, aliases, dict.fromkeys([*tensors, *done], Path()))
    expected = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    for key, make in tensors.items():
        if not slots.get(key):
            continue
        t = make()
        if tuple(t.shape) != tuple(expected[key].shape):
            raise ShapeMismatchError(
                f"tensor {key!r} has shape {list(t.shape)} but the model expects {list(expected[key].shape)}"
            )
        want = vision_dtype if vision_dtype is not None and key.startswith(VISION_PREFIXES) else dtype
        _assign(slots[key], t.to(device=device, dtype=want if t.is_floating_point() else t.dtype))
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise CheckpointError(f"tensors left unmaterialised after loading: {_short(leftover)}")


_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def _check_tts_present(cfg: ModelConfig, stored: dict[str, Path]) -> None:
    """MiniCPM-o: a config that enables the speech head needs its ``tts.*`` tensors."""
    if cfg.tts is not None and not any(k.startswith("tts.") for k in stored):
        raise MissingWeightsError(
            "config.json enables 'tts' (init_tts with a tts_config) but the checkpoint has no 'tts.*' "
            "tensors; set \"init_tts\": false in config.json to load without it"
        )


def _check_shapes(model: nn.Module, stored: dict[str, Path]) -> None:
    expected = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
    by_file: dict[Path, list[str]] = {}
    for k, f in stored.items():
        by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        handle = _open(f)
        for k in keys:
            want = tuple(expected[k].shape)
            got = tuple(handle.get_slice(k).get_shape())
            if got != want:
                raise ShapeMismatchError(
                    f"tensor {k!r} in {f.name} has shape {list(got)} but the model expects {list(want)}"
                )


def _materialise(
    slots: dict[str, list[tuple[nn.Module, str, bool]]],
    stored: dict[str, Path],
    *,
    dtype_of: Callable[[str], torch.dtype],
    device_of: Callable[[str], torch.device],
    handlers: dict[str, Callable[[torch.Tensor], None]] | None = None,
) -> None:
    """Fill every slot, file by file. On the CPU: zero-copy mmap views where nothing changes, else
    a read + convert of that one tensor (peak extra memory: the largest converted tensor). On
    another device: straight from the mapped file to the device, converted there. A key with a
    handler (quantized or repacked while loading) is read privately, in its stored dtype, and
    given to the handler instead of a slot."""
    by_file: dict[Path, list[str]] = {}
    for k, f in stored.items():
        if slots.get(k):
            by_file.setdefault(f, []).append(k)
    for f, keys in by_file.items():
        handle = _open(f)
        reader: _TensorReader | None = None
        direct = [k for k in keys if (handlers or {}).get(k) is None and _goes_direct(device_of(k))]
        for k, t in _read_direct(f, direct, dtype_of, device_of):
            _assign(slots[k], t)
        for k in keys:
            if k in direct:
                continue
            stored_dtype = _ST_DTYPES.get(handle.get_slice(k).get_dtype())
            target = _target_dtype(stored_dtype, dtype_of(k))
            device = device_of(k)
            handler = (handlers or {}).get(k) if stored_dtype is not None else None
            try:
                if handler is not None:  # private read: no mapped pages of a repacked tensor stay resident
                    reader = reader or _TensorReader(f)
                    t = reader.read(k, stored_dtype)
                elif stored_dtype is None or (target == stored_dtype and device.type == "cpu"):
                    t = handle.get_tensor(k).to(device=device, dtype=target)  # a view of the mapped file
                else:
                    reader = reader or _TensorReader(f)
                    t = reader.read(k, stored_dtype).to(device=device, dtype=target)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"cannot read tensor {k!r} from {f}: {e}") from e
            if handler is not None:
                handler(t)
            else:
                _assign(slots[k], t)
        if reader is not None:
            reader.close()


def _target_dtype(stored: torch.dtype | None, wanted: torch.dtype) -> torch.dtype | None:
    """Floating tensors take the load dtype; others keep their stored dtype."""
    return wanted if stored is None or stored.is_floating_point else stored


def _goes_direct(device: torch.device) -> bool:
    """Whether tensors for ``device`` are copied straight from the mapped file to it."""
    return device.type != "cpu"


def _read_direct(
    f: Path, keys: list[str], dtype_of: Callable[[str], torch.dtype], device_of: Callable[[str], torch.device],
) -> Iterable[tuple[str, torch.Tensor]]:
    """``keys`` of file ``f`` on their devices, in order: each is copied from the mapped file to its
    device by safetensors (one handle per device) and converted there; a few tensors are in flight
    at once, so reading pages and copying overlap."""
    if not keys:
        return []
    handles: dict[torch.device, Any] = {}
    for k in keys:
        d = device_of(k)
        if d not in handles:
            try:
                handles[d] = safe_open(str(f), framework="pt", device=str(d))
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"cannot read safetensors file {f}: {e} (truncated or corrupted?)") from e

    def read(k: str) -> tuple[str, torch.Tensor]:
        handle = handles[device_of(k)]
        try:
            t = handle.get_tensor(k)
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"cannot read tensor {k!r} from {f}: {e}") from e
        target = _target_dtype(t.dtype, dtype_of(k))
        return k, t if target is None or t.dtype == target else t.to(target)

    with ThreadPoolExecutor(DEVICE_READ_THREADS, thread_name_prefix="minicpmv-load") as pool:
        return list(pool.map(read, keys))


class _TensorReader:
    """Reads single tensors of one safetensors file with plain file I/O (no memory map), so the
    source bytes of a converted tensor live only in a temporary of that tensor's size."""

    def __init__(self, f: Path) -> None:
        self.file = open(f, "rb")  # noqa: SIM115 - closed by close()
        n = int.from_bytes(self.file.read(8), "little")
        self.data_start = 8 + n
        self.header: dict[str, Any] = json.loads(self.file.read(n))

    def read(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        entry = self.header[key]
        begin, end = (int(v) for v in entry["data_offsets"])
        shape = [int(v) for v in entry["shape"]]
        if end == begin:
            return torch.empty(shape, dtype=dtype)
        buf = bytearray(end - begin)
        self.file.seek(self.data_start + begin)
        if self.file.readinto(buf) != len(buf):
            raise CheckpointError(f"tensor {key!r} is truncated in {self.file.name}")
        return torch.frombuffer(buf, dtype=dtype).view(shape)  # shares buf; freed after the cast

    def close(self) -> None:
        self.file.close()


def _assign(holders: list[tuple[nn.Module, str, bool]], t: torch.Tensor) -> None:
    """Put ``t`` into every holder; tied parameters end up sharing one Parameter object."""
    param: nn.Parameter | None = None
    for mod, name, is_param in holders:
        if is_param:
            if param is None:
                param = nn.Parameter(t, requires_grad=mod._parameters[name].requires_grad)
            mod._parameters[name] = param
        else:
            mod._buffers[name] = t
