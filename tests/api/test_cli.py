"""The minicpmv command line: inspect, chat (one-shot and interactive), errors."""

from __future__ import annotations

import io
import json
import sys

from minicpmv.cli import main

from .conftest import CONF, DATA

REAL45 = DATA / "real-4.5" / "release"
CKPT26 = CONF / "2.6" / "_checkpoint"


def _real45_expected_params() -> int:
    """Parameter count of the real 4.5 release computed from its config and the spec's key table."""
    c = json.loads((REAL45 / "config.json").read_text())
    H, V, L, I = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"], c["intermediate_size"]
    hd, nh, nkv = c["head_dim"], c["num_attention_heads"], c["num_key_value_heads"]
    layer = H * nh * hd + 2 * H * nkv * hd + nh * hd * H + 2 * hd + 2 * H + 3 * H * I
    llm = 2 * V * H + L * layer + H
    v = c["vision_config"]
    D, Iv, P, Lv = v["hidden_size"], v["intermediate_size"], v["patch_size"], v["num_hidden_layers"]
    npos = (v["image_size"] // P) ** 2
    vlayer = 4 * (D * D + D) + 2 * (2 * D) + D * Iv + Iv + Iv * D + D
    vpm = D * 3 * P * P + D + npos * D + Lv * vlayer + 2 * D
    res = c["query_num"] * H + H * D + 3 * H * H + 3 * H + H * H + H + 6 * H + H * H
    return llm + vpm + res


def test_inspect_real_45_from_config_alone(capsys):
    assert main(["inspect", str(REAL45), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["version"] == "4.5"
    assert info["has_weights"] is False
    assert info["parameters"]["total"] == _real45_expected_params()
    assert 8.5e9 < info["parameters"]["total"] < 8.8e9
    assert main(["inspect", str(REAL45)]) == 0
    text = capsys.readouterr().out
    assert "MiniCPM-V 4.5" in text and "GiB" in text


def test_chat_one_shot(capsys):
    img = next((CONF / "2.6" / "single_448" / "inputs").glob("*.png"))
    rc = main(["chat", "--model", str(CKPT26), "--dtype", "float32", "--image", str(img), "--greedy",
               "--max-new-tokens", "5", "What is this?"])
    assert rc == 0
    assert capsys.readouterr().out.endswith("\n")


def test_chat_interactive(capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n:reset\nAgain\n:quit\n"))
    rc = main(["chat", "--model", str(CKPT26), "--dtype", "float32", "--greedy", "--max-new-tokens", "3", "-i"])
    assert rc == 0


def test_chat_missing_image_is_a_clean_error(capsys, tmp_path):
    rc = main(["chat", "--model", str(CKPT26), "--image", str(tmp_path / "missing.png"), "q"])
    assert rc == 2
    assert "missing.png" in capsys.readouterr().err


def test_chat_unknown_model_dir(capsys, tmp_path):
    rc = main(["chat", "--model", str(tmp_path / "nothing-here"), "q"])
    assert rc == 2
    assert "error" in capsys.readouterr().err
