"""Where each part of a model lives when it is split across devices (``device_map``).

A *unit* is the smallest part placed on one device: ``llm.model.embed_tokens``, every decoder layer
``llm.model.layers.N``, ``llm.model.norm``, ``llm.lm_head`` (not a unit of its own when it is tied
to the embeddings: it shares their tensor, hence their device), and each other child of the model
as a whole (``vpm``, ``resampler``, MiniCPM-o's ``apm``, ``audio_projection_layer``, ``tts``).

Two ways to say where they go (``load(device_map=...)``):

* a mapping from names to devices, e.g. ``{"": "cuda:0", "llm.model.layers.20": "cpu", ...}``: each
  unit takes the device of the longest entry that is the unit's name or a dotted prefix of it
  (``""`` covers everything, ``"llm.model.layers"`` all layers). An entry naming part of a unit,
  or nothing at all, and a unit left without a device are errors;
* ``"auto"``: units in model order (embeddings, vision and audio parts, layers, norm, head) fill
  the CUDA devices in turn, then the CPU, each device up to its budget: ``max_memory`` (bytes or
  strings like "20GiB" per device) or 90% of its free memory.

``Placement.device_of(key)`` gives each checkpoint key its device; the model runs split by moving
activations between units (``modeling/llm/decoder.py``, ``modeling/vlm.py``); KV cache rows live on
their layer's device. Layers placed on the CPU compute there (weights are not streamed to a GPU).
This module reads no weights and runs nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InputError

DeviceMap = str | Mapping[str, Any]
AUTO_FRACTION = 0.9  # of a device's free memory that "auto" fills with weights
_SIZE = re.compile(r"^\s*([0-9.]+)\s*([KMGT]?i?B)?\s*$", re.IGNORECASE)
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclass(frozen=True)
class Placement:
    """The device of every unit (model order); ``default`` for keys of no unit (a whole model
    on one device has no units at all)."""

    units: dict[str, torch.device]
    default: torch.device | None = None

    def device_of(self, key: str) -> torch.device:
        """The device of a checkpoint key (a parameter or buffer name)."""
        unit = unit_of(key, self.units)
        if unit is not None:
            return self.units[unit]
        if self.default is None:
            raise InputError(f"{key!r} belongs to no unit of the device map")
        return self.default

    @property
    def devices(self) -> list[torch.device]:
        """The distinct devices used, in model order."""
        out: list[torch.device] = []
        for d in [*self.units.values(), *([self.default] if self.default is not None else [])]:
            if d not in out:
                out.append(d)
        return out


def unit_of(key: str, units: Mapping[str, Any]) -> str | None:
    """The unit whose name is ``key`` or a dotted prefix of it (the longest)."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        if name in units:
            return name
    return None


def model_units(model: nn.Module) -> list[str]:
    """The units of ``model`` in model order (see the module docstring)."""
    llm = model.get_submodule("llm")
    units = ["llm.model.embed_tokens"]
    units += [name for name, child in model.named_children() if name != "llm" and _has_tensors(child)]
    units += [f"llm.model.layers.{i}" for i in range(len(llm.model.layers))]
    units.append("llm.model.norm")
    if not _tied_head(llm):
        units.append("llm.lm_head")
    return units


def _has_tensors(module: nn.Module) -> bool:
    return any(True for _ in module.parameters()) or any(True for _ in module.buffers())


def _tied_head(llm: nn.Module) -> bool:
    head = getattr(llm.lm_head, "weight", None)
    return head is not None and head is llm.model.embed_tokens.weight


def unit_bytes(model: nn.Module, units: list[str], dtype_of: Callable[[str], torch.dtype]) -> dict[str, int]:
    """Bytes each unit will hold once loaded: floating tensors in ``dtype_of(key)``, others as they
    are (quantized storage); a tensor shared by two names is counted once."""
    sizes = dict.fromkeys(units, 0)
    seen: set[int] = set()
    for key, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if id(t) in seen:
            continue
        seen.add(id(t))
        unit = unit_of(key, sizes)
        if unit is None:
            continue
        size = torch.empty((), dtype=dtype_of(key)).element_size() if t.is_floating_point() else t.element_size()
        sizes[unit] += t.numel() * size
    return sizes


def resolve_device_map(
    model: nn.Module, device_map: DeviceMap, *, dtype_of: Callable[[str], torch.dtype],
    max_memory: Mapping[str, int | str] | None = None,
) -> Placement:
    """The placement of ``model``'s units for a ``device_map`` (mapping or "auto")."""
    units = model_units(model)
    if isinstance(device_map, str):
        if device_map != "auto":
            raise InputError(f"device_map must be 'auto' or a mapping of module names to devices, got {device_map!r}")
        budgets = device_budgets(max_memory)
        return Placement(plan_auto([(u, s) for u, s in unit_bytes(model, units, dtype_of).items()], budgets))
    if max_memory is not None:
        raise InputError("max_memory applies only to device_map='auto'")
    return Placement(explicit_map(units, device_map))


def explicit_map(units: list[str], device_map: Mapping[str, Any]) -> dict[str, torch.device]:
    """Each unit's device from a name -> device mapping (see the module docstring)."""
    if not isinstance(device_map, Mapping) or not device_map:
        raise InputError("device_map must be 'auto' or a non-empty mapping of module names to devices")
    entries = {str(k): parse_device(v) for k, v in device_map.items()}
    for name in entries:
        inside = [u for u in units if name.startswith(u + ".")]
        if inside:
            raise InputError(f"device_map entry {name!r} names part of {inside[0]!r}, which must stay on one "
                             "device (units: embeddings, each layer, norm, lm_head, vpm, resampler, ...)")
        if name and not any(u == name or u.startswith(name + ".") for u in units):
            raise InputError(f"device_map entry {name!r} names no part of the model")
    out, missing = {}, []
    for u in units:
        match = unit_of(u, entries)
        if match is None and "" in entries:
            match = ""
        if match is None:
            missing.append(u)
        else:
            out[u] = entries[match]
    if missing:
        raise InputError(f"device_map gives no device to {len(missing)} part(s): {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else "") + " (add them, or a default entry '')")
    return out


def plan_auto(sizes: list[tuple[str, int]], budgets: list[tuple[torch.device, int]]) -> dict[str, torch.device]:
    """Fill the devices in order with the units in order, each device up to its budget."""
    if not budgets:
        raise InputError("device_map='auto' found no device to place the model on")
    out: dict[str, torch.device] = {}
    i, used = 0, 0
    for unit, size in sizes:
        while used + size > budgets[i][1] and i + 1 < len(budgets):
            i, used = i + 1, 0
        if used + size > budgets[i][1]:
            need = sum(s for _, s in sizes)
            have = sum(b for _, b in budgets)
            raise InputError(f"the model needs {need / 2**30:.1f} GiB but the devices offer "
                             f"{have / 2**30:.1f} GiB ({_describe(budgets)}); raise max_memory or use fewer weights")
        out[unit] = budgets[i][0]
        used += size
    return out


def _describe(budgets: list[tuple[torch.device, int]]) -> str:
    return ", ".join(f"{d}: {b / 2**30:.1f} GiB" for d, b in budgets)


def device_budgets(max_memory: Mapping[str, int | str] | None = None) -> list[tuple[torch.device, int]]:
    """Devices for "auto" in order (CUDA devices, then the CPU) with the bytes each may take."""
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise InputError("max_memory must map devices to sizes, e.g. {'cuda:0': '20GiB', 'cpu': '64GiB'}")
        out = [(parse_device(d), parse_size(v)) for d, v in max_memory.items()]
        return sorted(out, key=lambda e: (e[0].type != "cuda", e[0].index or 0))
    out = []
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, _ = torch.cuda.mem_get_info(i)
            out.append((torch.device("cuda", i), int(free * AUTO_FRACTION)))
    out.append((torch.device("cpu"), int(_available_ram() * AUTO_FRACTION)))
    return out


def _available_ram() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 2**40  # unknown: do not limit the CPU


def parse_device(value: Any) -> torch.device:
    """A device from 'cuda:1', 'cpu', an int (CUDA index) or a torch.device."""
    try:
        return torch.device("cuda", value) if isinstance(value, int) else torch.device(value)
    except (RuntimeError, TypeError) as e:
        raise InputError(f"{value!r} is not a device (use e.g. 'cuda:0', 'cpu' or a CUDA index)") from e


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string like '20GiB', '512MB', '1.5 GB'."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    m = _SIZE.match(str(value))
    if not m:
        raise InputError(f"{value!r} is not a memory size (use bytes or e.g. '20GiB', '512MB')")
    return int(float(m.group(1)) * _UNITS[(m.group(2) or "B").upper()])
