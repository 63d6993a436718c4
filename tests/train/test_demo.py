"""The demo-model recipe: training pictures and their labels, questions, tokenizer, a tiny seeded run."""

from __future__ import annotations

import json
import random
import string
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from minicpmv.errors import InputError
from minicpmv.train import demo
from minicpmv.train import synthetic as syn
from minicpmv.train import synthetic_qa as qa
from minicpmv.train.demo_world import ALPHABET, COLOURS, NO_SHAPES, NO_TEXT, POSITIONS, REFUSAL, SHAPES, position_name


def test_splits_are_reproducible_from_the_seed(tmp_path: Path) -> None:
    a = qa.write_split(tmp_path / "a", "train", 10, seed=5)
    b = qa.write_split(tmp_path / "b", "train", 10, seed=5)
    assert json.loads(a.read_text()) == json.loads(b.read_text())
    for png in sorted((a.parent / "train").glob("*.png")):
        assert png.read_bytes() == (b.parent / "train" / png.name).read_bytes()
    c = qa.write_split(tmp_path / "c", "train", 10, seed=6)
    assert json.loads(c.read_text()) != json.loads(a.read_text())


@pytest.mark.parametrize("seed", range(12))
def test_single_shape_pixels_match_its_answers(seed: int) -> None:
    rng = random.Random(seed)
    scene = syn.make_scene(rng, "shapes", n_objects=1)
    img, (objs, _) = syn.render(scene, masks=True)
    (o,) = scene.objects
    mask = np.asarray(objs) > 0
    ys, xs = np.nonzero(mask)
    # the mask's bounding box is centred on the object's centre; the answers follow from it
    assert abs((xs.min() + xs.max()) / 2 - o.cx) <= 1.5 and abs((ys.min() + ys.max()) / 2 - o.cy) <= 1.5
    got = qa.ask_shapes(scene, "position", random.Random(0))
    assert got is not None and got[0][1] == position_name(o.cx / scene.width, o.cy / scene.height)
    pix = np.asarray(img)[mask]
    assert (np.abs(pix.astype(int) - np.array(o.rgb)).max(axis=1) == 0).mean() > 0.99
    hsv_ok = syn.sample_rgb(random.Random(seed), o.colour)  # the colour name's own range draws shades
    assert len(hsv_ok) == 3 and o.colour in COLOURS and o.shape in SHAPES


def test_shapes_never_touch_and_counts_are_labelled() -> None:
    for seed in range(8):
        rng = random.Random(seed)
        scene = syn.make_scene(rng, "shapes", n_objects=rng.randint(2, 9))
        img, (objs, _) = syn.render(scene, masks=True)
        ids = set(np.unique(np.asarray(objs))) - {0}
        assert ids == set(range(1, len(scene.objects) + 1))  # every shape visible, none hidden by another
        view = syn.view_of(img)
        labels = syn.patch_labels(scene, (objs, _), view.size)
        assert (labels["count"] == len(scene.objects)).all()
        slots = syn.slot_labels(scene)
        assert slots[0]["count"] == len(scene.objects)
        for s in SHAPES:
            assert slots[0][f"n:{s}"] == sum(o.shape == s for o in scene.objects)
        assert len(slots) == len(syn.SLOT_NAMES)


@pytest.mark.parametrize("lines", [1, 3])
def test_text_masks_hold_each_character_and_its_index(lines: int) -> None:
    for seed in range(6):
        rng = random.Random(seed)
        scene = syn.make_scene(rng, "text", lines=lines)
        img, (_, chars) = syn.render(scene, masks=True)
        total = sum(len(t) for t in scene.lines)
        assert set(np.unique(np.asarray(chars))) - {0} <= set(range(1, total + 1))
        ink = np.abs(np.asarray(img, int) - np.asarray(syn.paint_background(scene.background, *img.size), int)).max(-1)
        assert ink.max() > 60  # the text is drawn and stands out
        slots = syn.slot_labels(scene)
        if lines == 1:
            text = scene.lines[0]
            assert [s["char"] for s in slots[-12:]] == [1 + ALPHABET.index(c) for c in text] + [0] * (12 - len(text))
        else:
            assert all(s == {} for s in slots[-12:])  # several lines: no reading target


def test_other_pictures_are_refused_whatever_the_question() -> None:
    rng = random.Random(1)
    scene = syn.make_scene(rng, "other")
    turns = qa.scene_turns(scene, rng, 4)
    assert len(turns) == 4 and all(a == REFUSAL for _, a in turns)


def test_questions_that_do_not_fit_the_picture() -> None:
    rng = random.Random(2)
    shapes = syn.make_scene(rng, "shapes", n_objects=2)
    text = syn.make_scene(rng, "text")
    assert qa.ask_shapes(shapes, "reading", rng)[0][1] == NO_TEXT
    assert qa.ask_text(text, "colour", rng)[1] == NO_SHAPES
    assert qa.ask_text(text, "reading", rng)[1] == text.lines[0]


def test_binding_questions_name_a_unique_object() -> None:
    seen = set()
    for seed in range(40):
        rng = random.Random(seed)
        scene = syn.make_scene(rng, "shapes", n_objects=rng.randint(2, 5))
        got = qa.ask_shapes(scene, "colour_of", rng)
        if got is None:
            continue
        (q, a), o = got
        assert o is not None and q.count(o.shape) == 1 and a == o.colour
        assert sum(p.shape == o.shape for p in scene.objects) == 1
        seen.add(a)
    assert len(seen) >= 3


def test_tokenizer_spells_any_string_and_keeps_question_words_whole(tmp_path: Path) -> None:
    from minicpmv.processing.tokenizer import Tokenizer

    vocab = demo.write_tokenizer(tmp_path)
    tok = Tokenizer.from_dir(tmp_path)
    assert len(tok) == vocab
    for t in demo.SPECIAL_TOKENS:
        assert tok.encode(t) == [tok.token_to_id(t)]
    rng = random.Random(0)
    for _ in range(200):  # any letters/digits: one token per character, so every string can be written
        s = "".join(rng.choice(string.ascii_letters + string.digits) for _ in range(rng.randint(1, 12)))
        ids = tok.encode(s)
        assert len(ids) == len(s) and tok.decode(ids) == s
    for word in (*COLOURS, *SHAPES, "colour", "many", "where"):
        assert len(tok.encode(" " + word)) == 1, word
    for line in (REFUSAL, *POSITIONS, *(q for qs in qa.T.values() for q in qs)):
        assert tok.decode(tok.encode(line)) == line
    assert tok.token_to_id("\x00") is None and tok.decode([0]) != "!"  # id 0 is a byte no text uses


def _tiny(out: Path) -> demo.DemoConfig:
    return demo.DemoConfig(output=str(out), shape_warmup_steps=2, stage1_steps=2, stage1_batch=3, train_images=12,
                           stage2_first_steps=2, stage2_epochs=1, stage2_batch=6, eval_items=0, threads=1, device="cpu",
                           vision_width=64, vision_layers=1, llm_width=128, llm_layers=1)


def test_tiny_recipe_run_is_deterministic_and_loadable(tmp_path: Path) -> None:
    from minicpmv.api import load

    first = demo.run(_tiny(tmp_path / "a"))
    second = demo.run(_tiny(tmp_path / "b"))
    assert first["weights_sha256"] == second["weights_sha256"] == demo.sha256(tmp_path / "a/final/model.safetensors")
    assert first["config"]["seed"] == 0 and first["times"]["total_cpu_s"] > 0
    other = demo.run(demo.DemoConfig(**{**_tiny(tmp_path / "c").__dict__, "seed": 1}))
    assert other["weights_sha256"] != first["weights_sha256"]
    chat = load(str(tmp_path / "a" / "final"), dtype="float32")
    assert chat.version.name == "2.6"
    assert isinstance(chat.chat([{"role": "user", "content": "hello"}], sampling=False, max_new_tokens=3), str)
    with pytest.raises(Exception, match="already holds a finished run"):
        demo.run(_tiny(tmp_path / "a"))


def test_a_run_into_the_same_folder_reuses_finished_stage1_weights(tmp_path: Path) -> None:
    """Stage 2 again over the stage-1 weights of an earlier run gives the checkpoint a run from
    scratch gives; other stage-1 settings, or weights changed since, are refused in one line."""
    import shutil

    import torch

    first = demo.run(_tiny(tmp_path))
    assert first["stage1_reused"] is False
    shutil.rmtree(tmp_path / "final")
    again = demo.run(_tiny(tmp_path))
    assert again["stage1_reused"] is True and again["weights_sha256"] == first["weights_sha256"]
    assert again["stage1_final"] == first["stage1_final"]
    assert again["times"]["stage1_wall_s"] == first["times"]["stage1_wall_s"]
    shutil.rmtree(tmp_path / "final")
    longer = demo.run(demo.DemoConfig(**{**_tiny(tmp_path).__dict__, "stage2_epochs": 2}))  # a stage-2 setting
    assert longer["stage1_reused"] is True and longer["weights_sha256"] != first["weights_sha256"]
    shutil.rmtree(tmp_path / "final")
    with pytest.raises(InputError, match=r"other settings \(stage1_steps 2 there, 3 now\)") as err:
        demo.run(demo.DemoConfig(**{**_tiny(tmp_path).__dict__, "stage1_steps": 3}))
    assert "\n" not in str(err.value)
    from safetensors.torch import load_file, save_file

    weights = load_file(str(tmp_path / "init" / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = weights[name] + torch.ones_like(weights[name])
    save_file(weights, str(tmp_path / "init" / "model.safetensors"))
    with pytest.raises(InputError, match="changed since stage 1 wrote it"):
        demo.run(_tiny(tmp_path))


def test_a_run_starts_from_another_runs_stage1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--stage1-from copies a finished stage 1 into the new run (the first run's folder is left as
    it was) and gives the checkpoint a run from scratch gives."""
    from minicpmv.cli import main

    first = demo.run(_tiny(tmp_path / "a"))
    before = sorted((p.name, demo.sha256(p)) for p in (tmp_path / "a" / "init").iterdir())
    second = demo.run(_tiny(tmp_path / "b"), stage1_from=tmp_path / "a")
    assert second["stage1_reused"] is True and second["stage1_from"] == str(tmp_path / "a")
    assert second["weights_sha256"] == first["weights_sha256"]
    assert sorted((p.name, demo.sha256(p)) for p in (tmp_path / "a" / "init").iterdir()) == before
    with pytest.raises(InputError, match=r"other settings \(stage1_steps 2 there, 3 now\): give --stage1-from"):
        demo.run(demo.DemoConfig(**{**_tiny(tmp_path / "c").__dict__, "stage1_steps": 3}), stage1_from=tmp_path / "a")
    assert not (tmp_path / "c").exists()  # refused before anything was copied
    (tmp_path / "c" / "init").mkdir(parents=True)
    with pytest.raises(InputError, match="already exists; choose another --output"):
        demo.run(_tiny(tmp_path / "c"), stage1_from=tmp_path / "a")
    assert main(["train-demo", "--output", str(tmp_path / "d"), "--stage1-from", str(tmp_path / "none")]) == 2
    err = capsys.readouterr().err
    assert err == f"minicpmv: error: {tmp_path / 'none'} holds no finished stage 1 (no init/stage1.json)\n"


def test_stage2_reads_and_encodes_its_pictures_a_chunk_at_a_time(tmp_path: Path) -> None:
    """Chunked caching gives every sample the features of one pass over all of them, and keeps no
    pixels (36,000 pictures' pixels did not fit 24 GB)."""
    import torch

    from minicpmv.api import load
    from minicpmv.train.data import build_dataset
    from minicpmv.train.demo_llm import cache_features, cached_dataset, save_weights

    model, _ = _tiny_model(tmp_path)
    save_weights(model, tmp_path / "init")
    data = qa.write_split(tmp_path / "data", "train", 9, 0)
    chat = load(str(tmp_path / "init"), dtype="float32")
    whole, _ = build_dataset(chat.processor, data, 1024)
    want = cache_features(chat.model, whole)
    samples, cache = cached_dataset(chat.model, chat.processor, data, 1024, chunk=4)
    assert [(s.id, s.input_ids, s.labels) for s in samples] == [(s.id, s.input_ids, s.labels) for s in whole]
    assert all(s.pixel_values == [] for s in samples) and any(s.pixel_values for s in whole)
    assert cache.keys() == want.keys()
    for k, v in want.items():
        assert (v is None and cache[k] is None) or torch.equal(cache[k], v), k


def test_stage2_can_learn_the_shape_questions_alone_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With stage2_first_steps, the first steps see no text picture; then come the epochs over the
    whole mix (text pictures included), and the weights differ from a whole-mix-only run (0)."""
    import math

    from minicpmv.train import demo_llm

    seen: list[list[str]] = []
    collate = demo_llm.collate

    def spy(group: list[demo_llm.Sample]) -> dict:
        seen.append([s.id for s in group])
        return collate(group)

    plain = demo.run(demo.DemoConfig(**{**_tiny(tmp_path / "a").__dict__, "train_images": 24, "stage2_first_steps": 0}))
    monkeypatch.setattr(demo_llm, "collate", spy)
    cfg = demo.DemoConfig(**{**_tiny(tmp_path / "b").__dict__, "stage2_first_steps": 4, "train_images": 24})
    two = demo.run(cfg, stage1_from=tmp_path / "a")
    text = demo_llm.text_picture_ids(tmp_path / "b" / "data" / "train.json")
    assert 0 < len(text) < 24
    assert len(seen) == 4 + math.ceil(24 / 6)
    assert not text & {i for group in seen[:4] for i in group}
    assert sorted(i for group in seen[4:] for i in group) == sorted(f"train-{i}" for i in range(24))
    assert two["weights_sha256"] != plain["weights_sha256"]


def test_step_counts_out_of_range_are_refused_in_one_line(tmp_path: Path) -> None:
    """Negative step counts (stage 1's and stage 2's) are refused before stage 1; shapes-first
    steps over a split with nothing but text pictures too (they would wait forever for a batch)."""
    from minicpmv.train.demo_llm import train_llm

    with pytest.raises(InputError, match="stage2_first_steps must be 0 or more, not -1"):
        demo.run(demo.DemoConfig(**{**_tiny(tmp_path / "a").__dict__, "stage2_first_steps": -1}))
    assert not (tmp_path / "a").exists()
    for name in (*demo.STEP_COUNTS, "eval_items"):  # a negative evaluation size printed an empty table at the end
        with pytest.raises(InputError, match=f"^{name} must be 0 or more, not -2$"):
            demo.run(demo.DemoConfig(**{**_tiny(tmp_path / "a").__dict__, name: -2}))
    assert not (tmp_path / "a").exists()
    demo.run(_tiny(tmp_path / "b"))
    data = qa.write_split(tmp_path / "data", "train", 3, 0, weights={"text": 1.0})
    with pytest.raises(InputError, match="holds only text pictures: nothing for stage2_first_steps"):
        train_llm(tmp_path / "b" / "init", data, tmp_path / "final", _tiny(tmp_path / "c"), demo._device("cpu"))


def test_bundle_copies_a_finished_run_with_its_card(tmp_path: Path) -> None:
    """The card names how the run was made; a run started from another's stage 1 gets the totals
    with that stage 1 added back; weights that no longer match the report are refused."""
    demo.run(_tiny(tmp_path / "a"))
    report = demo.run(_tiny(tmp_path / "b"), stage1_from=tmp_path / "a")
    card = demo.bundle(tmp_path / "b", tmp_path / "dest", command="train-demo")
    assert card["weights_sha256"] == demo.sha256(tmp_path / "dest" / "model.safetensors") == report["weights_sha256"]
    assert card["stage1_reused"] is True and card["stage1_from"] == str(tmp_path / "a")
    t = report["times"]
    assert card["times_s"]["total_with_stage1_wall_s"] == round(t["total_wall_s"] + t["stage1_wall_s"], 1)
    assert json.loads((tmp_path / "dest" / "DEMO_CARD.json").read_text()) == card
    assert "total_with_stage1_wall_s" not in demo.bundle(tmp_path / "a", tmp_path / "dest2", command="x")["times_s"]
    (tmp_path / "b" / "final" / "model.safetensors").write_bytes(b"changed")
    with pytest.raises(InputError, match="does not match the hash"):
        demo.bundle(tmp_path / "b", tmp_path / "dest3", command="train-demo")


def test_train_demo_cli_rejects_unknown_or_malformed_settings(tmp_path: Path, capsys) -> None:
    """One line on stderr and exit status 2, as every other input error of the CLI; nothing runs."""
    from minicpmv.cli import main

    for item, message in [("nope=1", "unknown setting 'nope' in --set"),
                          ("seed=maybe", "--set seed takes an int, not 'maybe'"),
                          ("stage1_lr=fast", "--set stage1_lr takes a float, not 'fast'"),
                          ("stage2_open_world=perhaps", "--set stage2_open_world takes true or false, not 'perhaps'"),
                          ("stage1_steps", "--set takes FIELD=VALUE, got 'stage1_steps'")]:
        assert main(["train-demo", "--output", str(tmp_path / "x"), "--set", item]) == 2
        err = capsys.readouterr().err
        assert err.startswith("minicpmv: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x").exists()


def test_ci_installs_the_training_and_evaluation_fonts() -> None:
    ci = (Path(__file__).resolve().parents[2] / ".ci" / "run").read_text()
    for package in (*syn.FONT_PACKAGES, "fonts-dejavu-core", "fonts-liberation", "fonts-freefont-ttf"):
        assert package in ci, package
    syn.check_fonts()


def _tiny_model(tmp_path: Path):
    cfg = demo.DemoConfig(output=str(tmp_path), vision_width=64, vision_layers=1, llm_width=128, llm_layers=1)
    init = tmp_path / "init"
    demo.write_configs(init, cfg, demo.write_tokenizer(init))
    return demo.build_model(init, 0), cfg


def test_patch_embedding_starts_as_whitening_of_training_patches(tmp_path: Path) -> None:
    import torch

    from minicpmv.processing.image import to_patches
    from minicpmv.train import demo_vision as dv

    model, _ = _tiny_model(tmp_path)
    dv.whitened_patch_init(model, random.Random(1), pictures=24)
    conv = model.vpm.embeddings.patch_embedding
    w = conv.weight.detach().reshape(conv.weight.shape[0], -1).double()  # [Dv, 3*P*P]
    gram = w @ w.T  # principal directions are orthogonal: off-diagonal zero
    assert (gram - torch.diag(torch.diagonal(gram))).abs().max() < 1e-3 * gram.diagonal().max()
    rng = random.Random(2)  # pictures the init did not see: each channel's spread is about 0.5
    pix = torch.stack([torch.from_numpy(to_patches(dv.picture(rng, (224, 224))[0])) for _ in range(12)])
    with torch.no_grad():
        out = conv(pix)  # [B, Dv, 1, L]
    std = out.std(dim=(0, 2, 3))  # [Dv]
    assert 0.3 < float(std[:8].mean()) < 0.7 and float(out.mean().abs()) < 0.1
    assert float(std[0]) > float(std[-1])  # the floor keeps the weakest directions small


def _record_batch_kinds(monkeypatch: pytest.MonkeyPatch) -> list[str | None]:
    """The kind asked of each training batch drawn from now on (``None``: the mixed kinds)."""
    from minicpmv.train import demo_vision as dv

    drawn: list[str | None] = []
    real_batch = dv.batch

    def spy(rng: random.Random, n: int, device: object, kind: str | None = None):  # noqa: ANN202
        drawn.append(kind)
        return real_batch(rng, n, device, kind)

    monkeypatch.setattr(dv, "batch", spy)
    return drawn


@pytest.mark.parametrize(("warmup", "head", "kinds"), [("shape", "shape", ["shapes"] * 3), ("char", "char", []),
                                                       ("text", "char", ["text"] * 3)])
def test_warmups_train_only_the_tower_and_their_head(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, warmup: str,
                                                     head: str, kinds: list[str]) -> None:
    import torch

    from minicpmv.train import demo_vision as dv

    drawn = _record_batch_kinds(monkeypatch)
    model, cfg = _tiny_model(tmp_path)
    cfg.shape_warmup_steps, cfg.char_warmup_steps, cfg.text_warmup_steps, cfg.stage1_batch = 3, 3, 3, 2
    heads = dv.DenseHeads(cfg.vision_width, model.config.text.hidden_size)
    def state() -> dict[str, torch.Tensor]:
        return {n: t.clone() for n, t in [*model.state_dict().items(), *heads.state_dict().items()]}

    before = state()
    getattr(dv, f"{warmup}_warmup")(model, heads, cfg, torch.device("cpu"))
    changed = {n for n, t in state().items() if not torch.equal(t, before[n])}
    assert "vpm.embeddings.patch_embedding.weight" in changed and f"patch.{head}.weight" in changed
    assert not {n for n in changed if not (n.startswith("vpm.") or n.startswith(f"patch.{head}."))}
    assert drawn == kinds  # the pictures of its own target: shapes, the character grid, text


def test_slot_text_phase_trains_only_the_resampler_and_its_heads(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Text pictures (character and length heads) every other batch, the mixed kinds between."""
    import torch

    from minicpmv.train import demo_vision as dv

    drawn = _record_batch_kinds(monkeypatch)
    model, cfg = _tiny_model(tmp_path)
    cfg.slot_text_steps, cfg.stage1_batch = 3, 2
    heads = dv.DenseHeads(cfg.vision_width, model.config.text.hidden_size)
    before = {n: t.clone() for n, t in [*model.state_dict().items(), *heads.state_dict().items()]}
    accuracy = dv.slot_text_phase(model, heads, cfg, torch.device("cpu"))
    after = dict([*model.state_dict().items(), *heads.state_dict().items()])
    changed = {n for n, t in after.items() if not torch.equal(t, before[n])}
    assert {"resampler.query", "slot.char.weight", "slot.nchars.weight", "slot.colour.weight"} <= changed
    assert not {n for n in changed if not n.startswith(("resampler.", "norm.", "slot."))}
    assert drawn == ["text", None, "text"] and 0.0 <= accuracy <= 1.0


def test_stage1_runs_the_slot_phase_last_and_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from minicpmv.train import demo_vision as dv

    model, cfg = _tiny_model(tmp_path)
    cfg.shape_warmup_steps, cfg.stage1_steps, cfg.stage1_batch = 1, 1, 2
    assert "slot_text_char_acc" not in dv.pretrain_vision(model, cfg, torch.device("cpu"))
    drawn = _record_batch_kinds(monkeypatch)
    cfg.slot_text_steps = 2
    final = dv.pretrain_vision(model, cfg, torch.device("cpu"))
    assert drawn == ["shapes", None, "text", None] and 0.0 <= final["slot_text_char_acc"] <= 1.0


def test_character_slot_accuracy_of_actual_characters_leaves_out_none_and_unsupervised_slots() -> None:
    import torch

    from minicpmv.train import demo_vision as dv

    torch.manual_seed(0)
    heads = dv.DenseHeads(8, 16)
    feats = torch.randn(2, 5, 16)  # [B, Q, H]
    with torch.no_grad():
        guess = heads.slot["char"](heads.norm(feats)).argmax(-1)  # [B, Q]
    some = guess.clamp_min(1)  # a character id at each slot, the head's guess where that is one
    target = torch.tensor([[some[0, 0], 0, -100, some[0, 3] % 62 + 1, 0], [0, some[1, 1], -100, -100, 0]])
    out = heads.slots(feats, {"s_char": target}, ("char",))
    actual = target > 0
    expected = (guess == target)[actual].float().mean()
    assert actual.sum() == 3 and torch.equal(out["s_char_real_acc"], expected)
    assert not torch.equal(out["s_char_acc"], expected)  # "none" slots counted there


def test_a_stage1_record_from_before_a_setting_existed_counts_as_that_settings_old_value(tmp_path: Path) -> None:
    """A stage 1 recorded before ``slot_text_steps`` existed was trained without that phase: it is
    reused at 0 and refused, naming the setting, at any other value."""
    import json

    cfg = _tiny(tmp_path)
    init = tmp_path / "init"
    init.mkdir()
    (init / "model.safetensors").write_bytes(b"weights")
    key = {k: v for k, v in demo._stage1_key(cfg).items() if k != "slot_text_steps"}
    record = {"key": key, "weights_sha256": demo.sha256(init / "model.safetensors")}
    (init / "stage1.json").write_text(json.dumps(record))
    assert demo.finished_stage1(init, cfg) is not None
    with pytest.raises(InputError, match=r"other settings \(slot_text_steps 0 there, 2 now\)"):
        demo.finished_stage1(init, demo.DemoConfig(**{**cfg.__dict__, "slot_text_steps": 2}))


# Settings added after the bundled run, with the value that leaves that run's recipe unchanged.
ADDED_SINCE_THE_BUNDLED_RUN: dict[str, object] = {"text_warmup_steps": 0, "slot_text_steps": 0}


def test_the_recipe_defaults_are_those_of_the_bundled_run() -> None:
    """The card's command is `train-demo` with this commit's defaults, so they must be the settings
    the card records (where the run was placed and how many threads it took aside)."""
    card = json.loads((Path(demo.__file__).parent.parent / "demo_model" / "DEMO_CARD.json").read_text())
    defaults = demo.DemoConfig(output="x").__dict__
    ran = {k: v for k, v in card["config"].items() if k not in ("output", "threads")}
    assert ran == {k: defaults[k] for k in ran}
    assert {k: defaults[k] for k in defaults.keys() - ran.keys() - {"output", "threads"}} == ADDED_SINCE_THE_BUNDLED_RUN


def _ink_per_cell(img, ink: tuple[int, int, int], paper: tuple[int, int, int]) -> np.ndarray:
    """Fraction of each patch cell's pixels nearer the ink than 60% of the paper's distance to it
    (anti-aliased strokes of small fonts included). [cells]"""
    dist = np.abs(np.asarray(img, np.int32) - np.asarray(ink)).sum(-1)  # [H, W]
    a = dist < 0.6 * np.abs(np.asarray(paper) - np.asarray(ink)).sum()  # [H, W]
    side = syn.VIEW // syn.PATCH
    return a.reshape(side, syn.PATCH, side, syn.PATCH).mean(axis=(1, 3)).reshape(-1)


@pytest.mark.parametrize("jitter", [0, 3])
def test_char_grid_labels_the_cells_its_characters_are_drawn_in(jitter: int) -> None:
    rng = random.Random(7)
    for _ in range(5):
        img, labels = syn.char_grid(rng, jitter)
        assert img.size == (syn.VIEW, syn.VIEW) and labels.shape == ((syn.VIEW // syn.PATCH) ** 2,)
        assert (labels > 0).sum() == 40 and labels.max() <= len(ALPHABET)
        corner = img.getpixel((0, 0))
        ink = (0, 0, 0) if sum(corner) > 380 else (255, 255, 255)
        cells = _ink_per_cell(img, ink, corner)
        on, off = cells[labels > 0], cells[labels == 0]
        assert (on > 0).all(), "a labelled cell holds no ink"
        assert on.mean() > 4 * off.mean()
        shifted = np.roll(labels, 1)  # labels one cell off: the check above sees it
        assert not (cells[shifted > 0] > 0).all() or cells[shifted > 0].mean() < 4 * cells[shifted == 0].mean()


def test_the_tokenizer_stage1_writes_is_the_bundled_models(tmp_path: Path) -> None:
    """Stage 1 writes the tokenizer from the training words, so a question list that grows (stage 2's
    open off-world questions included) must leave it as the bundled model has it."""
    demo.write_tokenizer(tmp_path)
    bundled = Path(demo.__file__).parent.parent / "demo_model"
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_bytes() == (bundled / name).read_bytes(), name


def test_off_world_questions_name_nothing_of_the_models_world() -> None:
    rng = random.Random(3)
    world = {*COLOURS, *SHAPES, *(w for p in POSITIONS for w in p.split()), "text", "shape", "colour", "color",
             "written", "letters"}
    seen = set()
    for _ in range(2000):
        q = qa.off_world_question(rng)
        words = {w.strip("?.,'s").lower() for w in q.split()}
        assert not words & world, q
        seen.add(q)
    assert len(seen) > 1000  # open lists, not a handful of fixed questions
    def refused(open_world: bool) -> set[str]:
        scenes = [syn.make_scene(random.Random(s), kind) for s in range(150) for kind in ("shapes", "text", "other")]
        return {q for s in scenes for q, a in qa.scene_turns(s, random.Random(s.seed), 4, open_world) if a == REFUSAL}

    composed = {qa.off_world_question(rng) for _ in range(20000)} - set(qa.T["oow"])
    assert not refused(False) & composed  # setting off (the earlier recipes): the closed list only
    assert len(refused(True) & composed) > 20  # stage2_open_world (the recipe's default): composed ones too


def test_stage1_draws_its_own_other_styles_and_stage2_adds_more() -> None:
    from minicpmv.train.synthetic_other import draw_other

    rng = random.Random(4)
    assert {syn.make_scene(rng, "other").style for _ in range(400)} == set(syn.OTHER_STYLES)
    for style in set(syn.STAGE2_OTHER_STYLES) - set(syn.OTHER_STYLES):
        for seed in range(3):
            bg = Image.new("RGB", (320, 240), (240, 240, 240))
            a = np.asarray(draw_other(bg.copy(), style, random.Random(seed)), np.int32)  # [h, w, 3]
            b = np.asarray(draw_other(bg.copy(), style, random.Random(seed)), np.int32)
            assert a.shape == (240, 320, 3) and (a == b).all(), style
            assert (np.abs(a - 240).sum(-1) > 30).mean() > 0.003, f"{style} drew next to nothing"  # a stick figure: ~1%


def _fake_scikit_image(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, int, int]]:
    """A stand-in skimage/data with each photo a plain colour of its own; returns the colours."""
    import functools
    import importlib.util
    import types

    from minicpmv.train import synthetic_other as so

    data = tmp_path / "skimage" / "data"
    data.mkdir(parents=True)
    colours = [(10 * i, 255 - 10 * i, 7 * i) for i in range(len(so.PHOTO_FILES))]
    for name, colour in zip(so.PHOTO_FILES, colours, strict=True):
        Image.new("RGB", (300, 200), colour).save(data / name)
    real = importlib.util.find_spec
    spec = types.SimpleNamespace(submodule_search_locations=[str(data.parent)])
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: spec if name == "skimage" else real(name, *a))
    monkeypatch.setattr(so, "_photos", functools.lru_cache(maxsize=1)(so._photos.__wrapped__))  # a cache of its own
    return colours


def test_real_photos_come_from_scikit_image_only_when_asked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from minicpmv.train.synthetic_other import draw_other

    colours = _fake_scikit_image(tmp_path, monkeypatch)
    img = draw_other(Image.new("RGB", (224, 160)), "real_photo", random.Random(0))
    assert img.size == (224, 160) and img.getpixel((100, 80)) in colours

    def photo_records(real_photos: bool) -> int:
        out = tmp_path / f"split-{real_photos}"
        recs = json.loads(qa.write_split(out, "train", 80, 0, real_photos=real_photos).read_text())
        others = [r for r in recs if r.get("kind") == "other"]
        return sum(len(Image.open(out / r["image"]).getcolors(1) or []) == 1 for r in others)

    assert photo_records(False) == 0 and photo_records(True) > 0


def test_missing_real_photos_are_refused_before_stage1(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    cfg = _tiny(tmp_path / "run")
    cfg.stage2_real_photos = True
    with pytest.raises(InputError, match="pip install scikit-image"):
        demo.run(cfg)
    assert not (tmp_path / "run" / "init").exists()
