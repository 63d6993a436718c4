"""Tokenizer: the real 4.5 release files (no tokenizer.json) and the conformance tokenizers."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from minicpmv.errors import TokenizerError
from minicpmv.processing.tokenizer import Tokenizer

DATA = Path(__file__).resolve().parents[1] / "data"
RELEASE = DATA / "real-4.5" / "release"
FACTS = json.loads((DATA / "real-4.5" / "tokenizer_facts.json").read_text(encoding="utf-8"))
CHECKPOINTS = {v: DATA / "conformance" / v / "_checkpoint" for v in ("2.6", "4.5")}

SAMPLES = [
    "Hello world! How are you?", "now!\n!!", "  indented\tcode\r\nline 12345",
    "Grüße 😀 这张图片里有什么？", "<|im_start|>user\nhi<|im_end|>\n", "<image><unk></image> x<slice>",
    "e\u0301 caf\u00e9", "<think>\nhmm\n</think>\n\n", "don't I'll we've", "",
]


@pytest.mark.parametrize("text", list(FACTS["probes"]))
def test_real45_probe_encodings(real45_tokenizer: Tokenizer, text: str) -> None:
    assert real45_tokenizer.encode(text) == FACTS["probes"][text]


def test_real45_special_names_and_ids(real45_tokenizer: Tokenizer) -> None:
    tok = real45_tokenizer
    assert [tok.bos_token, tok.bos_token_id] == FACTS["bos_token"]
    assert [tok.eos_token, tok.eos_token_id] == FACTS["eos_token"]
    assert [tok.pad_token, tok.pad_token_id] == FACTS["pad_token"]
    assert [tok.unk_token, tok.unk_token_id] == FACTS["unk_token"]
    assert tok.vocab_size == len(tok) == FACTS["len_tokenizer"]
    assert tok.add_bos_token is False
    assert not hasattr(tok, "newline_id")  # the release's newline_id returns <unk>; not copied


def test_real45_token_ids_and_special_flags(real45_tokenizer: Tokenizer) -> None:
    tok = real45_tokenizer
    for token, idx in FACTS["token_ids"].items():
        assert tok.token_to_id(token) == idx, token
        assert tok.id_to_token(idx) == token
        assert tok.encode(token) == [idx], token
        assert (idx in tok.special_ids) == FACTS["token_is_special"][token], token
    for name, idx in FACTS["processor_properties"].items():
        assert idx in tok.special_ids, name
    assert tok.id_to_token(0) == FACTS["id_0_token"]


def test_real45_skip_special_tokens_keeps_think(real45_tokenizer: Tokenizer) -> None:
    tok = real45_tokenizer
    ids = tok.encode("<|im_start|>assistant\n<think>\nx\n</think>\n\n<image><unk></image>done<|im_end|>")
    assert tok.decode(ids, skip_special_tokens=True) == "assistant\n<think>\nx\n</think>\n\ndone"
    full = "<|im_start|>assistant\n<think>\nx\n</think>\n\n<image><unk></image>done<|im_end|>"
    assert tok.decode(ids) == full


def test_real45_chat_template_is_read(real45_tokenizer: Tokenizer) -> None:
    cfg = json.loads((RELEASE / "tokenizer_config.json").read_text(encoding="utf-8"))
    assert real45_tokenizer.chat_template == cfg["chat_template"]


def test_decode_no_space_cleanup(real45_tokenizer: Tokenizer) -> None:
    text = "Hello , world ! It ' s ok ."
    assert real45_tokenizer.decode(real45_tokenizer.encode(text)) == text


@pytest.mark.parametrize("text", SAMPLES)
def test_decode_bytes_per_token_concatenates_to_text(real45_tokenizer: Tokenizer, text: str) -> None:
    ids = real45_tokenizer.encode(text)
    pieces = b"".join(real45_tokenizer.decode_bytes([i]) for i in ids)
    assert pieces.decode("utf-8") == real45_tokenizer.decode(ids)


def test_decode_bytes_splits_multibyte_characters(real45_tokenizer: Tokenizer) -> None:
    ids = real45_tokenizer.encode("😀")
    assert len(ids) == 1
    family = real45_tokenizer.encode("👨\u200d👩")
    partial = [real45_tokenizer.decode_bytes([i]) for i in family]
    assert any(not _is_utf8(p) for p in partial)  # some token ends inside a character
    assert b"".join(partial).decode("utf-8") == "👨\u200d👩"


def _is_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_vocab_merges_build_matches_tokenizer_json(tmp_path: Path, version: str) -> None:
    """The Qwen2 pipeline built from vocab/merges equals the shipped tokenizer.json."""
    src = CHECKPOINTS[version]
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(src / name, tmp_path / name)
    built, shipped = Tokenizer.from_dir(tmp_path), Tokenizer.from_dir(src)
    assert built.vocab_size == shipped.vocab_size
    assert built.special_ids == shipped.special_ids
    for text in SAMPLES:
        assert built.encode(text) == shipped.encode(text), text
        assert built.decode(built.encode(text)) == shipped.decode(shipped.encode(text))


def test_conformance_special_tokens() -> None:
    t26, t45 = Tokenizer.from_dir(CHECKPOINTS["2.6"]), Tokenizer.from_dir(CHECKPOINTS["4.5"])
    assert t26.bos_token is None and t26.bos_token_id is None
    assert t45.bos_token == "<|im_start|>" and t45.bos_token_id == t45.token_to_id("<|im_start|>")
    assert t26.eos_token == "<|im_end|>" and t26.pad_token == "<|endoftext|>"
    assert t26.vocab_size == 526 and t45.vocab_size == 612
    assert t26.encode("now!")[-1] == 0  # id 0 is "!" as in the real vocabulary


# ---------------------------------------------------------------------------- file variants


def _copy_release(tmp_path: Path, skip: tuple[str, ...] = ()) -> Path:
    for name in ("vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"):
        if name not in skip:
            shutil.copy(CHECKPOINTS["2.6"] / name, tmp_path / name)
    return tmp_path


def _edit_config(path: Path, **changes: object) -> None:
    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")


def test_chat_template_list_form_takes_default(tmp_path: Path) -> None:
    path = _copy_release(tmp_path)
    templates = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    _edit_config(path, chat_template=templates)
    assert Tokenizer.from_dir(path).chat_template == "D"


def test_chat_template_list_without_default_fails(tmp_path: Path) -> None:
    path = _copy_release(tmp_path)
    _edit_config(path, chat_template=[{"name": "tool_use", "template": "T"}])
    with pytest.raises(TokenizerError, match="default"):
        Tokenizer.from_dir(path)


def test_chat_template_absent_or_from_jinja_file(tmp_path: Path) -> None:
    path = _copy_release(tmp_path)
    _edit_config(path, chat_template=None)
    assert Tokenizer.from_dir(path).chat_template is None
    (path / "chat_template.jinja").write_text("J", encoding="utf-8")
    assert Tokenizer.from_dir(path).chat_template == "J"


def test_special_token_names_fall_back_to_special_tokens_map(tmp_path: Path) -> None:
    path = _copy_release(tmp_path)
    _edit_config(path, eos_token=None, pad_token=None)
    tok = Tokenizer.from_dir(path)
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_missing_directory() -> None:
    with pytest.raises(TokenizerError, match="does not exist"):
        Tokenizer.from_dir("/nonexistent/minicpmv-tokenizer")


@pytest.mark.parametrize("missing", ["vocab.json", "merges.txt"])
def test_missing_vocab_or_merges(tmp_path: Path, missing: str) -> None:
    with pytest.raises(TokenizerError, match=missing):
        Tokenizer.from_dir(_copy_release(tmp_path, skip=(missing,)))


@pytest.mark.parametrize("name", ["tokenizer_config.json", "vocab.json", "tokenizer.json"])
def test_corrupt_files(tmp_path: Path, name: str) -> None:
    path = _copy_release(tmp_path)
    (path / name).write_text("{not json", encoding="utf-8")
    with pytest.raises(TokenizerError):
        Tokenizer.from_dir(path)


def test_added_token_id_mismatch(tmp_path: Path) -> None:
    path = _copy_release(tmp_path)
    cfg = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
    decoder = cfg["added_tokens_decoder"]
    first = min(decoder, key=int)
    decoder[str(int(first) + 1000)] = decoder.pop(first)  # leaves a gap in the ids
    (path / "tokenizer_config.json").write_text(json.dumps(cfg), encoding="utf-8")
    with pytest.raises(TokenizerError, match="expected"):
        Tokenizer.from_dir(path)


def test_special_token_not_in_vocab(tmp_path: Path) -> None:
    path = _copy_release(tmp_path)
    _edit_config(path, eos_token="<|no_such_token|>")
    with pytest.raises(TokenizerError, match="eos_token"):
        Tokenizer.from_dir(path)
