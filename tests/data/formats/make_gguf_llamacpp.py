"""Make the llama.cpp golden GGUF files of tests/data/formats/ with llama.cpp's own tools.

Needs a llama.cpp source tree and its build (libllama, libmtmd) plus the python bindings of
llama-cpp-python; none of it is part of this repository. For example, from the llama-cpp-python
sdist (``pip download --no-binary :all: --no-deps llama-cpp-python``, unpack):

    cmake -S SDIST/vendor/llama.cpp -B build -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF
    cmake --build build -j2 --target llama mtmd llama-bench llama-mtmd-cli
    LLAMA_CPP_DIR=SDIST/vendor/llama.cpp LLAMA_CPP_LIB_PATH=build/bin PYTHONPATH=SDIST \\
        python tests/data/formats/make_gguf_llamacpp.py          # torch, transformers, numpy installed

For 2.6 (pair), 2.5 and 4.5 (language model) it does what ``minicpmv-surgery.py`` does (the LLM
part with its tokenizer into ``model/``, the resampler and vision tower into torch files; the
script itself needs the checkpoint's remote code, which the tiny checkpoints do not ship), then runs
``convert_hf_to_gguf.py`` and ``minicpmv-convert-image-encoder-to-gguf.py`` unchanged, with one
override: the tiny tokenizers are not among the pre-tokenizer hashes ``convert_hf_to_gguf.py``
knows, so its ``get_vocab_base_pre`` is told the release's pre-tokenizer name (qwen2 / llama-bpe).
It then records with llama.cpp: the logits of the 2.6 ``text_only`` case's official input ids,
and the image embeddings of a 448x448 image. Tests compare against these recordings.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[3]
OUT = Path(__file__).resolve().parent
LLAMA = Path(os.environ["LLAMA_CPP_DIR"])
CASES = {"2.6": ("Qwen2ForCausalLM", "qwen2", 3, "f32"), "2.5": ("LlamaForCausalLM", "llama-bpe", 2, "f16"),
         "4.5": ("Qwen3ForCausalLM", "qwen2", 6, "f16")}


def surgery(version: str, work: Path) -> Path:
    """The checkpoint split as minicpmv-surgery.py splits it: model/ (LLM + tokenizer) and the
    minicpmv.projector / minicpmv.clip torch files beside it."""
    import torch
    from safetensors.torch import load_file, save_file

    src = ROOT / "tests/data/conformance" / version / "_checkpoint"
    arch = CASES[version][0]
    sd = load_file(str(src / "model.safetensors"))
    model = work / "model"
    model.mkdir(parents=True)
    save_file({k.removeprefix("llm."): v.float() for k, v in sd.items() if k.startswith("llm.")},
              str(model / "model.safetensors"), metadata={"format": "pt"})
    torch.save({k: v.float() for k, v in sd.items() if k.startswith("resampler")}, work / "minicpmv.projector")
    vision = {k.removeprefix("vpm."): v.float() for k, v in sd.items() if k.startswith("vpm")}
    torch.save(vision, work / "minicpmv.clip")
    config = json.loads((src / "config.json").read_text())
    shutil.copy2(src / "config.json", work / "config.json")
    config.update(architectures=[arch], torch_dtype="float32")
    config.pop("auto_map", None)
    (model / "config.json").write_text(json.dumps(config, indent=2))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "added_tokens", "vocab", "merges")):
            shutil.copy2(f, model / f.name)
    tcfg = json.loads((model / "tokenizer_config.json").read_text())
    tcfg.pop("auto_map", None)
    tcfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (model / "tokenizer_config.json").write_text(json.dumps(tcfg, indent=2))
    return work


def convert(version: str, work: Path) -> tuple[Path, Path]:
    arch, pre, number, outtype = CASES[version]
    llm = work / f"model-{outtype}.gguf"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import convert_hf_to_gguf as c; "
            "from conversion.base import TextModel; pre = sys.argv[2]; "
            "TextModel.get_vocab_base_pre = lambda self, tok: pre; "
            "sys.argv = ['convert_hf_to_gguf.py', sys.argv[3], '--outtype', sys.argv[4], '--outfile', sys.argv[5]]; "
            "c.main()")
    subprocess.run([sys.executable, "-c", code, str(LLAMA), pre, str(work / "model"), outtype, str(llm)], check=True)
    script = LLAMA / "tools/mtmd/legacy-models/minicpmv-convert-image-encoder-to-gguf.py"
    subprocess.run([sys.executable, str(script), "-m", str(work), "--minicpmv-projector",
                    str(work / "minicpmv.projector"), "--output-dir", str(work / "mm"), "--minicpmv_version",
                    str(number)], check=True,
                   env={**os.environ, "PYTHONPATH": f"{LLAMA / 'gguf-py'}{os.pathsep}{os.environ.get('PYTHONPATH')}"})
    return llm, work / "mm" / "mmproj-model-f16.gguf"


def record_logits(llm: Path) -> np.ndarray:
    from llama_cpp import Llama

    meta = json.loads((ROOT / "tests/data/conformance/2.6/text_only/expected/meta.json").read_text())
    ids = meta["input_ids"][0]
    model = Llama(str(llm), n_ctx=512, logits_all=True, n_threads=2, verbose=False, type_k=0, type_v=0)  # F32 KV cache
    model.eval(ids)
    return np.asarray(model.scores[: len(ids)], dtype=np.float32), np.asarray(ids, dtype=np.int64)


def record_image(llm: Path, mmproj: Path, image: np.ndarray) -> np.ndarray:
    """llama.cpp's embeddings of one image (mtmd: preprocess, vision tower, resampler), with the
    helper of bench/check_llamacpp.py."""
    sys.path.insert(0, str(ROOT / "bench"))
    from check_llamacpp import llama_image

    return llama_image(llm, mmproj, image)


def main() -> None:
    from safetensors.numpy import save_file

    golden: dict[str, np.ndarray] = {}
    image = (np.random.default_rng(0).random((448, 448, 3)) * 255).astype(np.uint8)
    golden["image_448"] = image
    with tempfile.TemporaryDirectory() as tmp:
        for version in CASES:
            work = surgery(version, Path(tmp) / version)
            llm, mmproj = convert(version, work)
            dst = OUT / f"llamacpp-{version}"
            dst.mkdir(exist_ok=True)
            shutil.copy2(llm, dst / "model.gguf")
            if version == "2.6":
                shutil.copy2(mmproj, dst / "mmproj.gguf")
                golden["logits"], golden["input_ids"] = record_logits(llm)
                if not os.environ.get("SKIP_IMAGE"):  # needs libmtmd
                    golden["image_embeddings"] = record_image(llm, mmproj, image)
    save_file(golden, str(OUT / "llamacpp-2.6.golden.safetensors"))
    print({k: v.shape for k, v in golden.items()})


if __name__ == "__main__":
    main()
