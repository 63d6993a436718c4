"""The demo-model recipe: synthetic data generator, tokenizer, checkpoint layout, a smoke run."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest

from minicpmv.train import demo
from minicpmv.train import synthetic as syn


def test_scenes_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    a = syn.write_split(tmp_path / "a", "train", 12, seed=5, weights=demo.STAGE2_MIX)
    b = syn.write_split(tmp_path / "b", "train", 12, seed=5, weights=demo.STAGE2_MIX)
    assert json.loads(a.read_text()) == json.loads(b.read_text())
    for i in range(12):
        assert (a.parent / f"train/{i:06d}.png").read_bytes() == (b.parent / f"train/{i:06d}.png").read_bytes()
    c = syn.write_split(tmp_path / "c", "train", 12, seed=6, weights=demo.STAGE2_MIX)
    assert json.loads(c.read_text()) != json.loads(a.read_text())


@pytest.mark.parametrize("seed", range(20))
def test_single_shape_answers_match_the_pixels(seed: int) -> None:
    rng = random.Random(seed)
    scene = syn.make_scene(rng, "single")
    img, (mcol, mshape, _) = syn.render(scene, rng, masks=True)
    (cell, (colour, shape)), = scene.cells.items()
    colour_mask = np.asarray(mcol)
    ys, xs = np.nonzero(colour_mask)
    # the shape lies in the 3x3 cell the position answer names
    assert (int(ys.mean()) // 75) * 3 + int(xs.mean()) // 75 == cell
    assert scene.qa("position") == syn.POSITIONS[cell]
    assert set(np.unique(colour_mask)) == {0, 1 + list(syn.COLOURS).index(colour)}
    assert set(np.unique(np.asarray(mshape))) == {0, 1 + syn.SHAPES.index(shape)}
    # the drawn pixels have the answer's colour
    pix = np.asarray(img)[colour_mask > 0]
    assert np.abs(pix.astype(int) - np.array(syn.COLOURS[colour])).max() <= 1 or \
        np.median(np.abs(pix.astype(int) - np.array(syn.COLOURS[colour])).max(axis=1)) == 0
    assert scene.qa("count") == "1"


@pytest.mark.parametrize("kind", ["word", "bigword"])
def test_word_masks_hold_the_letters_and_big_words_stay_in_one_slice(kind: str) -> None:
    for seed in range(10):
        rng = random.Random(seed)
        scene = syn.make_scene(rng, kind)
        img, (_, _, letters) = syn.render(scene, rng, masks=True)
        ids = set(np.unique(np.asarray(letters))) - {0}
        assert ids == {1 + ord(ch) - ord("a") for ch in scene.word}
        if kind == "bigword":
            assert img.size == (2 * syn.CANVAS, 2 * syn.CANVAS)
            x0, y0, x1, y1 = scene.crop_box()
            ys, xs = np.nonzero(np.asarray(letters))
            assert x0 <= xs.min() and xs.max() < x1 and y0 <= ys.min() and ys.max() < y1
            ink = np.asarray(img.convert("L")) < 128
            assert ink[y0:y1, x0:x1].sum() == ink.sum() > 0


def test_dense_labels_and_conversation() -> None:
    rng = random.Random(3)
    scene = syn.make_scene(rng, "many")
    lab = syn.dense_labels(scene)
    assert lab["count"] == len(scene.cells) == sum(c > 0 for c in lab["colour"]) == sum(c > 0 for c in lab["cell"])
    assert all(lab["cell"][c] == c + 1 for c in scene.cells)
    conv = syn.conversation(scene, rng)
    assert conv[0]["content"].startswith("<image>\n") and conv[1]["content"] == str(len(scene.cells))
    word = syn.make_scene(rng, "word")
    lab = syn.dense_labels(word)
    assert syn.WORDS[lab["word"] - 1] == word.word
    assert "".join(chr(96 + i) for i in lab["letters"] if i) == word.word


def test_tokenizer_carries_the_official_special_tokens(tmp_path: Path) -> None:
    from minicpmv.processing.tokenizer import Tokenizer

    vocab = demo.write_tokenizer(tmp_path, 640)
    tok = Tokenizer.from_dir(tmp_path)
    assert len(tok) == vocab
    for t in demo.SPECIAL_TOKENS:
        assert tok.encode(t) == [tok.token_to_id(t)]
    assert tok.token_to_id("<|im_end|>") == vocab - len(demo.SPECIAL_TOKENS) + 2
    for line in demo.corpus_lines():
        assert tok.decode(tok.encode(line)) == line
    for word in (*syn.COLOURS, *syn.SHAPES, *syn.WORDS):
        assert len(tok.encode(word)) <= 2, word


def test_recipe_smoke_run_gives_a_loadable_checkpoint_and_report(tmp_path: Path) -> None:
    from minicpmv.api import load

    cfg = demo.DemoConfig(output=str(tmp_path / "run"), stage1_steps=2, stage1_batch=4, train_images=16,
                          eval_images=4, stage2_epochs=1, stage2_batch=8, threads=2, device="cpu")
    report = demo.run(cfg)
    final = tmp_path / "run" / "final"
    assert set(report["heldout"]) == set(syn.FAMILIES)
    assert report["weights_sha256"] == demo.sha256(final / "model.safetensors")
    assert json.loads((tmp_path / "run" / "report.json").read_text())["config"]["seed"] == 0
    chat = load(str(final), dtype="float32")
    assert chat.version.name == "2.6"
    assert isinstance(chat.chat([{"role": "user", "content": "hello"}], sampling=False, max_new_tokens=3), str)
    with pytest.raises(Exception, match="already holds a finished run"):
        demo.run(cfg)


def test_train_demo_cli_rejects_unknown_or_malformed_settings(tmp_path: Path) -> None:
    from minicpmv.cli import main

    with pytest.raises(SystemExit, match="unknown setting 'nope'"):
        main(["train-demo", "--output", str(tmp_path / "x"), "--set", "nope=1"])
    with pytest.raises(SystemExit, match="takes true or false"):
        main(["train-demo", "--output", str(tmp_path / "x"), "--set", "stage2_tune_resampler=maybe"])
