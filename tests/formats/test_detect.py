"""Format detection from recorded metadata, ``minicpmv inspect`` naming every format, and the
``export --gguf`` / ``chat --model X.gguf --mmproj`` command lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minicpmv.cli import main
from minicpmv.errors import CheckpointError
from minicpmv.formats.detect import detect_format

DATA = Path(__file__).resolve().parents[1] / "data"
CKPT = DATA / "conformance" / "2.6" / "_checkpoint"


def test_each_format_is_named(tmp_path: Path) -> None:
    assert detect_format(CKPT).kind == "safetensors"
    assert detect_format(DATA / "formats" / "bnb-2.6-nf4").describe() == (
        "bitsandbytes 4-bit (safetensors): nf4, double quantization")
    awq = detect_format(DATA / "formats" / "awq-4.5")
    assert awq.describe() == "AWQ int4 GEMM (safetensors): 4-bit, group size 128"
    renamed = tmp_path / "weights.bin"  # a GGUF file is known by its magic, whatever its name
    renamed.write_bytes(b"GGUF" + bytes(12))
    assert detect_format(renamed).kind == "gguf"
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not gguf")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        detect_format(fake)


def test_file_names_alone_decide_nothing(tmp_path: Path) -> None:
    dst = tmp_path / "MiniCPM-V-2_6-int4-AWQ-gguf"
    shutil.copytree(CKPT, dst)
    assert detect_format(dst).kind == "safetensors"


def test_inspect_and_chat_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "gguf"
    assert main(["export", "--model", str(CKPT), "--gguf", str(out), "--type", "q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "mmproj.gguf", "model.gguf"]
    capsys.readouterr()
    expected = {
        str(CKPT): "safetensors (float)",
        str(DATA / "formats" / "bnb-2.6-nf4"): "bitsandbytes 4-bit (safetensors): nf4",
        str(DATA / "formats" / "awq-4.5"): "AWQ int4 GEMM",
        str(out): "GGUF (llama.cpp): model.gguf (qwen2) + mmproj.gguf",
    }
    for path, name in expected.items():
        assert main(["inspect", path]) == 0
        text = capsys.readouterr().out
        assert f"format       {name}" in text, text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["tensor_types"]["model"]["Q8_0"] == 16 and info["version"] == "2.6"
    args = ["chat", "--model", str(out / "model.gguf"), "--mmproj", str(out / "mmproj.gguf"), "--greedy",
            "--max-new-tokens", "4", "--dtype", "float32", "Hi"]
    assert main(args) == 0
    assert capsys.readouterr().out.strip()
    assert main(["chat", "--model", str(out / "model.gguf"), "Hi"]) == 2
    assert "mmproj" in capsys.readouterr().err


def test_export_needs_a_target(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["export", "--model", str(CKPT)]) == 2
    assert "--gguf" in capsys.readouterr().err
