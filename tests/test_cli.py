"""The command line as a new user meets it: one-line errors instead of tracebacks (serve with a
bad model, unknown or unavailable devices), ``-v`` anywhere, ``--version``, ``python -m minicpmv``,
``inspect`` on repo ids and on the demo model's name, interactive ``:commands`` and ``--no-stream``."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import minicpmv
from minicpmv.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
CKPT26 = ROOT / "tests" / "data" / "conformance" / "2.6" / "_checkpoint"


def _one_line(capfd, rc: int) -> str:
    out, err = capfd.readouterr()
    assert rc == 2, (rc, out, err)
    assert err.startswith("minicpmv: error: ") and err.count("\n") == 1 and "Traceback" not in err + out, err
    return err


# ---------------------------------------------------------------------------- one-line errors


def test_serve_with_a_missing_model_is_one_line(capfd, tmp_path):
    rc = main(["serve", "--model", str(tmp_path / "nonexistent"), "--port", "0"])
    assert "nonexistent" in _one_line(capfd, rc)


def test_serve_with_an_offline_repo_id_is_one_line(capfd, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    rc = main(["serve", "--model", "minicpmv-test-nonexistent/repo-zz", "--port", "0"])
    assert "offline" in _one_line(capfd, rc)


@pytest.mark.parametrize("command", ["chat", "serve", "ui", "finetune"])
def test_unknown_device_is_one_line(capfd, tmp_path, command):
    args = {"chat": ["chat", "--model", str(CKPT26), "hi"], "serve": ["serve", "--model", str(CKPT26)],
            "ui": ["ui", "--model", str(CKPT26)],
            "finetune": ["finetune", "--model", str(CKPT26), "--data", "d.json", "--output", str(tmp_path / "o")],
            }[command]
    err = _one_line(capfd, main([*args, "--device", "gpu"]))
    assert "'gpu'" in err and "cpu" in err


def test_cuda_without_cuda_is_one_line(capfd, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    err = _one_line(capfd, main(["chat", "--model", str(CKPT26), "--device", "cuda", "hi"]))
    assert "CUDA is not available" in err and "--device cpu" in err
    err = _one_line(capfd, main(["serve", "--model", str(CKPT26), "--device", "cuda:1"]))
    assert "CUDA is not available" in err


# ---------------------------------------------------------------------------- flags


@pytest.mark.parametrize("argv", [["-v", "serve"], ["serve", "-v"], ["serve", "--verbose"]])
def test_verbose_before_or_after_the_command(argv):
    assert build_parser().parse_args(argv).verbose is True
    assert build_parser().parse_args(["serve"]).verbose is False


def test_version(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"minicpmv {minicpmv.__version__}\n"


def test_python_dash_m_minicpmv():
    out = subprocess.run([sys.executable, "-m", "minicpmv", "--version"], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == f"minicpmv {minicpmv.__version__}\n", out.stderr


# ---------------------------------------------------------------------------- inspect / the demo name


def test_inspect_and_load_the_demo_model_by_name(capsys):
    assert main(["inspect", "minicpmv:demo", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "2.6" and info["has_weights"] is True
    assert minicpmv.load("minicpmv:demo").path == str(minicpmv.demo_model.path())


def _fake_hub_cache(root: Path, repo: str) -> None:
    """A Hugging Face cache holding only config.json of ``repo`` (what inspect needs)."""
    folder = root / f"models--{repo.replace('/', '--')}"
    snap = folder / "snapshots" / ("0" * 40)
    snap.mkdir(parents=True)
    shutil.copy(CKPT26 / "config.json", snap / "config.json")
    (folder / "refs").mkdir()
    (folder / "refs" / "main").write_text("0" * 40)


def test_inspect_a_cached_repo_id_offline(capsys, monkeypatch, tmp_path):
    import huggingface_hub.constants as hf_constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    _fake_hub_cache(tmp_path / "hub", "someorg/tiny-minicpmv")
    assert main(["inspect", "someorg/tiny-minicpmv"]) == 0
    out = capsys.readouterr().out
    assert "MiniCPM-V 2.6" in out and "not downloaded" in out
    assert main(["inspect", "someorg/not-cached"]) == 2
    err = capsys.readouterr().err
    assert "offline" in err and "config.json" not in err


# ---------------------------------------------------------------------------- chat


def test_interactive_unknown_commands_are_not_sent_to_the_model(capsys, monkeypatch):
    from minicpmv.engine.session import ChatSession

    asked = []
    monkeypatch.setattr(ChatSession, "ask", lambda self, content, stream=False, **kw: asked.append(content) or iter(
        ["ok"]))
    monkeypatch.setattr(sys, "stdin", io.StringIO(":imgae cat.png\n:help\n::) smile\nHello\n:quit\n"))
    assert main(["chat", "--model", str(CKPT26), "--dtype", "float32", "-i"]) == 0
    err = capsys.readouterr().err
    assert "unknown command ':imgae'" in err and ":image PATH" in err
    assert asked == [[":) smile"], ["Hello"]]  # '::' sends a line that starts with ':'


def test_chat_without_streaming_prints_the_answer_once(capsys):
    from minicpmv.engine.session import ChatSession

    args = ["chat", "--model", str(CKPT26), "--dtype", "float32", "--greedy", "--max-new-tokens", "6", "Hello"]
    assert main([*args, "--no-stream"]) == 0
    printed = capsys.readouterr().out
    model = minicpmv.load(CKPT26, dtype="float32")
    session = ChatSession(model, sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=6)
    assert printed == session.ask("Hello") + "\n"
