"""The text tokenizer of a checkpoint: a thin, typed wrapper over ``tokenizers.Tokenizer``.

``Tokenizer.from_dir`` loads ``tokenizer.json`` when the checkpoint has one. Otherwise it builds
the Qwen2 fast tokenizer from ``vocab.json`` + ``merges.txt`` the way transformers' slow-to-fast
conversion does (NFC normalizer; Split on the Qwen2 regex, isolated, then ByteLevel without
prefix space or regex; BPE without unk/dropout; ByteLevel decoder) and adds the tokens of
``tokenizer_config.json``'s ``added_tokens_decoder`` with their flags, checking every id.
Special-token names (bos/eos/pad/unk), ``add_bos_token`` and the chat template come from
``tokenizer_config.json`` (falling back to ``special_tokens_map.json``, ``chat_template.jinja``).

``encode`` adds what the tokenizer.json post-processor adds (nothing for Qwen; the BOS for
Llama 3, which is why 2.5 prompts start with two BOS tokens) and matches special-token strings in
the text; ``decode`` cleans up spaces before punctuation only when tokenizer_config.json sets
``clean_up_tokenization_spaces`` (2.5). A checkpoint with only ``tokenizer.model`` (2.0) gets a
``SentencePieceTokenizer`` (``tokenizer_sp.py``). This module does not render chat templates or
expand image placeholders (``chat_template.py``, ``processor.py``).
"""

from __future__ import annotations

import logging
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors
from tokenizers import Tokenizer as _HFTokenizer

from ..config import read_json_object
from ..errors import TokenizerError
from .special_tokens import SPECIAL_NAMES, SpecialTokenIds

if TYPE_CHECKING:
    from .tokenizer_sp import SentencePieceTokenizer

log = logging.getLogger(__name__)

# transformers' clean_up_tokenization: spaces removed before punctuation and English contractions
_CLEANUPS = ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
             (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"))

# Pre-tokenizer split pattern of Qwen2/Qwen3 (digits one by one, letters with an optional
# leading non-letter, punctuation runs with trailing newlines, whitespace runs).
QWEN2_SPLIT_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

def clean_up_tokenization(text: str) -> str:
    """transformers' ``clean_up_tokenization``: no space before . ? ! , and English contractions."""
    for old, new in _CLEANUPS:
        text = text.replace(old, new)
    return text


def _read_json(path: Path, *, required: bool) -> dict[str, Any] | None:
    if required and not path.is_file():
        raise TokenizerError(f"tokenizer file {path} is missing")
    return read_json_object(path, error=TokenizerError, what="tokenizer file ")


def _token_content(value: Any) -> str | None:
    """A special-token entry is a string, an AddedToken dict ({"content": ...}) or null."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"unrecognised special-token entry {value!r}")


def _select_template(value: Any, where: str) -> str | None:
    """chat_template is a string or a list of {name, template}; the "default" one is taken."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {e.get("name"): e.get("template") for e in value if isinstance(e, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
        raise TokenizerError(f"{where}: chat_template list has no 'default' entry ({sorted(named)})")
    raise TokenizerError(f"{where}: chat_template must be a string or a list, got {type(value).__name__}")


def _read_chat_template(path: Path, tcfg: dict[str, Any]) -> str | None:
    where = str(path / "tokenizer_config.json")
    template = _select_template(tcfg.get("chat_template"), where)
    if template is not None:
        return template
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tjson = _read_json(path / "chat_template.json", required=False)
    if tjson is not None:
        return _select_template(tjson.get("chat_template"), str(path / "chat_template.json"))
    return None


def build_qwen2_backend(vocab_file: Path, merges_file: Path) -> _HFTokenizer:
    """The Qwen2 byte-level BPE pipeline built from vocab.json + merges.txt (no added tokens)."""
    for f in (vocab_file, merges_file):
        if not f.is_file():
            raise TokenizerError(
                f"{f} is missing: a checkpoint without tokenizer.json needs vocab.json and merges.txt"
            )
    try:
        bpe = models.BPE.from_file(
            str(vocab_file), str(merges_file), dropout=None, unk_token=None,
            continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
            byte_fallback=False, ignore_merges=False,
        )
    except Exception as e:  # the Rust loader raises plain Exception on malformed files
        raise TokenizerError(f"cannot build BPE from {vocab_file} and {merges_file}: {e}") from e
    return qwen2_pipeline(bpe)


def qwen2_pipeline(bpe: models.BPE) -> _HFTokenizer:
    """``bpe`` (loaded, or empty to be trained) inside the Qwen2 normalizer / pre-tokenizer /
    decoder pipeline, so merges are learned and applied over the same pre-tokenization."""
    tok = _HFTokenizer(bpe)
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _parse_added_tokens(tcfg: dict[str, Any], where: str) -> list[tuple[int, AddedToken]]:
    """``added_tokens_decoder`` entries as (id, AddedToken), sorted by id."""
    raw = tcfg.get("added_tokens_decoder") or {}
    if not isinstance(raw, dict):
        raise TokenizerError(f"{where}: added_tokens_decoder must be an object")
    out: list[tuple[int, AddedToken]] = []
    for key, entry in raw.items():
        try:
            idx = int(key)
            content = entry["content"]
        except (TypeError, ValueError, KeyError) as e:
            raise TokenizerError(f"{where}: bad added_tokens_decoder entry {key!r}: {entry!r}") from e
        token = AddedToken(
            content,
            single_word=bool(entry.get("single_word", False)),
            lstrip=bool(entry.get("lstrip", False)),
            rstrip=bool(entry.get("rstrip", False)),
            normalized=bool(entry.get("normalized", not entry.get("special", False))),
            special=bool(entry.get("special", False)),
        )
        out.append((idx, token))
    return sorted(out, key=lambda t: t[0])


def _add_tokens(tok: _HFTokenizer, added: list[tuple[int, AddedToken]], where: str) -> None:
    """Add tokens in id order; tokens already in the vocabulary keep their id. Ids must match."""
    for idx, token in added:
        have = tok.token_to_id(token.content)
        if have is not None and have != idx:
            raise TokenizerError(
                f"{where}: added token {token.content!r} should have id {idx} but the vocabulary "
                f"gives it {have}; the tokenizer files are inconsistent"
            )
        tok.add_tokens([token])
        got = tok.token_to_id(token.content)
        if got != idx:
            raise TokenizerError(
                f"{where}: added token {token.content!r} got id {got}, expected {idx} "
                "(added_tokens_decoder ids must continue the base vocabulary without gaps)"
            )


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: byte-level symbol -> byte value."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return {ch: b for b, ch in mapping.items()}


class Tokenizer(SpecialTokenIds):
    """A loaded tokenizer plus the special-token names and chat template of its checkpoint."""

    def __init__(
        self,
        backend: _HFTokenizer,
        *,
        special_tokens: dict[str, str | None] | None = None,
        chat_template: str | None = None,
        add_bos_token: bool = False,
        clean_up_spaces: bool = False,
    ) -> None:
        self._tok = backend
        self.clean_up_spaces = clean_up_spaces
        names = dict(special_tokens or {})
        self.bos_token: str | None = names.get("bos_token")
        self.eos_token: str | None = names.get("eos_token")
        self.pad_token: str | None = names.get("pad_token")
        self.unk_token: str | None = names.get("unk_token")
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        added = backend.get_added_tokens_decoder()
        self._added_ids = frozenset(added)
        self.special_ids: frozenset[int] = frozenset(i for i, t in added.items() if t.special)
        self._byte_level = isinstance(backend.decoder, decoders.ByteLevel)
        for name in SPECIAL_NAMES:
            value = getattr(self, name)
            if value is not None and backend.token_to_id(value) is None:
                raise TokenizerError(f"{name} {value!r} is not in the vocabulary")

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | SentencePieceTokenizer:
        """Load from a checkpoint directory (see module docstring for the file precedence)."""
        root = Path(path)
        if not root.is_dir():
            raise TokenizerError(f"tokenizer directory {root} does not exist")
        if (root / "tokenizer.model").is_file() and not any(
            (root / f).is_file() for f in ("tokenizer.json", "vocab.json")
        ):
            from .tokenizer_sp import SentencePieceTokenizer

            return SentencePieceTokenizer.from_dir(root)
        tcfg = _read_json(root / "tokenizer_config.json", required=False) or {}
        smap = _read_json(root / "special_tokens_map.json", required=False) or {}
        where = str(root / "tokenizer_config.json")
        backend = cls._load_backend(root, tcfg, where)
        names = {}
        for name in SPECIAL_NAMES:
            value = tcfg[name] if name in tcfg else smap.get(name)
            names[name] = _token_content(value)
        return cls(
            backend,
            special_tokens=names,
            chat_template=_read_chat_template(root, tcfg),
            add_bos_token=bool(tcfg.get("add_bos_token", False)),
            clean_up_spaces=bool(tcfg.get("clean_up_tokenization_spaces", False)),
        )

    @staticmethod
    def _load_backend(root: Path, tcfg: dict[str, Any], where: str) -> _HFTokenizer:
        added = _parse_added_tokens(tcfg, where)
        tj = root / "tokenizer.json"
        if tj.is_file():
            try:
                backend = _HFTokenizer.from_file(str(tj))
            except Exception as e:  # the Rust loader raises plain Exception on malformed JSON
                raise TokenizerError(f"{tj} cannot be loaded: {e}") from e
            missing = [(i, t) for i, t in added if backend.token_to_id(t.content) is None]
            wrong = [(i, t.content) for i, t in added if backend.token_to_id(t.content) not in (None, i)]
            if wrong:
                raise TokenizerError(f"{where}: ids differ from tokenizer.json for {wrong[:5]}")
            _add_tokens(backend, missing, where)
            return backend
        log.debug("no tokenizer.json in %s; building the Qwen2 tokenizer from vocab/merges", root)
        backend = build_qwen2_backend(root / "vocab.json", root / "merges.txt")
        _add_tokens(backend, added, where)
        return backend

    # ------------------------------------------------------------------ ids
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (special-token strings map to their ids; no BOS/EOS added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        return list(self._tok.encode(text, add_special_tokens=True).ids)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` (spaces cleaned up only if the checkpoint asks for it)."""
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if self.clean_up_spaces else text

    def decode_bytes(self, ids: list[int], skip_special_tokens: bool = False) -> bytes:
        """Raw UTF-8 bytes of ``ids``, possibly ending inside a multi-byte character.

        Incremental detokenizers append these bytes and emit only complete characters, so a
        character split over several byte-level tokens is never broken.
        """
        if not self._byte_level:
            return self.decode(ids, skip_special_tokens=skip_special_tokens).encode("utf-8")
        table = _byte_decoder()
        out = bytearray()
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            if i in self._added_ids:
                out += token.encode("utf-8")
            else:
                out += bytes(table[ch] for ch in token)
        return bytes(out)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self._tok.id_to_token(int(idx))

    @property
    def vocab_size(self) -> int:
        """Number of ids including added tokens (``len(tokenizer)`` in transformers)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r})"
