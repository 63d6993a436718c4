"""Check that llama.cpp loads and runs the GGUF pairs ``minicpmv export --gguf`` writes, and record
what it computes (tests/data/formats/llamacpp-on-our-export.*; the tests compare our loader
against the recording). Needs an already-built llama.cpp (libllama, libmtmd) and the python
bindings of llama-cpp-python; nothing is built or downloaded here:

    LLAMA_CPP_LIB_PATH=BUILD/bin MTMD_CPP_LIB=BUILD/bin PYTHONPATH=LLAMA_CPP_PYTHON_SRC \
        python bench/check_llamacpp.py [--record]

For 2.5, 2.6, 4.5 and o2.6 it exports the tiny conformance checkpoint at every type; llama.cpp
loads each pair and decodes 4 tokens; for the f32 exports it returns the logits of a fixed prompt
(F32 KV cache) and its tokenization of that prompt, and (2.6) the image embeddings of a 448x448
image through the exported mmproj. Prints one line per file and the largest logit difference to
our loader; ``--record`` writes the recording.
"""

from __future__ import annotations

import argparse
import ctypes
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "tests" / "data" / "conformance"
OUT = ROOT / "tests" / "data" / "formats"
PROMPT = "<|im_start|>user\nWhat colour is the sky? 123 ünï<|im_end|>\n<|im_start|>assistant\n"
VERSIONS = ("2.5", "2.6", "4.5", "o2.6")
TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_k_m")


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def llama_logits(model_path: Path, ids: list[int]) -> np.ndarray:
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=256, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)
    llm.eval(ids)
    return np.asarray(llm.scores[: len(ids)], dtype=np.float32)


def llama_tokens(model_path: Path, text: str) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=64, n_threads=2, verbose=False, vocab_only=True)
    return llm.tokenize(text.encode(), add_bos=True, special=True)  # BOS only where the vocab asks for it


def llama_decodes(model_path: Path) -> list[int]:
    from llama_cpp import Llama

    llm = Llama(str(model_path), n_ctx=64, n_threads=2, verbose=False)
    out = llm.create_completion("Hello", max_tokens=4, temperature=0.0)
    return [len(out["choices"][0]["text"])]


def llama_image(model_path: Path, mmproj: Path, image: np.ndarray) -> np.ndarray:
    from llama_cpp import Llama
    from llama_cpp import mtmd_cpp as m

    llm = Llama(str(model_path), n_ctx=256, n_threads=2, verbose=False)
    params = m.mtmd_context_params_default()
    params.n_threads = 2
    ctx = m.mtmd_init_from_file(str(mmproj).encode(), llm.model, params)
    data = np.ascontiguousarray(image, dtype=np.uint8)
    bitmap = m.mtmd_bitmap_init(image.shape[1], image.shape[0], data.ctypes.data_as(ctypes.POINTER(ctypes.c_uint8)))
    chunks = m.mtmd_input_chunks_init()
    text = m.mtmd_input_text(text=b"<__media__>", text_len=11, add_special=False, parse_special=True)
    bitmaps = (m.mtmd_bitmap_p_ctypes * 1)(bitmap)
    if m.mtmd_tokenize(ctx, chunks, ctypes.byref(text), bitmaps, 1) != 0:
        raise RuntimeError("mtmd_tokenize failed")
    rows = []
    for i in range(m.mtmd_input_chunks_size(chunks)):
        chunk = m.mtmd_input_chunks_get(chunks, i)
        if m.mtmd_input_chunk_get_type(chunk) != m.MTMD_INPUT_CHUNK_TYPE_IMAGE:
            continue
        if m.mtmd_encode_chunk(ctx, chunk) != 0:
            raise RuntimeError("mtmd_encode_chunk failed")
        n = m.mtmd_input_chunk_get_n_tokens(chunk)
        rows.append(np.ctypeslib.as_array(m.mtmd_get_output_embd(ctx), shape=(n * llm.n_embd(),)).reshape(n, -1).copy())
    return np.concatenate(rows)


def our_logits(folder: Path, ids: list[int]) -> np.ndarray:
    import minicpmv

    chat = minicpmv.load(folder, dtype="float32")
    t = torch.tensor([ids])
    with torch.no_grad():
        emb = chat.model.llm.embed_prompt_ids(t)  # [1, T, H]
        pos = torch.arange(len(ids))[None]
        return chat.model(emb, pos, torch.ones_like(t), last_only=False)[0].numpy()


def main(argv: list[str] | None = None) -> int:
    from minicpmv.formats.gguf_write import export_gguf
    from minicpmv.processing.tokenizer import Tokenizer

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--record", action="store_true", help="write tests/data/formats/llamacpp-on-our-export.*")
    ap.add_argument("--no-image", action="store_true", help="skip the mmproj check (needs libmtmd)")
    args = ap.parse_args(argv)
    arrays: dict[str, np.ndarray] = {}
    record: dict[str, object] = {"prompt": PROMPT, "files": {}}
    image = (np.random.default_rng(0).random((448, 448, 3)) * 255).astype(np.uint8)
    ok = True
    with tempfile.TemporaryDirectory() as tmp:
        for v in VERSIONS:
            ids = Tokenizer.from_dir(CONF / v / "_checkpoint").encode(PROMPT)
            for t in TYPES:
                out = Path(tmp) / f"{v}-{t}"
                export_gguf(CONF / v / "_checkpoint", out, t)
                n = llama_decodes(out / "model.gguf")
                line = f"{v:<5} {t:<7} llama.cpp loads and decodes ({n[0]} chars)"
                if t == "f32":
                    ref = llama_logits(out / "model.gguf", ids)
                    diff = float(np.abs(our_logits(out, ids) - ref).max())
                    theirs = llama_tokens(out / "model.gguf", PROMPT)
                    line += f"; max |logit diff| {diff:.2e}; tokenization {'same' if theirs == ids else 'DIFFERS'}"
                    ok &= diff < 1e-3
                    arrays[f"{v}.logits"], arrays[f"{v}.ids"] = ref, np.asarray(ids)
                    record["files"][v] = {"model.gguf": _sha(out / "model.gguf"),  # type: ignore[index]
                                          "mmproj.gguf": _sha(out / "mmproj.gguf"), "llama_cpp_ids": theirs}
                    if v == "2.6" and not args.no_image:
                        arrays["2.6.image_embeddings"] = llama_image(out / "model.gguf", out / "mmproj.gguf", image)
                        line += f"; image embeddings {arrays['2.6.image_embeddings'].shape}"
                print(line, flush=True)
    if args.record:
        from safetensors.numpy import save_file

        arrays["image_448"] = image
        save_file(arrays, str(OUT / "llamacpp-on-our-export.safetensors"))
        (OUT / "llamacpp-on-our-export.json").write_text(json.dumps(record, indent=1) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
