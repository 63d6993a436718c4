"""Pixels: slices and patch tensors vs the official outputs; load_image inputs and failures."""

from __future__ import annotations

import hashlib
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from minicpmv.errors import ImageError, InputError
from minicpmv.processing.image import image_content_hash, load_image, make_slices, to_patches
from minicpmv.processing.slicing import plan_slices

DATA = Path(__file__).resolve().parents[1] / "data"
CONF_CASES = sorted(p for p in (DATA / "conformance").glob("*/*") if (p / "expected" / "slices").is_dir())
REAL_CASES = sorted(p for p in (DATA / "real-4.5" / "cases").iterdir()
                    if (p / "expected" / "meta.json").is_file())


def _json(path: Path) -> object:
    return json.loads(path.read_text(encoding="utf-8"))


def _image_files(case: Path) -> list[Path]:
    """Image files in message order (across turns and, if batched, across conversations)."""
    msgs = _json(case / "inputs" / "msgs.json")
    convs = msgs if msgs and isinstance(msgs[0], list) else [msgs]
    return [case / item["file"] for conv in convs for m in conv for item in m["content"]
            if item["type"] == "image"]


def _all_slices(case: Path, max_slice_nums: int) -> list[list[Image.Image]]:
    out = []
    for f in _image_files(case):
        img = load_image(f)
        plan = plan_slices(*img.size, max_slice_nums=max_slice_nums)
        out.append(make_slices(img, plan))
    return out


def _flat_slices(per_image: list[list[Image.Image]], slice_index: list) -> list[Image.Image]:
    flat = []
    for image_idx, slice_idx, width, height in slice_index:
        s = per_image[image_idx][slice_idx]
        assert s.size == (width, height)
        flat.append(s)
    assert len(flat) == sum(len(s) for s in per_image)
    return flat


def _conf_max_slice_nums(case: Path) -> int:
    params = _json(case / "inputs" / "params.json")
    m = params.get("chat_kwargs", {}).get("max_slice_nums")
    return 9 if m is None else int(m)


@pytest.mark.parametrize("case", CONF_CASES, ids=lambda p: f"{p.parent.name}-{p.name}")
def test_conformance_slices_and_pixel_values(case: Path) -> None:
    meta = _json(case / "expected" / "meta.json")
    per_image = _all_slices(case, _conf_max_slice_nums(case))
    flat = _flat_slices(per_image, meta["slice_index"])
    for nnn, mine in enumerate(flat):
        with Image.open(case / "expected" / "slices" / f"slice_{nnn:03d}.png") as ref:
            ref_arr = np.asarray(ref.convert("RGB"))
        assert np.array_equal(np.asarray(mine), ref_arr), f"slice {nnn} differs"

    tensors = load_file(str(case / "expected" / "tensors.safetensors"))
    stats = tensors["pixel_values_stats"]
    pvs = [to_patches(flat[src]) for src in meta["pixel_values_source_slice"]]
    assert stats.shape == (len(pvs), 4)
    for s, x in enumerate(pvs):
        assert x.dtype == np.float32 and x.shape[:2] == (3, 14)
        x64 = x.astype(np.float64).ravel()
        w = (np.arange(x64.size) % 97).astype(np.float64)
        mine = [x64.sum(), (x64 * x64).sum(), (x64 * w).sum(), float(x64.size)]
        np.testing.assert_allclose(mine, stats[s], rtol=1e-9, atol=0)
        w_px, h_px = flat[meta["pixel_values_source_slice"][s]].size
        assert list(tensors["tgt_sizes"][s]) == [h_px // 14, w_px // 14]
        assert x.shape[2] == (h_px // 14) * (w_px // 14) * 14

    start = 0
    for b, n in enumerate(meta["num_slices_per_conv"]):
        key = f"pixel_values_head_{b}"
        if n and key in tensors:
            head = tensors[key]
            assert np.array_equal(pvs[start][:, :, : head.shape[2]], head)
        start += n


@pytest.mark.parametrize("case", REAL_CASES, ids=lambda p: p.name)
def test_real45_slices_and_pixel_values(case: Path) -> None:
    meta = _json(case / "expected" / "meta.json")
    files = _image_files(case)
    if not files:
        assert meta["num_slices_per_conv"] == [0]
        return
    m = meta["effective_max_slice_nums"]
    images = [load_image(f) for f in files]
    assert [list(i.size) for i in images] == meta["image_sizes_wh"][0]
    plans = [plan_slices(*i.size, max_slice_nums=m) for i in images]
    assert [None if p.grid is None else list(p.grid) for p in plans] == meta["grids_cols_rows"][0]
    per_image = [make_slices(i, p) for i, p in zip(images, plans, strict=True)]
    flat = _flat_slices(per_image, meta["slice_index"])
    hashes = [hashlib.sha256(np.ascontiguousarray(np.asarray(s, dtype=np.uint8)).tobytes()).hexdigest()
              for s in flat]
    assert hashes == meta["slice_rgb_sha256"]
    pv_hashes = []
    for src in meta["pixel_values_source_slice"]:
        x = to_patches(flat[src])
        pv_hashes.append(hashlib.sha256(np.ascontiguousarray(x, dtype=np.float32).tobytes()).hexdigest())
    assert pv_hashes == meta["pixel_values_sha256"]


def test_to_patches_layout_matches_definition() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(28, 42, 3), dtype=np.uint8)  # H=28, W=42 → h=2, w=3
    x = to_patches(Image.fromarray(arr, "RGB"))
    assert x.shape == (3, 14, 6 * 14) and x.dtype == np.float32 and x.flags.c_contiguous
    chw = ((arr.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)).transpose(2, 0, 1)
    for k in range(6):
        r, c = divmod(k, 3)
        assert np.array_equal(x[:, :, k * 14:(k + 1) * 14], chw[:, r * 14:(r + 1) * 14, c * 14:(c + 1) * 14])
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_to_patches_custom_mean_std_and_bad_size() -> None:
    img = Image.new("RGB", (14, 14), (255, 0, 51))
    x = to_patches(img, mean=(0.0, 0.0, 0.2), std=(1.0, 1.0, 0.5))
    assert np.allclose(x[0], 1.0) and np.allclose(x[1], 0.0) and np.allclose(x[2], 0.0, atol=1e-6)
    with pytest.raises(InputError):
        to_patches(Image.new("RGB", (15, 14)))


def test_make_slices_sizes_and_order() -> None:
    arr = np.zeros((1080, 1920, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(1920, dtype=np.int64)[None, :] * 255 // 1919  # red grows left→right
    arr[:, :, 1] = np.arange(1080, dtype=np.int64)[:, None] * 255 // 1079  # green grows top→bottom
    img = Image.fromarray(arr, "RGB")
    plan = plan_slices(1920, 1080, max_slice_nums=9)
    slices = make_slices(img, plan)
    assert [s.size for s in slices] == plan.slice_sizes
    assert all(s.mode == "RGB" for s in slices)
    means = [np.asarray(s, dtype=np.float64).mean(axis=(0, 1)) for s in slices[1:]]
    cols, rows = plan.grid
    for k in range(1, cols):  # row-major: red increases along a row
        assert means[k][0] > means[k - 1][0]
    assert means[cols][1] > means[0][1]  # next row is lower → more green
    with pytest.raises(InputError):
        make_slices(img, plan_slices(100, 100, max_slice_nums=9))


def test_make_slices_converts_non_rgb() -> None:
    img = Image.new("L", (60, 40), 128)
    (s,) = make_slices(img, plan_slices(60, 40, max_slice_nums=9))
    assert s.mode == "RGB" and s.size == (546, 364)


# ---------------------------------------------------------------------------- load_image


def _png_bytes(size: tuple[int, int] = (64, 48), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(1)
    shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0], 4)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=shape, dtype=np.uint8), mode).save(buf, "PNG")
    return buf.getvalue()


def test_load_image_from_every_source_kind(tmp_path: Path) -> None:
    data = _png_bytes()
    path = tmp_path / "a.png"
    path.write_bytes(data)
    ref = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
    with open(path, "rb") as fh:
        from_file = load_image(fh)
    pil = Image.open(io.BytesIO(data))
    for img in (load_image(path), load_image(str(path)), load_image(data), load_image(bytearray(data)),
                from_file, load_image(pil)):
        assert img.mode == "RGB" and img.size == (64, 48)
        assert np.array_equal(np.asarray(img), ref)


def test_load_image_converts_rgba_and_palette() -> None:
    rgba = load_image(_png_bytes(mode="RGBA"))
    assert rgba.mode == "RGB"
    pal = Image.new("P", (10, 10))
    assert load_image(pal).mode == "RGB"
    gray = Image.new("L", (5, 7), 200)
    out = load_image(gray)
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (200, 200, 200)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="does not exist"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="not a regular file"):
        load_image(tmp_path)


def test_not_an_image(tmp_path: Path) -> None:
    with pytest.raises(ImageError, match="not a recognised image"):
        load_image(b"hello, this is text, not pixels" * 10)
    p = tmp_path / "x.jpg"
    p.write_text("nope", encoding="utf-8")
    with pytest.raises(ImageError):
        load_image(p)
    with pytest.raises(ImageError):
        load_image(b"")
    with pytest.raises(InputError):
        load_image(12345)  # type: ignore[arg-type]


def test_truncated_png(tmp_path: Path) -> None:
    data = _png_bytes((200, 150))
    cut = data[: len(data) // 2]
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(cut)
    p = tmp_path / "cut.png"
    p.write_bytes(cut)
    with pytest.raises(ImageError):
        load_image(p)


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _huge_png(width: int, height: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    idat = zlib.compress(b"\x00" * 64)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat)
            + _png_chunk(b"IEND", b""))


def test_png_header_with_huge_dimensions_is_rejected() -> None:
    with pytest.raises(ImageError, match="size limit"):
        load_image(_huge_png(100_000, 100_000))


def test_max_pixels_parameter() -> None:
    data = _png_bytes((64, 48))
    with pytest.raises(ImageError, match="size limit of 1000 pixels"):
        load_image(data, max_pixels=1000)
    with pytest.raises(ImageError, match="size limit"):
        load_image(Image.new("RGB", (100, 100)), max_pixels=9999)
    # Pillow's hard error (over 2 x MAX_IMAGE_PIXELS) is converted
    with pytest.raises(ImageError, match="size limit"):
        load_image(_huge_png(20_000, 10_000))
    # between Pillow's warning and its hard error: Pillow warns, then our own check fires
    with pytest.warns(Image.DecompressionBombWarning), pytest.raises(ImageError, match="size limit of"):
        load_image(_huge_png(15_000, 10_000), max_pixels=100_000_000)
    with warnings.catch_warnings():  # warnings as errors: Pillow's warning is converted too
        warnings.simplefilter("error")
        with pytest.raises(ImageError, match="size limit"):
            load_image(_huge_png(15_000, 10_000), max_pixels=100_000_000)
    assert load_image(data, max_pixels=64 * 48).size == (64, 48)


def test_image_content_hash() -> None:
    a = Image.new("RGB", (4, 3), (1, 2, 3))
    b = Image.new("RGB", (4, 3), (1, 2, 3))
    assert image_content_hash(a) == image_content_hash(b)
    assert len(image_content_hash(a)) == 64
    assert image_content_hash(a) != image_content_hash(Image.new("RGB", (3, 4), (1, 2, 3)))
    assert image_content_hash(a) != image_content_hash(Image.new("RGB", (4, 3), (1, 2, 4)))
    assert image_content_hash(a) != image_content_hash(a.convert("RGBA"))


def test_patch_list_is_to_patches_on_read() -> None:
    from minicpmv.processing.image import PatchList

    rng = np.random.default_rng(0)
    slices = [Image.fromarray(rng.integers(0, 256, (28, 14 * k, 3), dtype=np.uint8)) for k in (1, 2, 3)]
    pl = PatchList(slices, 14, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4))
    eager = [to_patches(s, 14, (0.5, 0.4, 0.3), (0.2, 0.3, 0.4)) for s in slices]
    assert len(pl) == 3 and pl == eager
    assert all(np.array_equal(a, b) for a, b in zip(pl, eager, strict=True))
    assert np.array_equal(pl[-1], eager[-1]) and len(pl[1:]) == 2
    assert PatchList([]) == [] and pl != eager[:2]
