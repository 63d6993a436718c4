"""Memory behaviour of loading: zero-copy memory-mapped tensors when nothing changes, converted
tensors read without keeping the file mapped, and a separate vision dtype.

The mapping checks read /proc/self/maps (Linux): a parameter "is the file" when its data lies
inside an address range that maps the checkpoint's safetensors file.
"""

from __future__ import annotations

import gc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minicpmv.loading import checkpoint as ckpt_mod
from minicpmv.loading import load_model

MAPS = Path("/proc/self/maps")
pytestmark = pytest.mark.skipif(not MAPS.exists(), reason="needs /proc/self/maps (Linux)")


def _mapped_ranges(f: Path) -> list[tuple[int, int]]:
    """Address ranges of this process that map file ``f``."""
    target = str(f.resolve())
    out = []
    for line in MAPS.read_text().splitlines():
        parts = line.split(maxsplit=5)
        if len(parts) == 6 and parts[5] == target:
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def _inside(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    return any(lo <= t.data_ptr() < hi for lo, hi in ranges)


def test_same_dtype_parameters_are_views_of_the_mapped_file(ckpt_copy) -> None:
    path = ckpt_copy("2.6")  # stored in bf16
    model = load_model(path, dtype=torch.bfloat16)
    ranges = _mapped_ranges(path / "model.safetensors")
    assert ranges, "the checkpoint file is not memory-mapped while its tensors are in use"
    tensors = [t for t in model.parameters() if t.numel()]
    outside = [t.shape for t in tensors if not _inside(t, ranges)]
    assert not outside, f"{len(outside)} parameters were copied out of the mapped file"
    stored = load_file(str(path / "model.safetensors"))
    torch.testing.assert_close(model.llm.lm_head.weight, stored["llm.lm_head.weight"], rtol=0, atol=0)


def test_converted_tensors_are_read_without_the_memory_map(ckpt_copy, monkeypatch) -> None:
    path = ckpt_copy("2.6")  # bf16 -> float32 must convert every floating tensor
    mapped_reads: list[str] = []
    real_open = ckpt_mod._open

    class Spy:
        def __init__(self, handle) -> None:
            self.handle = handle

        def __getattr__(self, name):
            return getattr(self.handle, name)

        def get_tensor(self, key):
            mapped_reads.append(key)
            return self.handle.get_tensor(key)

    monkeypatch.setattr(ckpt_mod, "_open", lambda f: Spy(real_open(f)))
    model = load_model(path, dtype=torch.float32)
    assert not mapped_reads, f"converted tensors went through the memory map: {mapped_reads[:3]}"
    gc.collect()
    assert not _mapped_ranges(path / "model.safetensors"), "the file stays mapped after a converting load"
    stored = load_file(str(path / "model.safetensors"))
    for name, p in model.named_parameters():
        assert p.dtype == torch.float32
        torch.testing.assert_close(p, stored[name].float(), rtol=0, atol=0)


def test_vision_dtype_applies_to_vision_tower_and_resampler_only(ckpt_copy) -> None:
    import minicpmv

    path = ckpt_copy("2.6")
    cm = minicpmv.load(path, dtype="bfloat16", vision_dtype="float32")
    model = cm.model
    assert {p.dtype for p in model.vpm.parameters()} == {torch.float32}
    assert {p.dtype for p in model.resampler.parameters()} == {torch.float32}
    assert {p.dtype for p in model.llm.parameters()} == {torch.bfloat16}
    # the vision half in float32 gives the same features as a float32 model (cast to bf16 after)
    ref = minicpmv.load(path, dtype="float32")
    pv = [torch.rand(3, 14, 16 * 14), torch.rand(3, 14, 12 * 14)]
    sizes = torch.tensor([[4, 4], [3, 4]])
    with torch.inference_mode():
        got = model.encode_images(pv, sizes)  # [2, Q, H]
        want = ref.model.encode_images(pv, sizes)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    image = torch.rand(64, 64, 3).mul(255).byte().numpy()
    from PIL import Image

    answer = cm.chat([{"role": "user", "content": [Image.fromarray(image), "hi"]}],
                     sampling=False, num_beams=1, max_new_tokens=3)
    assert isinstance(answer, str)
