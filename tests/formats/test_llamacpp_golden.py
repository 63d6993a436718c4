"""GGUF files made by llama.cpp's own converters, and what llama.cpp computed (recorded by
tests/data/formats/make_gguf_llamacpp.py and bench/check_llamacpp.py; llama.cpp is not needed here)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import minicpmv
from minicpmv.formats.gguf_read import GGUFCheckpoint, find_pair
from minicpmv.formats.gguf_write import export_gguf
from minicpmv.processing.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
FORMATS = DATA / "formats"
CONF = DATA / "conformance"


def _logits(chat: minicpmv.api.ChatModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        emb = chat.model.llm.embed_prompt_ids(ids[None])  # [1, T, H]
        return chat.model(emb, torch.arange(ids.numel())[None], torch.ones_like(ids)[None], last_only=False)[0]


def _image_embeddings(chat: minicpmv.api.ChatModel, image: torch.Tensor) -> torch.Tensor:
    """Our resampler output [64, H] for one 448x448 image (one slice: no slicing at this size)."""
    inputs = chat.processor([[{"role": "user", "content": [Image.fromarray(image.numpy()), "x"]}]])
    with torch.no_grad():
        return chat.runner.encode_features(inputs)[0].reshape(-1, chat.config.text.hidden_size)


def _state(chat: minicpmv.api.ChatModel, prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in chat.model.state_dict().items() if k.startswith(prefix)}


def test_llama_cpp_pair_loads_with_llama_cpp_logits() -> None:
    golden = load_file(str(FORMATS / "llamacpp-2.6.golden.safetensors"))
    chat = minicpmv.load(FORMATS / "llamacpp-2.6", dtype="float32")
    assert chat.version.name == "2.6"
    got = _logits(chat, golden["input_ids"])
    torch.testing.assert_close(got, golden["logits"], rtol=0, atol=5e-5)
    # llama.cpp's own preprocessing, and F16 weights with activations rounded to F16 (ggml's F16
    # matmul), vs ours in float32 on the same file: within 1e-3 of the embeddings' range (3.7)
    torch.testing.assert_close(_image_embeddings(chat, golden["image_448"]), golden["image_embeddings"],
                               rtol=0, atol=3e-3)
    src = minicpmv.load(CONF / "2.6" / "_checkpoint", dtype="float32")
    a, b = _state(src, "llm."), _state(chat, "llm.")
    assert [k for k in a if not torch.equal(a[k], b[k])] == []  # F32 language model: exact
    a, b = _state(src, "vpm."), _state(chat, "vpm.")
    for k in a:  # the converter writes the vision tower in F16
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=6e-8)


@pytest.mark.parametrize("version", ["2.5", "2.6", "4.5"])
def test_llama_cpp_language_models_load_with_their_metadata(version: str, tmp_path: Path) -> None:
    """convert_hf_to_gguf.py's files (llama: rotary rows permuted; qwen3: q/k norms; F16), paired with
    our mmproj: the weights come back, and the tokenizer rebuilt from llama.cpp's metadata gives
    the checkpoint's ids."""
    folder = tmp_path / "pair"
    export_gguf(CONF / version / "_checkpoint", tmp_path / "ours", "f32", record_source=False)
    folder.mkdir()
    (folder / "model.gguf").write_bytes((FORMATS / f"llamacpp-{version}" / "model.gguf").read_bytes())
    (folder / "mmproj.gguf").write_bytes((tmp_path / "ours" / "mmproj.gguf").read_bytes())
    chat = minicpmv.load(folder, dtype="float32")
    src = minicpmv.load(CONF / version / "_checkpoint", dtype="float32")
    a, b = _state(src, "llm."), _state(chat, "llm.")
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-3, atol=1e-7)  # F16 (F32 for 2.6 and the norms)
    ckpt = GGUFCheckpoint(find_pair(folder))
    ckpt.write_side_files(tmp_path)
    rebuilt, original = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(CONF / version / "_checkpoint")
    for meta in sorted((CONF / version).glob("*/expected/meta.json"))[:4]:
        text = json.dumps(json.loads(meta.read_text()), ensure_ascii=False)[:2000]  # mixed text, digits, tokens
        assert rebuilt.encode(text) == original.encode(text)


def test_llama_cpp_computes_our_exports_as_we_do(tmp_path: Path) -> None:
    """bench/check_llamacpp.py ran llama.cpp on our f32 exports (same bytes as exported now) and
    recorded its logits: our loader gives the same within float32 tolerance."""
    record = json.loads((FORMATS / "llamacpp-on-our-export.json").read_text())
    arrays = load_file(str(FORMATS / "llamacpp-on-our-export.safetensors"))
    assert sorted(record["files"]) == ["2.5", "2.6", "4.5", "o2.6"]
    for version, files in record["files"].items():
        out = tmp_path / version
        export_gguf(CONF / version / "_checkpoint", out, "f32")
        for name, digest in files.items():
            if name.endswith(".gguf"):
                assert hashlib.sha256((out / name).read_bytes()).hexdigest() == digest, (version, name)
        ids = arrays[f"{version}.ids"]
        got = _logits(minicpmv.load(out, dtype="float32"), ids)
        torch.testing.assert_close(got, arrays[f"{version}.logits"], rtol=0, atol=5e-5)
        assert files["llama_cpp_ids"] == ids.tolist()  # llama.cpp tokenizes the prompt as we do
        if version == "2.6":
            got = _image_embeddings(minicpmv.load(out, dtype="float32"), arrays["image_448"])
            torch.testing.assert_close(got, arrays["2.6.image_embeddings"], rtol=0, atol=1e-3)


@pytest.mark.parametrize("as_files", [False, True])
def test_a_gguf_pair_is_parsed_once_per_file(monkeypatch: pytest.MonkeyPatch, as_files: bool) -> None:
    """Telling the model from the mmproj reads both files' metadata; loading reuses those readers
    (the metadata of a real release, its tokenizer's arrays, takes seconds to parse)."""
    from minicpmv.formats import gguf_read

    parsed: list[str] = []
    real = gguf_read.GGUFReader

    def counting(path: str) -> object:
        parsed.append(Path(path).name)
        return real(path)

    monkeypatch.setattr(gguf_read, "GGUFReader", counting)
    pair_dir = FORMATS / "llamacpp-2.6"
    if as_files:
        chat = minicpmv.load(pair_dir / "model.gguf", mmproj=pair_dir / "mmproj.gguf", dtype="float32")
    else:
        chat = minicpmv.load(pair_dir, dtype="float32")
    assert chat.version.name == "2.6"
    assert sorted(parsed) == ["mmproj.gguf", "model.gguf"]
