"""SentencePiece tokenizer of MiniCPM-V 2.0 (the slow ``LlamaTokenizer`` in legacy mode).

2.0 ships only ``tokenizer.model`` (no tokenizer.json). ``SentencePieceTokenizer`` reproduces
what the reference's slow tokenizer does (spec 2.0 §2.6): ``encode`` splits the text at the added
tokens of ``tokenizer_config.json`` (``<s>``, ``</s>``, ``<unk>``, ``<image>`` ... ``</slice>``),
runs SentencePiece on every other piece separately (legacy: each piece gets the dummy-prefix
``▁``) and prepends BOS when ``add_bos_token``. ``decode`` decodes runs of ordinary pieces with
SentencePiece and writes special tokens literally, with the legacy space before a special token
that follows ordinary text. It offers the same methods as ``Tokenizer`` that the processor and
engine use. Needs the ``sentencepiece`` package (extra ``minicpmv[legacy]``).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..config import read_json_object
from ..errors import TokenizerError
from .special_tokens import SPECIAL_NAMES, SpecialTokenIds

log = logging.getLogger(__name__)



def _content(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TokenizerError(f"unrecognised special-token entry {value!r}")


def _read(path: Path) -> dict[str, Any]:
    return read_json_object(path, error=TokenizerError, what="tokenizer file ") or {}


class SentencePieceTokenizer(SpecialTokenIds):
    """A ``tokenizer.model`` plus the added/special tokens of tokenizer_config.json."""

    def __init__(self, model_file: Path, tcfg: dict[str, Any], smap: dict[str, Any]) -> None:
        try:
            import sentencepiece
        except ImportError as e:
            raise TokenizerError(
                "this checkpoint has a SentencePiece tokenizer (tokenizer.model); install it with "
                "`pip install minicpmv[legacy]` (or `pip install sentencepiece`)"
            ) from e
        try:
            self._sp = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as e:
            raise TokenizerError(f"{model_file} is not a valid SentencePiece model: {e}") from e
        names = {n: _content(tcfg[n] if n in tcfg else smap.get(n)) for n in SPECIAL_NAMES}
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.pad_token, self.unk_token = names["pad_token"], names["unk_token"]
        self.add_bos_token = bool(tcfg.get("add_bos_token", True))
        template = tcfg.get("chat_template")
        self.chat_template: str | None = template if isinstance(template, str) else None
        self._added: dict[str, int] = {}
        specials: set[str] = set()
        for key, entry in (tcfg.get("added_tokens_decoder") or {}).items():
            self._added[entry["content"]] = int(key)
            if entry.get("special", False):
                specials.add(entry["content"])
        extra = tcfg.get("additional_special_tokens") or smap.get("additional_special_tokens") or []
        specials |= {_content(t) for t in extra} | {v for v in names.values() if v is not None}
        self._specials = frozenset(s for s in specials if s is not None)
        for tok, idx in self._added.items():
            if idx < self._sp.get_piece_size() and self._sp.id_to_piece(idx) != tok:
                raise TokenizerError(f"added token {tok!r} has id {idx} but tokenizer.model names it "
                                     f"{self._sp.id_to_piece(idx)!r}")
        self.special_ids = frozenset(i for t in self._specials if (i := self.token_to_id(t)) is not None)
        alternatives = "|".join(re.escape(t) for t in sorted(self._added, key=len, reverse=True))
        self._split = re.compile(f"({alternatives})") if self._added else None

    @classmethod
    def from_dir(cls, path: str | Path) -> SentencePieceTokenizer:
        root = Path(path)
        return cls(root / "tokenizer.model", _read(root / "tokenizer_config.json"),
                   _read(root / "special_tokens_map.json"))

    # ------------------------------------------------------------------ ids
    def encode(self, text: str) -> list[int]:
        """Ids as the slow tokenizer's ``encode(text)``: BOS (if configured) + pieces."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = [self.bos_token_id] if self.add_bos_token and self.bos_token_id is not None else []
        parts = self._split.split(text) if self._split is not None else [text]
        for part in parts:
            if not part:
                continue
            if part in self._added:
                ids.append(self._added[part])
            else:
                ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        """Text of ``ids`` like the slow tokenizer's ``decode`` (no clean-up of spaces)."""
        tokens = []
        for i in ids:
            i = int(i)
            if skip_special_tokens and i in self.special_ids:
                continue
            tok = self.id_to_token(i)
            if tok is None:
                raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
            tokens.append(tok)
        if tokens and tokens[0].startswith("▁"):
            tokens[0] = tokens[0][1:]
        out, run, prev_special = [], [], False
        for k, tok in enumerate(tokens):
            if tok in self._specials:
                if not prev_special and k != 0:
                    out.append(" ")  # legacy=True
                out.append(self._sp.decode_pieces(run) + tok)
                run, prev_special = [], True
            else:
                if prev_special and k == 1 and not tok.startswith("▁"):
                    out.append(" ")  # add_prefix_space after a leading special token
                run.append(tok)
                prev_special = False
        out.append(self._sp.decode_pieces(run))
        return "".join(out)

    def decode_bytes(self, ids: list[int], skip_special_tokens: bool = False) -> bytes:
        return self.decode(ids, skip_special_tokens=skip_special_tokens).encode("utf-8")

    def token_to_id(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        idx = self._sp.piece_to_id(token)
        return None if idx == self._sp.unk_id() and token != self._sp.id_to_piece(idx) else int(idx)

    def id_to_token(self, idx: int) -> str | None:
        idx = int(idx)
        return self._sp.id_to_piece(idx) if 0 <= idx < self._sp.get_piece_size() else None

    @property
    def vocab_size(self) -> int:
        return max(self._sp.get_piece_size(), max(self._added.values(), default=-1) + 1)

    def __repr__(self) -> str:
        return f"SentencePieceTokenizer(vocab_size={self.vocab_size}, eos={self.eos_token!r})"
