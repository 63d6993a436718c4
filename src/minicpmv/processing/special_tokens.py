"""The named special tokens (bos, eos, pad, unk) and their ids, shared by both tokenizer kinds.

``SpecialTokenIds`` is a mixin: a tokenizer sets the token strings and implements
``token_to_id``; the ids follow. Nothing here reads files or tokenizes text.
"""

from __future__ import annotations

SPECIAL_NAMES = ("bos_token", "eos_token", "pad_token", "unk_token")


class SpecialTokenIds:
    """Ids of the named special tokens, for any tokenizer with ``token_to_id`` and the names."""

    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None

    def token_to_id(self, token: str) -> int | None:
        raise NotImplementedError

    def _id_of(self, token: str | None) -> int | None:
        return None if token is None else self.token_to_id(token)

    @property
    def bos_token_id(self) -> int | None:
        return self._id_of(self.bos_token)

    @property
    def eos_token_id(self) -> int | None:
        return self._id_of(self.eos_token)

    @property
    def pad_token_id(self) -> int | None:
        return self._id_of(self.pad_token)

    @property
    def unk_token_id(self) -> int | None:
        return self._id_of(self.unk_token)

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """The set special-token names, as templates receive them."""
        return {n: v for n in SPECIAL_NAMES if (v := getattr(self, n)) is not None}

    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def __len__(self) -> int:
        return self.vocab_size
