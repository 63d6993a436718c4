"""Text front end of MiniCPM-o 2.6 speech output (torch-free; spec o2.6 §4.8).

* ``ChatTTSTokenizer``: the BERT-style WordPiece tokenizer of ``assets/chattts_tokenizer``
  through the ``tokenizers`` library, configured the way transformers' ``BertTokenizerFast``
  loads it (``tokenizer.json``, else ``vocab.txt``; the normaliser follows tokenizer_config's
  ``do_lower_case`` / ``strip_accents`` / ``tokenize_chinese_chars``; decode cleans up spaces).
* The official helpers applied to streamed answer text: ``detect_language`` (Chinese when CJK
  characters >= Latin letters), ``spell_digits`` (every digit run spelled digit by digit, each
  run replaced at its first occurrence), ``normalize_stream_piece`` (that + ``*`` removed) and
  ``sentence_end``.
* ``prepare_tts_text`` (the ``[Stts][spk_emb]text[Etts][PAD]...[Ptts]`` string of 303 ids),
  ``text_mask`` (which of those condition positions hold text) and ``speech_text`` (the part of
  a decoded answer between ``<|tts_bos|>`` and ``<|tts_eos|>``).

Nothing here runs a model; the generation schedule is in ``engine/speech.py``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from ..errors import TokenizerError
from .tokenizer import clean_up_tokenization

START = "[Stts]"  # text start
SPEAKER = "[spk_emb]"  # the slot the speaker embedding replaces
TEXT_END = "[Etts]"
PAD = "[PAD]"
AUDIO_BOS = "[Ptts]"  # the position that starts audio generation
TTS_BOS = "<|tts_bos|>"  # LLM tokens around the spoken part of an answer
TTS_EOS = "<|tts_eos|>"

_DIGITS_ZH = dict(zip("0123456789", "零一二三四五六七八九", strict=True))
_DIGITS_EN = dict(zip("0123456789", "zero one two three four five six seven eight nine".split(), strict=True))
_SENTENCE_ENDS = (".", "。", "!", "?", "！", "？")
_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


class ChatTTSTokenizer:
    """WordPiece tokenizer of the speech head; ``encode`` adds no [CLS]/[SEP]."""

    def __init__(self, backend: Tokenizer, *, clean_up_spaces: bool = True) -> None:
        self._tok = backend
        self.clean_up_spaces = clean_up_spaces

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTTSTokenizer:
        """Read ``tokenizer.json`` (or ``vocab.txt``) plus ``tokenizer_config.json`` from ``path``."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"ChatTTS tokenizer directory {root} does not exist (assets/chattts_tokenizer)")
        tcfg = _read_json(root / "tokenizer_config.json")
        if (root / "tokenizer.json").is_file():
            try:
                backend = Tokenizer.from_file(str(root / "tokenizer.json"))
            except Exception as e:  # noqa: BLE001 - tokenizers raises plain Exception on bad files
                raise TokenizerError(f"cannot read {root / 'tokenizer.json'}: {e}") from e
        elif (root / "vocab.txt").is_file():
            backend = _from_vocab(root / "vocab.txt")
        else:
            raise TokenizerError(f"{root} has neither tokenizer.json nor vocab.txt")
        backend.normalizer = normalizers.BertNormalizer(
            clean_text=_clean_text_flag(backend),
            handle_chinese_chars=bool(tcfg.get("tokenize_chinese_chars", True)),
            strip_accents=tcfg.get("strip_accents"),
            lowercase=bool(tcfg.get("do_lower_case", True)),
        )
        specials = [t for t in (*_BERT_SPECIALS, *_special_list(tcfg), *_special_list(
            _read_json(root / "special_tokens_map.json"))) if isinstance(t, str)]
        backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in dict.fromkeys(specials)])
        return cls(backend, clean_up_spaces=bool(tcfg.get("clean_up_tokenization_spaces", True)))

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False).ids)

    def tokens(self, text: str) -> list[str]:
        return list(self._tok.encode(text, add_special_tokens=False).tokens)

    def decode(self, ids: list[int]) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=False)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def _clean_text_flag(backend: Tokenizer) -> bool:
    """``clean_text`` of the stored BERT normaliser (transformers keeps it when it rebuilds one)."""
    if backend.normalizer is None:
        return True
    state = json.loads(backend.normalizer.__getstate__())
    return bool(state.get("clean_text", True)) if state.get("type") == "BertNormalizer" else True


def _special_list(cfg: dict[str, Any]) -> list[Any]:
    out = []
    for item in cfg.get("additional_special_tokens") or []:
        out.append(item.get("content") if isinstance(item, dict) else item)
    return out


def _from_vocab(vocab_file: Path) -> Tokenizer:
    """The pipeline transformers' BertConverter builds from a ``vocab.txt``."""
    lines = vocab_file.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    vocab = {tok: i for i, tok in enumerate(lines)}
    if "[UNK]" not in vocab:
        raise TokenizerError(f"{vocab_file} has no [UNK] entry; is it a WordPiece vocabulary?")
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


# ---------------------------------------------------------------------------------- normalisation


def detect_language(text: str) -> str:
    """``"chinese"`` if the text has at least as many CJK ideographs as ASCII letters, else ``"english"``."""
    chinese = len(re.findall(r"[\u4e00-\u9fff]", text))
    latin = len(re.findall(r"[a-zA-Z]", text))
    return "chinese" if chinese >= latin else "english"


def spell_digits(text: str, language: str | None = None) -> str:
    """Every run of digits spelled digit by digit (``零一二`` or ``zero one two``), as the official
    ``NumberToTextConverter``: runs are replaced in order, each at its first occurrence; digits
    other than 0-9 (e.g. full-width ones) are dropped from their run."""
    language = language or detect_language(text)
    for run in re.findall(r"\d+", text):
        if language == "chinese":
            spoken = "".join(_DIGITS_ZH[c] for c in run if c in _DIGITS_ZH)
        else:
            spoken = " ".join(_DIGITS_EN[c] for c in run if c in _DIGITS_EN)
        text = text.replace(run, spoken, 1)
    return text


def normalize_stream_piece(text: str, language: str | None) -> str:
    """What the streaming path applies to every LLM piece but the first: digits spelled, ``*`` removed."""
    return spell_digits(text, language).replace("*", "")


def sentence_end(text: str) -> str:
    """The first sentence-ending mark found (checked in the order . 。 ! ? ！ ？; a ``.`` right after
    a digit does not count), or ``""``."""
    for mark in _SENTENCE_ENDS:
        if mark in text:
            if mark == ".":
                i = text.find(mark)
                if i > 0 and text[i - 1].isdigit():
                    continue
            return mark
    return ""


def speech_text(answer: str) -> str:
    """The spoken part of a decoded answer: after the last ``<|tts_bos|>``, before the first ``<|tts_eos|>``."""
    return answer.split(TTS_BOS)[-1].split(TTS_EOS)[0]


# ----------------------------------------------------------------------------------- TTS input


@dataclass(frozen=True)
class TTSText:
    """The speech head's text condition: ``text`` (marker string), its ``ids`` and ``n_tokens``."""

    text: str
    ids: list[int]
    n_tokens: int


def prepare_tts_text(tokenizer: ChatTTSTokenizer, text: str, *, reserved_len: int = 300,
                     num_spk_embs: int = 1) -> TTSText:
    """``[Stts][spk_emb]`` + text + ``[Etts]`` + ``[PAD]`` x (reserved - n - 1) + ``[Ptts]``.

    Text of ``reserved_len`` tokens or more is cut to that many tokens (decoded back to text)
    and gets no ``[Etts]``; either way the result holds ``reserved_len + num_spk_embs + 2`` ids.
    """
    ids = tokenizer.encode(text)
    n = len(ids)
    if n < reserved_len:
        tail = TEXT_END + PAD * (reserved_len - n - 1)
    else:
        n = reserved_len
        text = tokenizer.decode(ids[:reserved_len])
        tail = ""
    full = f"{START}{SPEAKER * num_spk_embs}{text}{tail}{AUDIO_BOS}"
    full_ids = tokenizer.encode(full)
    want = reserved_len + num_spk_embs + 2
    if len(full_ids) != want:
        raise TokenizerError(
            f"the ChatTTS text condition has {len(full_ids)} ids, expected {want}: the tokenizer does not "
            f"treat {START} {SPEAKER} {TEXT_END} {PAD} {AUDIO_BOS} as single special tokens"
        )
    return TTSText(full, full_ids, n)


def text_mask(n_tokens: int, *, reserved_len: int = 300, num_spk_embs: int = 1) -> list[int]:
    """1 for the condition positions that hold text: [Stts], speaker, the text, [Etts] (or the next
    slot) and the last ([Ptts]) position; 0 for the padding."""
    length = reserved_len + num_spk_embs + 2
    visible = min(1 + num_spk_embs + n_tokens + 1, length)
    mask = [1] * visible + [0] * (length - visible)
    mask[-1] = 1
    return mask
