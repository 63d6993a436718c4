"""StreamDecoder (multi-byte safety, context-dependent decoders, HF word chunks) and StopMatcher."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minicpmv.engine.stream import AnswerRules, ReasoningSplitter, StopMatcher, StreamDecoder, TextStream
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


def test_text_stream_flushes_on_finish(byte_tokenizer) -> None:
    text = TextStream(byte_tokenizer.decode)
    e1 = text.feed(0xC3)
    e2 = text.feed(ord("!"))
    e3 = text.feed(0xC3)
    end = text.finish("length")
    assert (e1.text, e1.token_ids, e1.finish_reason) == ("", (0xC3,), None)
    assert end.finish_reason == "length" and end.token_ids == ()
    assert e1.text + e2.text + e3.text + end.text == byte_tokenizer.decode([0xC3, ord("!"), 0xC3])
    assert text.text == text.content and text.reasoning == "" and text.completion_tokens == 3


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


# ---------------------------------------------------------------------------- reasoning split
@pytest.mark.parametrize("text, reasoning, content", [
    ("plan it\n</think>\n\nthe answer", "plan it", "the answer"),
    ("no end tag, cut off\n", "no end tag, cut off\n", ""),
    ("</think>direct", "", "direct"),
    ("a</thi", "a</thi", ""),
    ("x\n\n</think>\n\ny\n</think>z", "x", "y\n</think>z"),
])
def test_reasoning_split_whole_and_char_by_char(text, reasoning, content) -> None:
    whole = ReasoningSplitter(True)
    r, c = whole.push(text)
    r2, c2 = whole.flush()
    assert (r + r2, c + c2) == (reasoning, content)
    split = ReasoningSplitter(True)
    parts = [split.push(ch) for ch in text] + [split.flush()]
    assert ("".join(p[0] for p in parts), "".join(p[1] for p in parts)) == (reasoning, content)


def test_reasoning_off_is_all_content() -> None:
    s = ReasoningSplitter(False)
    assert s.push("\nhello </think> x") == ("", "hello </think> x")


# ---------------------------------------------------------------------------- TextStream
def _chars(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def _stream(rules: AnswerRules | None = None, **kw) -> TextStream:
    return TextStream(_chars, rules or AnswerRules(), **kw)


def test_stop_string_across_tokens() -> None:
    text = _stream(stops=["STOP"])
    out = [text.feed(ord(ch)) for ch in "abc ST"]
    assert "".join(e.content for e in out) == "abc "  # "ST" is held: it may start the stop string
    assert text.feed(ord("O")).text == "" and not text.stopped
    text.feed(ord("P"))
    assert text.stopped and text.feed(ord("z")).text == ""
    assert text.finish("stop").text == "" and (text.reasoning, text.content) == ("", "abc ")
    assert text.completion_tokens == 9


def test_held_text_is_released_and_hidden_ids_are_counted_not_shown() -> None:
    text = _stream(AnswerRules(hidden_ids=frozenset({0})), stops=["STOP"], thinking=True)
    for ch in "why</think>ST":
        text.feed(ord(ch))
    text.feed(0)  # a terminator id: counted, not shown
    text.finish("stop")
    assert (text.reasoning, text.content, text.completion_tokens) == ("why", "ST", 14)
    assert text.text == "why</think>ST"


def test_leading_ids_only_at_the_start_and_strip_texts() -> None:
    rules = AnswerRules(leading_ids=frozenset({ord("^")}), strip_texts=("<e>",))
    text = _stream(rules)
    for ch in "^a^b<e>c":
        text.feed(ord(ch))
    text.finish("length")
    assert text.text == "a^bc"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=" \n\tab</think>", max_size=40), st.booleans())
def test_incremental_strip_equals_stripping_the_whole_answer(body: str, thinking: bool) -> None:
    """Whatever the chunks, a stripping stream gives the whole answer's .strip() (and the split
    of that), so a streamed answer concatenates to the returned one."""
    text = _stream(AnswerRules(strip=True), thinking=thinking)
    events = [text.feed(ord(ch)) for ch in body] + [text.finish("stop")]
    assert "".join(e.text for e in events) == body.strip() == text.text
    split = ReasoningSplitter(thinking)
    r, c = split.push(body.strip())
    r2, c2 = split.flush()
    assert ("".join(e.reasoning for e in events), "".join(e.content for e in events)) == (r + r2, c + c2)


def test_strip_would_fail_without_the_rule() -> None:
    text = _stream()
    for ch in "  x  ":
        text.feed(ord(ch))
    text.finish("stop")
    assert text.text == "  x  "  # the rule is what strips
