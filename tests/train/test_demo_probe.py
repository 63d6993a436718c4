"""The reading probe: it finds the strings that features carry, and none in features that carry none."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from minicpmv.errors import InputError
from minicpmv.train import demo, demo_probe
from minicpmv.train.demo_world import ALPHABET, MAX_CHARS

Q, H = 32, 96


def _texts(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(ALPHABET) for _ in range(rng.randint(1, MAX_CHARS))) for _ in range(n)]


def _oracle(texts: list[str], shift: int = 0) -> torch.Tensor:
    """Features holding each slot's character (shifted by ``shift`` ids) and the length in slot 0."""
    feats = torch.randn(len(texts), Q, H) * 0.1  # [N, Q, H]
    for i, t in enumerate(texts):
        feats[i, 0, len(t)] += 3.0
        for j, c in enumerate(t):
            feats[i, demo_probe.FIRST_CHAR_SLOT + j, 13 + (ALPHABET.index(c) + shift) % len(ALPHABET)] += 3.0
    return feats


def test_features_that_hold_the_strings_are_read_exactly() -> None:
    train, test = _texts(600, 1), _texts(100, 2)
    probe = demo_probe.fit(_oracle(train), train, steps=300)
    assert demo_probe.score(probe, _oracle(test), test) == {"chars": 1.0, "length": 1.0, "exact": 1.0}
    shifted = demo_probe.score(probe, _oracle(test, shift=1), test)  # each character read as its neighbour
    assert shifted["chars"] == 0.0 and shifted["exact"] == 0.0 and shifted["length"] == 1.0


def test_features_without_the_strings_read_nothing() -> None:
    train, test = _texts(600, 1), _texts(100, 2)
    probe = demo_probe.fit(torch.randn(600, Q, H), train, steps=300)
    s = demo_probe.score(probe, torch.randn(100, Q, H), test)
    assert s["chars"] < 0.1 and s["exact"] == 0.0


def test_the_probe_runs_on_a_model_and_both_picture_sets(tmp_path: Path) -> None:
    cfg = demo.DemoConfig(output=str(tmp_path), vision_width=64, vision_layers=1, llm_width=128, llm_layers=1)
    init = tmp_path / "init"
    demo.write_configs(init, cfg, demo.write_tokenizer(init))
    model = demo.build_model(init, 0).eval()
    result = demo_probe.reading_probe(demo_probe.model_features(model), fit_pictures=6, test_pictures=3)
    assert set(result["training generator"]) == {"chars", "length", "exact", "patch chars"}
    assert set(result["evaluation"]) == {"chars", "length", "exact"}
    assert all(0.0 <= v <= 1.0 for s in result.values() for v in s.values())


def test_patch_characters_are_read_where_the_features_hold_them() -> None:
    y = torch.randint(1, 1 + len(ALPHABET), (800,))
    held = torch.eye(96)[y] * 3 + torch.randn(800, 96) * 0.1  # [N, 96], one-hot of the character
    assert demo_probe.patch_characters((held[:600], y[:600]), (held[600:], y[600:]), steps=300) == 1.0
    noise = torch.randn(800, 96)
    assert demo_probe.patch_characters((noise[:600], y[:600]), (noise[600:], y[600:]), steps=300) < 0.1


def test_the_command_names_a_bad_folder_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as err:
        demo_probe.main([str(tmp_path / "missing")])
    assert str(err.value).startswith("error: ") and "\n" not in str(err.value)
    with pytest.raises(SystemExit):
        demo_probe.main([str(tmp_path), "--fit", "0"])
    assert "--fit and --test take a positive number" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        demo_probe.main([str(tmp_path), "--threads", "-1"])
    assert "--threads takes a positive number" in capsys.readouterr().err


def test_a_model_without_the_demo_character_slots_is_refused(tmp_path: Path) -> None:
    cfg = demo.DemoConfig(output=str(tmp_path), vision_width=64, vision_layers=1, llm_width=128, llm_layers=1)
    init = tmp_path / "init"
    demo.write_configs(init, cfg, demo.write_tokenizer(init))
    model = demo.build_model(init, 0)
    model.resampler.query = torch.nn.Parameter(model.resampler.query[:20].detach())  # 20 slots: no char:0 .. 11
    with pytest.raises(InputError, match=r"not a demo model: its resampler has 20 query slots"):
        demo_probe.model_features(model)
