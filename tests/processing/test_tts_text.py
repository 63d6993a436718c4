"""ChatTTS text front end: tokenizer loading variants, digit spelling, language, sentence ends,
the TTS condition string and its mask (the conformance vectors cover the official strings)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minicpmv.errors import TokenizerError
from minicpmv.processing.tts_text import (
    ChatTTSTokenizer,
    detect_language,
    normalize_stream_piece,
    prepare_tts_text,
    sentence_end,
    speech_text,
    spell_digits,
    text_mask,
)

TOK_DIR = Path(__file__).resolve().parents[1] / "data" / "conformance" / "o2.6-tts" / "_checkpoint" / "assets" / \
    "chattts_tokenizer"
META = json.loads((TOK_DIR.parents[2] / "text_frontend" / "meta.json").read_text())


@pytest.fixture(scope="module")
def tok():
    return ChatTTSTokenizer.from_dir(TOK_DIR)


def test_vocab_only_directory_gives_the_same_ids(tmp_path, tok):
    """transformers builds BertTokenizerFast from vocab.txt when tokenizer.json is absent."""
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(TOK_DIR / name, tmp_path / name)
    alt = ChatTTSTokenizer.from_dir(tmp_path)
    for s in META["strings"]:
        assert alt.encode(s["text"]) == tok.encode(s["text"])
        assert prepare_tts_text(alt, s["text"]).ids == prepare_tts_text(tok, s["text"]).ids


def test_normaliser_follows_tokenizer_config(tmp_path, tok):
    for f in TOK_DIR.iterdir():
        shutil.copy(f, tmp_path / f.name)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["do_lower_case"] = False
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    cased = ChatTTSTokenizer.from_dir(tmp_path)
    assert tok.tokens("Hello") == ["hello"]
    assert cased.tokens("Hello") != ["hello"]  # no lower-casing: "H" + "##ello" pieces
    assert tok.tokens("Café") == ["c", "##a", "##f", "##e"]  # accents stripped with lower-casing


def test_control_tokens_and_decode(tok):
    assert tok.encode("[Stts][spk_emb][Ptts]") == [195, 207, 196]
    assert tok.decode(tok.encode("hello , how are you ?")) == "hello, how are you?"
    assert tok.token_to_id("[Etts]") == 197 and tok.vocab_size == 242


def test_missing_or_broken_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        ChatTTSTokenizer.from_dir(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="neither tokenizer.json nor vocab.txt"):
        ChatTTSTokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{broken")
    with pytest.raises(TokenizerError, match="cannot read"):
        ChatTTSTokenizer.from_dir(tmp_path)


def test_digit_runs_are_spelled_at_their_first_occurrence():
    assert spell_digits("I have 23 books", "english") == "I have two three books"
    assert spell_digits("我有2个", "chinese") == "我有二个"
    # runs replaced in order, each at its first occurrence (a later "1" hits the earlier text)
    assert spell_digits("1 and 21", "english") == "one and two one"
    assert spell_digits("21 then 1", "english") == "two one then one"
    assert spell_digits("５ apples", "english") == " apples"  # full-width digits match \d but are not spelled
    assert spell_digits("no digits here", None) == "no digits here"
    assert normalize_stream_piece("**bold** 7", "english") == "bold seven"


def test_language_sentence_end_and_speech_text():
    assert detect_language("") == "chinese"  # 0 >= 0, as the official helper
    assert detect_language("ab中文") == "chinese" and detect_language("abc中文") == "english"
    assert sentence_end("costs 3.5 dollars") == ""  # a "." after a digit is not an end
    assert sentence_end("Hi. 3.5!") == "."
    assert sentence_end("pi is 3.14! yes") == "!"
    assert speech_text("a<|tts_bos|>Hello<|tts_eos|> tail") == "Hello"
    assert speech_text("x<|tts_bos|>y<|tts_bos|>z") == "z"
    assert speech_text("plain") == "plain"


def test_condition_string_pads_or_truncates(tok):
    short = prepare_tts_text(tok, "hello world")
    assert short.n_tokens == 2 and len(short.ids) == 303
    assert short.text.startswith("[Stts][spk_emb]hello world[Etts][PAD]") and short.text.endswith("[PAD][Ptts]")
    assert short.ids[:5] == [195, 207, *tok.encode("hello world"), 197] and short.ids[-1] == 196
    long = prepare_tts_text(tok, "hello " * 310)
    assert long.n_tokens == 300 and "[Etts]" not in long.text and len(long.ids) == 303
    assert prepare_tts_text(tok, "hello world", reserved_len=20).ids[-1] == 196


def test_text_mask():
    m = text_mask(13)
    assert len(m) == 303 and m[:16] == [1] * 16 and m[16] == 0 and m[-1] == 1 and sum(m) == 17
    assert text_mask(0)[:3] == [1, 1, 1] and sum(text_mask(0)) == 4
    assert sum(text_mask(300)) == 303  # nothing padded
