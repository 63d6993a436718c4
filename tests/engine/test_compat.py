"""The quirk seam: id-0 handling, answer post-processing and its stream rules, thinking guard."""

from __future__ import annotations

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minicpmv.engine import compat
from minicpmv.engine.stream import TextStream
from minicpmv.errors import InputError
from minicpmv.versions import get_version


def test_attention_mask_hides_padding_and_optionally_id0() -> None:
    ids, pads = compat.left_pad([[5, 0, 6], [7]])
    assert ids.tolist() == [[5, 0, 6], [0, 0, 7]] and pads == [0, 2]
    assert compat.attention_mask(ids, pads, hide_id0=True).tolist() == [[1, 0, 1], [0, 0, 1]]
    assert compat.attention_mask(ids, pads, hide_id0=False).tolist() == [[1, 1, 1], [0, 0, 1]]
    assert compat.shift_bounds([[(1, 2)], [(0, 1)]], pads) == [[(1, 2)], [(2, 3)]]


def test_prompt_mask_follows_the_release_and_the_switch() -> None:
    assert compat.prompt_hides_id0(get_version("2.6"), True)
    assert not compat.prompt_hides_id0(get_version("2.6"), False)
    assert not compat.prompt_hides_id0(get_version("2.5"), True)  # generate() got no mask there


def test_postprocess_rules(model45) -> None:
    tok, v = model45.tokenizer, model45.version
    eos, bos = model45.terminator_ids()[0], tok.bos_token_id
    word = tok.encode(" hello")
    assert compat.postprocess([bos, 0, *word, 0, eos], v, tok, id0_quirk=True) == "hello"
    kept = compat.postprocess([bos, 0, *word, eos], v, tok, id0_quirk=False)
    assert kept == tok.decode([0, *word]).strip()  # without the quirk id 0 stays (a leading bos still goes)
    assert compat.postprocess([*word, eos, eos], v, tok, id0_quirk=True).endswith(tok.id_to_token(eos))


def test_thinking_guard_and_prefix() -> None:
    v26, v45 = get_version("2.6"), get_version("4.5")
    with pytest.raises(InputError, match="thinking"):
        compat.check_thinking(v26, True)
    compat.check_thinking(v45, True)
    assert (compat.thinking_flag(v26, True), compat.thinking_flag(v45, False)) == (None, False)
    assert (compat.thinking_prefix(v45, True), compat.thinking_prefix(v45, False)) == ("<think>\n", "")
    assert compat.thinking_prefix(v26, True) == ""


@pytest.mark.parametrize("quirk", [True, False])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_the_stream_rules_give_the_postprocessed_answer(model, quirk, data) -> None:
    """For any answer ending at a terminator (or cut at the limit), streaming through
    ``answer_rules`` gives exactly ``postprocess``'s text, one id at a time."""
    tok, v = model.tokenizer, model.version
    eos = model.terminator_ids()
    body = data.draw(st.lists(st.integers(0, tok.vocab_size - 1).filter(lambda i: i not in eos), max_size=12))
    ids = body + ([eos[0]] if data.draw(st.booleans()) else [])
    text = TextStream(model.runner.decode, compat.answer_rules(v, tok, id0_quirk=quirk))
    streamed = "".join(text.feed(i).text for i in ids) + text.finish("stop").text
    assert streamed == compat.postprocess(ids, v, tok, id0_quirk=quirk)


@pytest.mark.parametrize("quirk", [True, False])
def test_a_dropped_id0_before_the_bos_keeps_the_bos_leading(model, quirk) -> None:
    """[0, bos] with the id-0 quirk: postprocess drops the 0, then the leading bos; the stream
    must too (found by the property test above: it streamed the bos's text)."""
    tok, v = model.tokenizer, model.version
    if tok.bos_token_id is None:
        pytest.skip("this tokenizer has no bos")
    for ids in ([0, tok.bos_token_id], [0, 0, tok.bos_token_id, 5], [tok.bos_token_id, tok.bos_token_id]):
        text = TextStream(model.runner.decode, compat.answer_rules(v, tok, id0_quirk=quirk))
        streamed = "".join(text.feed(i).text for i in ids) + text.finish("stop").text
        assert streamed == compat.postprocess(ids, v, tok, id0_quirk=quirk), ids


def test_official_stream_rules_keep_id0_and_whitespace(model26) -> None:
    tok = model26.tokenizer
    rules = compat.official_stream_rules(model26.version, tok)
    assert 0 not in rules.hidden_ids and not rules.strip and not rules.leading_ids
    assert set(rules.hidden_ids) == set(model26.terminator_ids())
    assert all(tok.id_to_token(i) in rules.strip_texts for i in model26.terminator_ids())


def test_a_prepared_batch_uses_the_seam(model26) -> None:
    conv = [{"role": "user", "content": ["A ! B"]}]
    inputs = model26.processor([conv, [{"role": "user", "content": ["much longer question here"]}]])
    with torch.inference_mode():
        batch = model26.runner.prepare(inputs)
    ids, pads = compat.left_pad(inputs.input_ids)
    assert torch.equal(batch.input_ids, ids) and batch.pad_lengths == pads
    assert torch.equal(batch.attention_mask, compat.attention_mask(ids, pads, hide_id0=True))
