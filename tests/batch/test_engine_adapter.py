"""The engine adapter: greedy answers equal ``chat()``'s, batched equals alone, thinking goes to
``reasoning``, and a row's problem becomes that row's error."""

from __future__ import annotations

import pytest

from minicpmv.batch.engine_adapter import Answer, EngineAdapter, make_inputs, sampling_params
from minicpmv.errors import InputError

from .conftest import random_png

CHAT_GREEDY = {"sampling": False, "num_beams": 1, "repetition_penalty": 1.0, "id0_quirk": False}


def _conversations(tmp_path):
    from PIL import Image

    imgs = [Image.open(random_png(tmp_path / f"{i}.png", 40 + i, (60 + 40 * i, 50 + 10 * i))).convert("RGB")
            for i in range(3)]
    return [[{"role": "user", "content": [img, "What is this?"]}] for img in imgs] + [
        [{"role": "user", "content": ["Say something."]}]]


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_greedy_answers_equal_chat_and_batched_equals_alone(version, model26, model45, tmp_path):
    model = model26 if version == "2.6" else model45
    adapter = EngineAdapter(model, max_batch_size=4)
    settings = {"temperature": 0.0, "max_new_tokens": 10}
    convs = _conversations(tmp_path)
    items = [(make_inputs(model.processor, c, settings), settings) for c in convs]
    together = adapter.run(items)
    alone = [adapter.run([item])[0] for item in items]
    assert together == alone
    for conv, (inputs, _), got in zip(convs, items, together, strict=True):
        expected = model.chat(conv, max_new_tokens=10, **CHAT_GREEDY)
        assert got.answer == expected and got.error is None and got.reasoning is None
        assert got.prompt_tokens == len(inputs.input_ids[0]) and 1 <= got.completion_tokens <= 10
        assert got.finish_reason in ("stop", "length")


def test_thinking_answer_goes_to_reasoning(model45, tmp_path):
    adapter = EngineAdapter(model45, max_batch_size=2)
    settings = {"temperature": 0.0, "max_new_tokens": 12, "enable_thinking": True}
    conv = _conversations(tmp_path)[0]
    got = adapter.run([(make_inputs(model45.processor, conv, settings), settings)])[0]
    expected = model45.chat(conv, max_new_tokens=12, enable_thinking=True, **CHAT_GREEDY)
    # the tiny random model never closes </think> within 12 tokens: the whole answer is reasoning
    assert expected == "<think>\n" + got.reasoning and got.answer == ""
    plain = adapter.run([(make_inputs(model45.processor, conv, {}), {"temperature": 0.0, "max_new_tokens": 12})])[0]
    assert plain.reasoning is None and plain.answer == model45.chat(conv, max_new_tokens=12, **CHAT_GREEDY)


def test_row_problems_become_row_errors(model26, tmp_path):
    adapter = EngineAdapter(model26, max_batch_size=2, max_model_len=64)
    conv = _conversations(tmp_path)[2]  # an image: more than 64 prompt tokens
    settings = {"temperature": 0.0, "max_new_tokens": 4}
    too_long, bad_option = adapter.run([(make_inputs(model26.processor, conv, settings), settings),
                                        (make_inputs(model26.processor, conv, settings), {"top_p": 1.5})])
    assert too_long.error.startswith("ContextLengthError: the prompt has") and too_long.answer is None
    assert bad_option == Answer(error="InputError: invalid sampling parameter: top_p must be in [0, 1], got 1.5")
    with pytest.raises(InputError, match="no thinking mode"):
        make_inputs(model26.processor, conv, {"enable_thinking": True})


def test_sampling_defaults_are_the_official_preset(model26, model45):
    greedy = sampling_params(model26, {"temperature": 0})
    assert (greedy.greedy, greedy.top_k, greedy.top_p, greedy.repetition_penalty) == (True, 0, 1.0, 1.0)
    preset = sampling_params(model26, {"max_new_tokens": 3})
    assert (preset.temperature, preset.top_p, preset.top_k, preset.repetition_penalty) == (0.7, 0.8, 100, 1.05)
    assert preset.max_new_tokens == 3
    think = sampling_params(model45, {"enable_thinking": True, "top_k": 7, "seed": 1})
    assert (think.temperature, think.top_k, think.top_p, think.seed) == (0.7, 7, 1.0, 1)


def test_seeded_sampling_is_reproducible(model26, tmp_path):
    adapter = EngineAdapter(model26, max_batch_size=2)
    conv = _conversations(tmp_path)[3]
    settings = {"max_new_tokens": 8, "seed": 7, "temperature": 1.5}
    inputs = make_inputs(model26.processor, conv, settings)
    first, second = adapter.run([(inputs, settings), (inputs, settings)])
    other = adapter.run([(inputs, {**settings, "seed": 8})])[0]
    assert first == second and first.answer != other.answer
