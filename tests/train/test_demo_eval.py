"""The independent evaluation set of the demo model: separate from training, right answers, a scorer
that counts what it should."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np

from minicpmv.train import demo_eval as ev
from minicpmv.train.demo_world import COLOURS, REFUSAL, SHAPES

SRC = Path(ev.__file__)


def test_evaluation_generator_imports_nothing_of_the_training_generator() -> None:
    tree = ast.parse(SRC.read_text())
    names = [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    names += [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    assert not [n for n in names if "synthetic" in n or n.endswith("demo_vision") or n.endswith("demo_llm")]


def test_evaluation_fonts_are_not_training_fonts() -> None:
    from minicpmv.train import synthetic as syn

    train = {Path(p).stem.split("-")[0].lower() for p in syn.TRAIN_FONTS}
    used = {p.stem.split("-")[0].lower() for p in ev.eval_fonts() if p is not None}
    assert used and not used & train
    assert None in ev.eval_fonts()  # Pillow's default font is one of them


def test_items_are_reproducible_and_cover_every_family() -> None:
    a, b = ev.build_items(2, seed=3), ev.build_items(2, seed=3)
    assert [(i.family, i.turns, i.answer) for i in a] == [(i.family, i.turns, i.answer) for i in b]
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for i, j in zip(a, b, strict=True)
               for x, y in zip(i.images, j.images, strict=True))
    assert {i.family for i in a} == set(ev.FAMILIES)
    assert ev.build_items(2, seed=4)[0].answer is not None


def test_answers_match_the_drawn_shapes() -> None:
    import random

    rng = random.Random(0)
    for _ in range(10):
        img, shapes = ev._scene(rng, rng.randint(1, 6))
        assert 160 <= img.width <= 1024 and 160 <= img.height <= 1024
        pix = np.asarray(img).reshape(-1, 3)
        for s in shapes:
            assert s.name in SHAPES and s.colour in COLOURS
            assert (np.abs(pix.astype(int) - np.array(s.rgb)).max(axis=1) <= 2).sum() > 20  # the shade is drawn
            centre = np.asarray(img)[int(s.y), int(s.x)]
            assert np.abs(centre.astype(int) - np.array(s.rgb)).max() <= 2 or s.name == "star"


def test_reading_items_use_letters_and_digits_up_to_twelve() -> None:
    items = [i for i in ev.build_items(6, seed=9) if i.family == "reading"]
    for it in items:
        assert 1 <= len(it.answer) <= 12 and it.answer.isalnum() and it.answer.isascii()
        assert np.asarray(it.images[0]).std() > 5  # something is written


class _Oracle:
    """A fake chat model that answers every item right (or always the same wrong thing)."""

    def __init__(self, items: list[ev.Item], wrong: bool = False) -> None:
        self.answers = {id(i.images[0]): i.answer for i in items if i.images}
        self.wrong = wrong

    def chat(self, msgs, **kw) -> str:
        if self.wrong:
            return "banana"
        return self.answers[id(msgs[0]["content"][0])]


def test_scorer_counts_right_and_wrong_answers() -> None:
    items = ev.build_items(2, seed=1)
    perfect = ev.evaluate(_Oracle(items), items=items)
    assert all(v == 1.0 for v in perfect["greedy"].values()) and perfect["default"] == perfect["greedy"]
    misses: list[dict[str, str]] = []
    broken = ev.evaluate(_Oracle(items, wrong=True), items=items, misses=misses)
    assert all(v == 0.0 for v in broken["greedy"].values()) and len(misses) == len(items)
    table = ev.format_table(perfect)
    assert "| reading | 100.0% | 100.0% | ≥ 85% | 2 |" in table
    assert any(i.answer == REFUSAL for i in items)


def test_edit_distance_counts_each_kind_of_edit() -> None:
    assert ev.edit_distance("kitten", "sitting") == 3  # two substitutions and an insertion
    assert ev.edit_distance("", "abc") == 3 and ev.edit_distance("abc", "") == 3
    assert ev.edit_distance("AB12", "AB12") == 0 and ev.edit_distance("ab", "ba") == 2


def test_characters_read_scores_partial_answers() -> None:
    assert ev.characters_read("Hx2Lo", "Hx2Lo") == 1.0
    assert ev.characters_read("Hx2Lp", "Hx2Lo") == 0.8  # one character wrong of five
    assert ev.characters_read("Hx2L", "Hx2Lo") == 0.8  # one character missing
    assert ev.characters_read("red circle and more", "Hx2Lo") == 0.0  # floored, not negative
    assert ev.characters_read("", "Hx2Lo") == 0.0


class _Misreader(_Oracle):
    """Right everywhere but reading, where the last character is dropped."""

    def chat(self, msgs, **kw) -> str:
        got = super().chat(msgs, **kw)
        return got[:-1] if got in self.texts else got


def test_reading_characters_are_scored_beside_exact_strings() -> None:
    items = ev.build_items(3, seed=2)
    model = _Misreader(items)
    model.texts = {i.answer for i in items if i.family == "reading"}
    table = ev.evaluate(model, items=items)
    reading = [i.answer for i in items if i.family == "reading"]
    expected = round(sum(1 - 1 / len(t) for t in reading) / len(reading), 4)
    assert table["greedy"]["reading"] == 0.0 and table["greedy"]["colour"] == 1.0
    assert table["reading_characters"] == {"greedy": expected, "default": expected}
    row = f"| reading, characters (1 - CER) | {expected:.1%} | {expected:.1%} | - | 3 |"
    assert row in ev.format_table(table).splitlines()
    assert ev.format_table(ev.evaluate(_Oracle(items), items=items)).count("characters (1 - CER) | 100.0%") == 1


def test_tables_from_before_the_character_score_still_print() -> None:
    old = {"greedy": {"reading": 0.5}, "default": {"reading": 0.25}, "n_per_family": {"reading": 4}}
    assert ev.format_table(old).splitlines()[-1] == "| reading | 50.0% | 25.0% | ≥ 85% | 4 |"
