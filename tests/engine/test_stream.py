"""StreamDecoder (multi-byte safety, context-dependent decoders, HF word chunks) and StopMatcher."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicpmv.engine.stream import StopMatcher, StreamDecoder, TextEvent
from minicpmv.errors import InputError

TEXT = "héllo wörld 你好 🙂!\nnext línea"


@pytest.mark.parametrize("chunk", [1, 2, 3, 5])
def test_deltas_concatenate_to_full_text_without_partial_chars(byte_tokenizer, chunk: int) -> None:
    ids = byte_tokenizer.encode(TEXT) + [256]
    dec = StreamDecoder(byte_tokenizer.decode)
    deltas = [dec.feed(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    deltas.append(dec.flush())
    assert "".join(deltas) == TEXT + "<|im_end|>"
    assert not any("\ufffd" in d for d in deltas)
    assert dec.text == TEXT + "<|im_end|>" and dec.token_ids == ids


def test_multibyte_character_held_until_complete(byte_tokenizer) -> None:
    ni = list("你".encode())  # 3 bytes
    dec = StreamDecoder(byte_tokenizer.decode)
    assert dec.feed([ord("a")]) == "a"
    assert dec.feed(ni[0]) == ""
    assert dec.feed(ni[1]) == ""
    assert dec.feed(ni[2]) == "你"
    assert dec.flush() == ""


def test_incomplete_tail_is_flushed_at_the_end(byte_tokenizer) -> None:
    dec = StreamDecoder(byte_tokenizer.decode)
    assert dec.feed([ord("x")] + list("你".encode())[:2]) == "x"
    assert dec.flush() == byte_tokenizer.decode(list("你".encode())[:2])  # replacement chars


def test_invalid_byte_in_the_middle_does_not_block(byte_tokenizer) -> None:
    dec = StreamDecoder(byte_tokenizer.decode)
    assert dec.feed([0xFF]) == ""  # could be an incomplete tail as far as the decoder knows
    assert dec.feed([ord("o"), ord("k")]) == "\ufffdok"


def test_context_dependent_decoder() -> None:
    """SentencePiece-style decoding drops the leading space of the first piece only."""
    pieces = ["▁Hello", "▁wor", "ld", "!", "▁bye"]

    def decode(ids: list[int]) -> str:
        return "".join(pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")

    dec = StreamDecoder(decode)
    deltas = [dec.feed(i) for i in range(len(pieces))] + [dec.flush()]
    assert "".join(deltas) == "Hello world! bye"
    assert deltas[1] == " wor"


def test_word_chunking_matches_hf_text_streamer(byte_tokenizer) -> None:
    ids = byte_tokenizer.encode("ab cd\nef 你x")
    dec = StreamDecoder(byte_tokenizer.decode, chunking="word")
    deltas = [dec.feed(i) for i in ids]
    # bytes: a b ' ' c d '\n' e f ' ' E4 BD A0 x
    assert deltas == ["", "", "ab ", "", "", "cd\n", "", "", "ef ", "", "", "你", ""]
    assert dec.flush() == "x"


def test_event_flushes_on_finish(byte_tokenizer) -> None:
    dec = StreamDecoder(byte_tokenizer.decode)
    e1 = dec.event(list("é".encode())[:1])
    e2 = dec.event([ord("!")] + list("é".encode())[:1], finish_reason="length")
    assert e1 == TextEvent(delta="", token_ids=[0xC3], finish_reason=None)
    assert e2.finish_reason == "length" and e2.token_ids == [ord("!"), 0xC3]
    assert e1.delta + e2.delta == byte_tokenizer.decode([0xC3, ord("!"), 0xC3])


def test_bad_chunking_rejected(byte_tokenizer) -> None:
    with pytest.raises(InputError):
        StreamDecoder(byte_tokenizer.decode, chunking="line")  # type: ignore[arg-type]


def test_stop_matcher_holds_possible_prefix_and_trims_match() -> None:
    m = StopMatcher(["</s>", "STOP"])
    assert m.push("abc</") == ("abc", None)
    assert m.push("s>tail") == ("", "</s>")
    assert m.matched == "</s>"
    assert m.push("more") == ("", None)


def test_stop_matcher_releases_false_alarm_and_flushes() -> None:
    m = StopMatcher(["STOP"])
    assert m.push("xST") == ("x", None)
    assert m.push("x") == ("STx", None)
    assert m.push("ST") == ("", None)
    assert m.flush() == "ST"


def test_stop_matcher_earliest_match_and_overlaps() -> None:
    assert StopMatcher(["bc", "abcd"]).push("xabcdy") == ("x", "abcd")
    assert StopMatcher(["bc", "abcd"]).push("xbcabcd") == ("x", "bc")
    m = StopMatcher(["aab"])
    assert m.push("aaa") == ("a", None)
    assert m.push("b!") == ("", "aab")
    with pytest.raises(InputError):
        StopMatcher([""])


@settings(max_examples=200, deadline=None)
@given(
    data=st.lists(st.integers(0, 257), max_size=40),
    chunking=st.sampled_from(["token", "word"]),
    sizes=st.lists(st.integers(1, 4), min_size=1, max_size=5),
)
def test_any_byte_stream_concatenates_to_full_decode(byte_tokenizer, data, chunking, sizes) -> None:
    dec = StreamDecoder(byte_tokenizer.decode, chunking=chunking)
    out, i, k = [], 0, 0
    while i < len(data):
        n = sizes[k % len(sizes)]
        out.append(dec.feed(data[i : i + n]))
        i, k = i + n, k + 1
    out.append(dec.flush())
    assert "".join(out) == byte_tokenizer.decode(data)
