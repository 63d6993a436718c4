"""Mock models and a byte tokenizer for the engine tests.

``TinyCausalLM`` is a real (random-weight) two-layer causal transformer honouring the model
protocol of ``modeling/vlm.py`` (``embed_tokens``, ``forward(inputs_embeds, position_ids,
attention_mask, cache, last_only)``, cache calls ``update``/``get_seq_length``), so cached and
uncached runs can be compared. ``HistoryLM`` is a table-driven model whose next-token logits
depend on the last token and (optionally) on a hash of every visible earlier token, read back
through the cache, so wrong cache reordering changes its output. ``ByteTokenizer`` maps ids
0..255 to bytes.
"""

from __future__ import annotations

import math

import pytest
import torch

EOS_A, EOS_B = 256, 257  # "<|im_end|>", "<|endoftext|>" of the byte tokenizer


class TinyCausalLM(torch.nn.Module):
    """Random causal transformer: absolute position table, GQA attention, MLP, RMS norms."""

    def __init__(
        self,
        vocab: int = 300,
        hidden: int = 32,
        layers: int = 2,
        heads: int = 4,
        kv_heads: int = 2,
        head_dim: int = 8,
        max_pos: int = 256,
        seed: int = 0,
    ) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)

        def w(*shape: int, scale: float) -> torch.nn.Parameter:
            return torch.nn.Parameter(torch.randn(*shape, generator=g) * scale, requires_grad=False)

        self.num_layers, self.num_heads, self.num_kv_heads, self.head_dim = layers, heads, kv_heads, head_dim
        self.vocab_size = vocab
        self.embed = w(vocab, hidden, scale=1.0)
        self.pos = w(max_pos, hidden, scale=0.5)
        self.wq = torch.nn.ParameterList(
            [w(hidden, heads * head_dim, scale=hidden**-0.5) for _ in range(layers)]
        )
        self.wk = torch.nn.ParameterList(
            [w(hidden, kv_heads * head_dim, scale=hidden**-0.5) for _ in range(layers)]
        )
        self.wv = torch.nn.ParameterList(
            [w(hidden, kv_heads * head_dim, scale=hidden**-0.5) for _ in range(layers)]
        )
        self.wo = torch.nn.ParameterList(
            [w(heads * head_dim, hidden, scale=(heads * head_dim) ** -0.5) for _ in range(layers)]
        )
        self.w1 = torch.nn.ParameterList([w(hidden, 4 * hidden, scale=hidden**-0.5) for _ in range(layers)])
        self.w2 = torch.nn.ParameterList(
            [w(4 * hidden, hidden, scale=(4 * hidden) ** -0.5) for _ in range(layers)]
        )
        self.head = w(hidden, vocab, scale=3.0 * hidden**-0.5)
        self.position_log: list[torch.Tensor] = []
        self.mask_log: list[torch.Tensor] = []

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed[ids]  # [B, T, H]

    @staticmethod
    def _norm(x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)

    def forward(self, inputs_embeds, position_ids, attention_mask, cache=None, last_only=True):
        b, t, _ = inputs_embeds.shape
        past = cache.get_seq_length() if cache is not None else 0
        assert attention_mask.shape == (b, past + t), (attention_mask.shape, past, t)
        self.position_log.append(position_ids.clone())
        self.mask_log.append(attention_mask.clone())
        h = inputs_embeds + self.pos[position_ids]  # [B, T, H]
        keys = torch.arange(past + t)
        causal = keys[None, :] <= (past + torch.arange(t))[:, None]  # [T, past+T]
        allowed = causal[None, None] & attention_mask.bool()[:, None, None, :]  # [B, 1, T, past+T]
        bias = torch.zeros(allowed.shape).masked_fill(~allowed, torch.finfo(torch.float32).min)
        rep = self.num_heads // self.num_kv_heads
        for i in range(self.num_layers):
            x = self._norm(h)
            q = (x @ self.wq[i]).view(b, t, self.num_heads, self.head_dim).transpose(1, 2)
            k = (x @ self.wk[i]).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            v = (x @ self.wv[i]).view(b, t, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if cache is not None:
                k, v = cache.update(i, k, v)
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(self.head_dim) + bias, dim=-1)
            h = h + (att @ v).transpose(1, 2).reshape(b, t, -1) @ self.wo[i]
            h = h + torch.nn.functional.gelu(self._norm(h) @ self.w1[i]) @ self.w2[i]
        h = self._norm(h)
        if last_only:
            h = h[:, -1:]
        return (h @ self.head).float()


class HistoryLM(torch.nn.Module):
    """logits(next) = table[last visible token] + hist[(sum of visible earlier ids) % M].

    Inputs are one-hot embeddings (H = V). The token ids travel through the cache as "keys",
    so the history term is only right if the engine keeps the cache rows in step with beams.
    """

    num_layers, num_kv_heads, head_dim = 1, 1, 1

    def __init__(self, table: torch.Tensor, hist: torch.Tensor | None = None) -> None:
        super().__init__()
        self.table = table.float()
        self.vocab_size = table.shape[0]
        self.hist = hist.float() if hist is not None else torch.zeros(1, self.vocab_size)
        self.dtype, self.device = torch.float32, torch.device("cpu")
        self.calls = 0

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(ids, self.vocab_size).float()  # [B, T, V]

    def forward(self, inputs_embeds, position_ids, attention_mask, cache=None, last_only=True):
        self.calls += 1
        ids = inputs_embeds.argmax(-1).float()[:, None, :, None]  # [B, 1, T, 1]
        if cache is not None:
            ids, _ = cache.update(0, ids, ids)
        seq = ids[:, 0, :, 0].long()  # [B, past+T]
        vis = attention_mask.bool()
        t = inputs_embeds.shape[1]
        starts = range(seq.shape[1] - 1, seq.shape[1]) if last_only else range(seq.shape[1] - t, seq.shape[1])
        out = []
        for end in starts:
            s, m = seq[:, : end + 1], vis[:, : end + 1]
            total = (s * m).sum(-1) % self.hist.shape[0]  # [B]
            out.append(self.table[s[:, -1]] + self.hist[total])
        return torch.stack(out, dim=1)  # [B, 1 or T, V]


class ByteTokenizer:
    """ids 0..255 are bytes; 256/257 are the terminators; decode like a byte-level BPE."""

    specials = {EOS_A: "<|im_end|>", EOS_B: "<|endoftext|>"}

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i < 256:
                buf.append(i)
            else:
                out.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                out.append(self.specials.get(i, ""))
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)


@pytest.fixture(scope="session")
def tiny_lm() -> TinyCausalLM:
    return TinyCausalLM().eval()


@pytest.fixture(scope="session")
def history_lm_cls() -> type[HistoryLM]:
    return HistoryLM


@pytest.fixture(scope="session")
def byte_tokenizer() -> ByteTokenizer:
    return ByteTokenizer()


@pytest.fixture(scope="session")
def tiny_lm_cls() -> type[TinyCausalLM]:
    return TinyCausalLM


@pytest.fixture(autouse=True)
def _single_thread():
    """These models are tiny: intra-op threading only adds contention (seconds on a busy box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
