"""ChatModel.chat on the tiny checkpoints: batching, caching, streaming, thinking, errors."""

from __future__ import annotations

import pytest
import torch

import minicpmv
from minicpmv.engine.compat import attention_mask, left_pad
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import ContextLengthError, InputError, PlaceholderMismatchError

from .conftest import case_image

GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=12)


def _convs(version: str):
    img_a = case_image(version, "single_448")
    img_b = case_image(version, "multi_image_2", 1)
    return [
        [{"role": "user", "content": [img_a, "What is shown here?"]}],
        [{"role": "user", "content": ["Tell me a story about the sea."]}],
        [{"role": "user", "content": [img_b, "Describe it.", img_a, "And compare."]}],
    ]


def _version(cm) -> str:
    return cm.version.name


def test_batched_equals_single(model):
    convs = _convs(_version(model))
    batched = model.chat(convs, **GREEDY)
    single = [model.chat(c, **GREEDY) for c in convs]
    assert batched == single


def test_batched_beam_equals_single(model):
    convs = _convs(_version(model))[:2]
    kw = dict(sampling=False, max_new_tokens=8)
    assert model.chat(convs, **kw) == [model.chat(c, **kw) for c in convs]


def _greedy_without_cache(cm, conv, n):
    """Reference loop: recompute the whole sequence every step (no KV cache)."""
    batch = cm.runner.prepare(cm.processor([conv]))
    embeds, mask = batch.inputs_embeds, batch.attention_mask
    out = []
    for _ in range(n):
        pos = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)
        logits = cm.model.forward(embeds, pos, mask, cache=None, last_only=True)
        tok = int(logits[0, -1].argmax())
        out.append(tok)
        embeds = torch.cat([embeds, cm.model.embed_tokens(torch.tensor([[tok]]))], dim=1)
        mask = torch.cat([mask, torch.ones(1, 1, dtype=mask.dtype)], dim=1)
    return out


def test_cached_equals_uncached(model):
    conv = _convs(_version(model))[0]
    with torch.inference_mode():
        batch = model.runner.prepare(model.processor([conv]))
        p = SamplingParams.from_official(model.version, sampling=False, max_new_tokens=10, min_new_tokens=10,
                                         overrides={"num_beams": 1, "repetition_penalty": 1.0})
        cached = model.runner.generate_ids(batch, p)[0]
        uncached = _greedy_without_cache(model, conv, 10)
    assert len(cached) == 10 and cached == uncached  # min_new_tokens=10: ten tokens whatever they are


def test_official_stream_is_the_unstripped_decode(model):
    """The reference streamer: every generated id decoded (terminator strings removed), no strip."""
    conv = _convs(_version(model))[1]
    chunks = list(model.chat(conv, stream=True, **GREEDY))
    assert chunks and all(isinstance(c, str) and c for c in chunks)
    with torch.inference_mode():
        ids = model.runner.generate_ids(model.runner.prepare(model.processor([conv]), id0_quirk=False),
                                        SamplingParams(max_new_tokens=12))[0]
    assert model.chat(conv, **GREEDY) == model.runner.postprocess(ids)  # spec 9.4, exactly
    shown = [t for t in ids if t not in model.terminator_ids()]
    assert shown and "".join(chunks) == model.tokenizer.decode(shown, skip_special_tokens=False)


def test_respond_stream_concatenates_to_chat_answer(model):
    conv = _convs(_version(model))[1]
    full = model.chat(conv, **GREEDY)
    events = list(model.respond(conv, stream=True, **GREEDY))
    assert "".join(e.text for e in events) == full and full
    assert events[-1].finish_reason in ("stop", "length") and all(e.finish_reason is None for e in events[:-1])
    response = model.respond(conv, **GREEDY)
    assert (response.text, response.content, response.reasoning) == (full, full, None)


def test_thinking_prefix_45(model45):
    conv = [{"role": "user", "content": ["Why is the sky blue?"]}]
    ans = model45.chat(conv, enable_thinking=True, **GREEDY)
    assert ans.startswith("<think>\n")
    chunks = list(model45.chat(conv, enable_thinking=True, stream=True, **GREEDY))
    assert chunks[: len("<think>\n")] == list("<think>\n")


def test_thinking_rejected_on_26(model26):
    with pytest.raises(InputError, match="thinking"):
        model26.chat([{"role": "user", "content": ["hi"]}], enable_thinking=True)


def test_seeded_sampling_is_reproducible(model):
    conv = _convs(_version(model))[1]
    a = model.chat(conv, max_new_tokens=8, seed=7)
    b = model.chat(conv, max_new_tokens=8, seed=7)
    assert a == b
    # and it really samples: other seeds give other answers, and not (only) the greedy one
    others = {model.chat(conv, max_new_tokens=8, seed=s) for s in (8, 9, 10)}
    greedy = model.chat(conv, **{**GREEDY, "max_new_tokens": 8})
    assert len(others | {a}) > 1 and (others | {a}) != {greedy}


def test_id0_quirk_switch(model26):
    conv = [{"role": "user", "content": ["Stop right there ! Now ! Go"]}]
    ids = model26.processor([conv]).input_ids[0]
    assert 0 in ids  # a lone "!" is token 0
    padded, pads = left_pad([ids])
    on = attention_mask(padded, pads, hide_id0=True)
    off = attention_mask(padded, pads, hide_id0=False)
    assert int(on.sum()) < int(off.sum()) == len(ids)
    inputs = model26.processor([conv])
    with torch.inference_mode():
        assert model26.runner.prepare(inputs).attention_mask.tolist() == on.tolist()
        assert model26.runner.prepare(inputs, id0_quirk=False).attention_mask.tolist() == off.tolist()
    # both modes run; the official mode is the default
    assert isinstance(model26.chat(conv, id0_quirk=False, **GREEDY), str)


def test_image_argument_goes_first(model26):
    img = case_image("2.6", "single_448")
    a = model26.chat('[{"role": "user", "content": "What is it?"}]', image=img, **GREEDY)
    b = model26.chat([{"role": "user", "content": [img, "What is it?"]}], **GREEDY)
    assert a == b


@pytest.mark.parametrize(
    "msgs,err",
    [
        ([], InputError),
        ("not json", InputError),
        ([{"role": "assistant", "content": "hi"}], InputError),
        ([{"role": "user", "content": [3.5]}], InputError),
        ([{"role": "user", "content": ["(<image>./</image>) what?"]}], PlaceholderMismatchError),
        ([{"role": "user"}], InputError),
    ],
)
def test_bad_messages(model26, msgs, err):
    with pytest.raises(err):
        model26.chat(msgs, **GREEDY)


def test_prompt_longer_than_context(model26):
    img = case_image("2.6", "single_448")
    with pytest.raises(ContextLengthError):
        model26.chat([{"role": "user", "content": [img, "x"]}], max_inp_length=40, **GREEDY)
    long_text = "word " * (model26.config.text.max_position_embeddings + 10)
    with pytest.raises(ContextLengthError, match="context"):
        model26.chat([{"role": "user", "content": [long_text]}], max_inp_length=10**6, **GREEDY)


def test_unknown_version(tmp_path):
    import json
    import shutil

    from .conftest import CONF

    ckpt = tmp_path / "ckpt"
    shutil.copytree(CONF / "2.6" / "_checkpoint", ckpt)
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["version"] = 3.1
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(minicpmv.UnknownVersionError, match="2.6, o2.6, 4.0, 4.5"):
        minicpmv.load(ckpt, dtype="float32")


def test_missing_image_file(model26, tmp_path):
    with pytest.raises(minicpmv.ImageError):
        model26.chat([{"role": "user", "content": [{"type": "image", "image": str(tmp_path / "nope.png")}, "hi"]}])


def test_load_with_static_decoding_answers_like_eager(model45):
    """``load(compile="static")``: the static-shape decode step (what ``compile=True`` compiles)
    for single, batched (left-padded rows) and streamed calls, sampled ones too."""
    from .conftest import CONF

    static = minicpmv.load(CONF / "4.5" / "_checkpoint", dtype="float32", compile="static")
    assert static.runner.decode_mode.static and static.runner.decode_mode.compile is None
    convs = _convs("4.5")
    assert static.chat(convs, **GREEDY) == model45.chat(convs, **GREEDY)
    assert static.chat(convs[0], seed=3, max_new_tokens=10) == model45.chat(convs[0], seed=3, max_new_tokens=10)
    assert "".join(static.chat(convs[2], stream=True, **GREEDY)) == model45.chat(convs[2], **GREEDY)
