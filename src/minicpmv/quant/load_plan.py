"""Load-time weight formats: quantized checkpoints, on-the-fly quantization and bf16 prepacking.

``checkpoint.load_model`` calls ``LoadPlan.build`` after its strict key/shape checks on the float
model. The plan swaps the affected layers of the meta model (``QuantLinear`` for quantized ones)
and returns per-key handlers that consume tensors read with plain file I/O (so the pages of
repacked tensors are never left mapped), then ``finish`` packs every layer for its kernel. The
format of a quantized checkpoint is recorded in config.json (``quantization_config``, see
``quant/linear.py``) and never inferred from file names; tensors that disagree with it raise a
``CheckpointError`` naming the group size / bit width they imply. This module does not run models.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError, InputError
from .linear import (
    PackedLinear,
    QuantLinear,
    QuantSpec,
    can_prepack,
    check_quantizable,
    packed_weight,
    quant_targets,
    quantize_weight,
    replace_module,
    route_in_projections,
    storage_shapes,
)

log = logging.getLogger(__name__)

Handler = Callable[[torch.Tensor], None]
_ST_NAMES = {"I8": torch.int8, "U8": torch.uint8}


def stored_spec(cfg: ModelConfig) -> QuantSpec | None:
    """The weight format recorded in config.json, or None for a float checkpoint."""
    return None if cfg.quantization is None else QuantSpec.from_config(cfg.quantization)


def check_request(stored: QuantSpec | None, requested: QuantSpec | None) -> None:
    """A quantized checkpoint loads as it is: asking for another format is an error."""
    if stored is not None and requested is not None and requested != stored:
        raise InputError(
            f"the checkpoint is already quantized ({stored.describe()}); load it without quantize=, "
            f"or quantize the original float checkpoint to {requested.describe()}"
        )


@dataclass
class LoadPlan:
    """Per-key handlers for ``_materialise`` and the final packing step of one load."""

    handlers: dict[str, Handler] = field(default_factory=dict)
    quantized: list[str] = field(default_factory=list)
    prepack: bool = False  # bf16 CPU layers go to the prefill GEMM (see ``finish``)

    @classmethod
    def build(
        cls, model: nn.Module, slots: dict[str, list[tuple[nn.Module, str, bool]]],
        stored: dict[str, Path], *, quantize: QuantSpec | None, prepack: bool, dtype: torch.dtype,
        device: torch.device | Callable[[str], torch.device], dtype_of: Callable[[str], torch.dtype] | None = None,
    ) -> LoadPlan:
        """Plan quantize-on-load (float checkpoint + ``quantize``) and bf16 prepacking of the
        remaining linear layers of the LLM, vision tower and resampler (``prepack``, for those
        stored bf16 on a CPU) for a float meta ``model`` whose keys checked out. ``device``: one
        device, or the device of each key; ``dtype_of``: each key's dtype (default ``dtype``)."""
        device_of = device if callable(device) else (lambda _key: device)
        key_dtype = dtype_of if dtype_of is not None else (lambda _key: dtype)
        plan = cls(prepack=prepack)
        plan._read_int4_privately(slots, device_of)
        if quantize is not None:
            plan._quantize_on_load(model, quantize, dtype, device_of)
        if prepack:
            plan._prepack(model, slots, lambda key: can_prepack(key_dtype(key), device_of(key)))
        return plan

    def _quantize_on_load(
        self, model: nn.Module, spec: QuantSpec, dtype: torch.dtype, device_of: Callable[[str], torch.device]
    ) -> None:
        self.quantized = install_layout(model, spec, dtype)
        for name in self.quantized:
            layer = model.get_submodule(name)
            self.handlers[f"{name}.weight"] = _weight_handler(layer, device_of(f"{name}.weight"))
            if layer.bias is not None:
                self.handlers[f"{name}.bias"] = _storage_handler(layer, "bias", device_of(f"{name}.bias"))

    def _read_int4_privately(
        self, slots: dict[str, list[tuple[nn.Module, str, bool]]], device_of: Callable[[str], torch.device]
    ) -> None:
        """A stored int4 layer is repacked by ``prepare()``: read its tensors without the memory map."""
        for key, holders in slots.items():
            if len(holders) == 1 and isinstance(holders[0][0], QuantLinear) and holders[0][0].spec.bits == 4:
                self.handlers[key] = _storage_handler(holders[0][0], holders[0][1], device_of(key))

    def _prepack(
        self, model: nn.Module, slots: dict[str, list[tuple[nn.Module, str, bool]]], allowed: Callable[[str], bool]
    ) -> None:
        parts = [p for p in (getattr(model, n, None) for n in ("llm", "vpm", "resampler")) if isinstance(p, nn.Module)]
        linears = {id(m) for part in parts for m in part.modules() if type(m) is nn.Linear}
        llm = getattr(model, "llm", None)
        decoding = {id(m) for m in llm.modules()} if isinstance(llm, nn.Module) else set()  # the rest never decodes
        for key, holders in slots.items():
            if key in self.handlers or not holders or not key.endswith(".weight") or not allowed(key):
                continue
            if all(id(mod) in linears and name == "weight" for mod, name, _ in holders) and len(holders) == 1:
                self.handlers[key] = _prepack_handler(holders[0][0], decodes=id(holders[0][0]) in decoding)

    def finish(self, model: nn.Module) -> None:
        """Pack every quantized layer for its kernel and wrap prepacked bf16 layers."""
        for name, m in list(model.named_modules()):
            if isinstance(m, QuantLinear):
                m.prepare()
            elif type(m) is nn.Linear and getattr(m, _PREPACKED, None) is not None:
                replace_module(model, name, PackedLinear(m, decodes=getattr(m, _PREPACKED)))
        if self.prepack:
            route_in_projections(model)


def _weight_handler(layer: QuantLinear, device: torch.device) -> Handler:
    def handle(t: torch.Tensor) -> None:
        layer.set_storage(quantize_weight(t, layer.spec), None, device=device)  # float32 math on the stored values
    return handle


def _storage_handler(layer: QuantLinear, name: str, device: torch.device) -> Handler:
    def handle(t: torch.Tensor) -> None:
        layer._buffers[name] = t.to(device=device, dtype=layer.dtype if t.is_floating_point() else t.dtype)
    return handle


# marks a linear whose weight a handler laid out for PackedLinear; its value: whether it decodes
_PREPACKED = "_minicpmv_prepacked"


def _prepack_handler(linear: nn.Linear, *, decodes: bool) -> Handler:
    def handle(t: torch.Tensor) -> None:
        w = packed_weight(t.to(torch.bfloat16), decodes=decodes)
        linear._parameters["weight"] = nn.Parameter(w, requires_grad=False)
        setattr(linear, _PREPACKED, decodes)
    return handle


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints: layout and checks
# ---------------------------------------------------------------------------------------------


def install_layout(model: nn.Module, spec: QuantSpec, dtype: torch.dtype) -> list[str]:
    """Swap the layers a quantized checkpoint stores quantized for empty (meta) ``QuantLinear``s."""
    names = quant_targets(model, spec)
    for name in names:  # every layer checked before any is replaced
        check_quantizable(name, model.get_submodule(name).in_features, spec)
    for name in names:
        old = model.get_submodule(name)
        replace_module(model, name, QuantLinear(old.in_features, old.out_features, spec,
                                                bias=old.bias is not None, dtype=dtype, device="meta"))
    return names


def check_stored_tensors(model: nn.Module, stored: dict[str, Path], spec: QuantSpec) -> None:
    """CheckpointError when a quantized layer's tensors disagree with ``quantization_config``."""
    handles: dict[Path, Any] = {}
    for name, layer in model.named_modules():
        if not isinstance(layer, QuantLinear):
            continue
        for part, (shape, dtype) in storage_shapes(spec, layer.out_features, layer.in_features).items():
            key = f"{name}.{part}"
            if key not in stored:
                raise CheckpointError(
                    f"config.json records {spec.describe()} but the checkpoint has no {key!r}"
                    + (f" (it has {name}.weight: not a quantized layer)" if f"{name}.weight" in stored else "")
                )
            f = stored[key]
            view = open_handle(handles, f).get_slice(key)
            got_shape, got_dtype = tuple(view.get_shape()), view.get_dtype()
            if dtype is not None and _ST_NAMES.get(got_dtype) != dtype:
                raise CheckpointError(
                    f"{key} is stored as {got_dtype} but config.json records {spec.name} "
                    f"({'I8' if spec.bits == 8 else 'U8'}): the checkpoint's format and its config disagree"
                )
            if got_shape != shape:
                raise CheckpointError(_shape_message(key, part, got_shape, shape, spec, layer.in_features))


def open_handle(handles: dict[Path, Any], f: Path) -> Any:
    """The open safetensors handle of ``f`` (opened, and its header parsed, once per load)."""
    if f not in handles:
        handles[f] = safe_open(str(f), framework="pt", device="cpu")
    return handles[f]


def _shape_message(key: str, part: str, got: tuple[int, ...], want: tuple[int, ...], spec: QuantSpec, k: int) -> str:
    base = f"{key} has shape {list(got)} but config.json ({spec.describe()}) implies {list(want)}"
    if part in ("scales", "zeros") and len(got) == 2 and got[1] and spec.bits == 4:
        return base + (f": the tensors were written with group size {k // got[1]}, config.json records "
                       f"group_size {spec.group_size}")
    if part in ("scales", "zeros") and spec.bits == 8 and len(got) == 2:
        return base + ": the tensors look group-wise (int4), config.json records bits 8"
    return base
