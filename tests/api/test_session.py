"""ChatSession: follow-up turns reuse image features and the KV cache, with identical tokens."""

from __future__ import annotations

import minicpmv

from .conftest import case_image

GREEDY = dict(sampling=False, num_beams=1, repetition_penalty=1.0, max_new_tokens=10)


def test_follow_up_equals_fresh_chat_without_reencoding(model):
    version = model.version.name
    img = case_image(version, "single_1920x1080")
    session = minicpmv.ChatSession(model, **GREEDY)
    a1 = session.ask([img, "What is in the picture?"])
    encoded = model.encoded_entries
    a2 = session.ask("What colour is the sky?")
    assert model.encoded_entries == encoded, "the follow-up turn encoded an image again"
    full = len(model.processor([session.history[:-1]]).input_ids[0])
    assert 0 < session.last_prefill_tokens < full / 4, "the follow-up re-ran the history"

    fresh = model.chat(
        [
            {"role": "user", "content": [img, "What is in the picture?"]},
            {"role": "assistant", "content": [a1]},
            {"role": "user", "content": ["What colour is the sky?"]},
        ],
        **GREEDY,
    )
    assert a2 == fresh


def test_new_image_in_later_turn_encodes_only_it(model26):
    img1 = case_image("2.6", "single_448")
    img2 = case_image("2.6", "multi_image_2", 1)
    session = minicpmv.ChatSession(model26, **GREEDY)
    session.ask([img1, "First?"])
    before = model26.encoded_entries
    session.ask([img2, "And this one?"])
    n_slices_img2 = len(model26.processor([[{"role": "user", "content": [img2, "x"]}]]).pixel_values[0])
    assert model26.encoded_entries - before == n_slices_img2


def test_stream_and_reset(model45):
    session = minicpmv.ChatSession(model45, enable_thinking=True, **GREEDY)
    text = "".join(session.ask("Hello there", stream=True))
    assert text.startswith("<think>\n")
    assert session.history[-1]["role"] == "assistant"
    session.reset()
    assert session.history == []


def test_static_decoding_session_equals_eager(model):
    """A session in the static-shape mode (its cache preallocated, reused across turns and grown
    when a turn needs more) answers every turn like the eager one; chat() borrows and returns a
    pooled static cache."""
    from minicpmv.engine.chat import ChatModel
    from minicpmv.engine.generate import DecodeMode
    from minicpmv.engine.kv_cache import StaticKVCache

    static = ChatModel(model.model, model.processor, model.version, model.config,
                       decode_mode=DecodeMode(static=True, capacity=64))
    img = case_image(model.version.name, "single_448")
    turns = [[img, "What is in the picture?"], "And the colours?", "Say more."]
    eager, fixed = minicpmv.ChatSession(model, **GREEDY), minicpmv.ChatSession(static, **GREEDY)
    for turn in turns:
        assert fixed.ask(turn) == eager.ask(turn)
    assert isinstance(fixed._cache, StaticKVCache) and fixed._cache.capacity % 64 == 0
    msgs = [{"role": "user", "content": [img, "Describe it."]}]
    assert static.chat(msgs, **GREEDY) == model.chat(msgs, **GREEDY)
    pooled = static.runner._idle_caches[1]
    assert static.chat(msgs, **GREEDY) == model.chat(msgs, **GREEDY) and static.runner._idle_caches[1] is pooled
