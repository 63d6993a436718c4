"""Building blocks shared by the decoder-only LLM backbones (Qwen2, Qwen3).

Contains RMSNorm, rotary position embeddings (rotate-half form), the gated SiLU MLP, the
grouped-query attention block (run through ``F.scaled_dot_product_attention``), the additive
attention-mask builder and the KV-cache duck type (``KVCacheProtocol``) with a minimal list-based
``SimpleKVCache``. The numerics follow the Hugging Face implementations (float32 RMSNorm with the
weight applied after casting back, float32 rotary tables) so that float32 runs match the
reference to ~1e-6. This module does not know about checkpoints, vision or generation; the
production KV cache lives in ``engine/kv_cache.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn


def _torch_has_sdpa_gqa() -> bool:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        major, minor = int(parts[0]), int(parts[1])
    except (ValueError, IndexError):
        return False
    return (major, minor) >= (2, 5)


_SDPA_GQA = _torch_has_sdpa_gqa()


@runtime_checkable
class KVCacheProtocol(Protocol):
    """What the attention layers need from a KV cache.

    ``update`` appends this step's keys/values (already rotated) of one layer and returns the
    whole cached sequence of that layer, exactly ``past + T`` positions long (the length of the
    ``attention_mask`` given to the model); ``get_seq_length`` is the number of cached positions
    before the current forward call (read once per forward, before layer 0 updates). A cache may
    also have a true ``static_shapes`` attribute: the step's shapes are fixed and its key mask
    always hides some keys, so the model builds the additive mask without looking at it (no
    host synchronisation, nothing data-dependent for a compiled step).
    """

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:  # [B, n_kv, T, hd] -> [B, n_kv, past+T, hd] x2
        ...

    def get_seq_length(self) -> int: ...


class SimpleKVCache:
    """A growing list-of-tensors cache (concatenation per step); for tests and simple loops."""

    def __init__(self) -> None:
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []

    def update(
        self, layer_idx: int, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx == len(self.keys):
            self.keys.append(k)  # [B, n_kv, T, hd]
            self.values.append(v)
        elif layer_idx < len(self.keys):
            self.keys[layer_idx] = torch.cat([self.keys[layer_idx], k], dim=2)  # [B, n_kv, past+T, hd]
            self.values[layer_idx] = torch.cat([self.values[layer_idx], v], dim=2)
        else:
            raise IndexError(f"layer {layer_idx} updated before layer {len(self.keys)}")
        return self.keys[layer_idx], self.values[layer_idx]

    def get_seq_length(self) -> int:
        return 0 if not self.keys else int(self.keys[0].shape[2])


class RMSNorm(nn.Module):
    """``w * (x / sqrt(mean(x^2) + eps))`` computed in float32, weight applied in input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        in_dtype = x.dtype
        h = x.to(torch.float32)
        var = h.pow(2).mean(-1, keepdim=True)  # [..., 1]
        h = h * torch.rsqrt(var + self.eps)
        return self.weight * h.to(in_dtype)


class RotaryEmbedding(nn.Module):
    """Rotate-half RoPE tables. ``inv_freq`` is recomputed per device and never stored as a
    buffer, so it survives meta-device construction, ``.to(dtype)`` and state_dict round trips."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.theta = float(theta)
        self._inv_freq: dict[torch.device, torch.Tensor] = {}

    def inv_freq(self, device: torch.device) -> torch.Tensor:
        cached = self._inv_freq.get(device)
        if cached is None:
            exps = torch.arange(0, self.head_dim, 2, dtype=torch.int64, device=device).float()
            cached = 1.0 / (self.theta ** (exps / self.head_dim))  # [hd/2] float32
            if device.type != "meta":
                self._inv_freq[device] = cached
        return cached

    def forward(
        self, position_ids: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [B, T, hd] in ``dtype`` for integer ``position_ids`` [B, T]."""
        inv = self.inv_freq(position_ids.device)
        freqs = position_ids[..., None].to(torch.float32) * inv  # [B, T, hd/2] float32
        emb = torch.cat([freqs, freqs], dim=-1)  # [B, T, hd]
        return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, n, T, hd], cos/sin [B, T, hd] -> rotated x [B, n, T, hd]."""
    cos = cos.unsqueeze(1)  # [B, 1, T, hd]
    sin = sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class GatedMLP(nn.Module):
    """``down(silu(gate(x)) * up(x))`` without biases."""

    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)  # [..., I] each
        if torch.is_grad_enabled() or gate.dtype != up.dtype:
            return self.down_proj(F.silu(gate) * up)
        # without autograd, in place: the same values, and a prompt's prefill no longer allocates
        # (and faults in) two more [T, I] tensors per layer
        return self.down_proj(F.silu(gate, inplace=True).mul_(up))


@dataclass(frozen=True)
class AttnMask:
    """Mask information shared by all layers of one forward: either an additive float mask
    ``[B, 1, T, S]`` or the fast paths (``is_causal`` with no past, or nothing for T == 1)."""

    mask: torch.Tensor | None
    is_causal: bool


def build_attn_mask(
    key_mask: torch.Tensor | None, q_len: int, past: int, dtype: torch.dtype, device: torch.device,
    *, static: bool = False,
) -> AttnMask:
    """Combine causality with key visibility ``key_mask`` [B, past+T] (True = visible).

    Hidden keys get ``finfo(dtype).min`` (never -inf), so a query row that sees no key at all
    (left padding) attends uniformly and stays finite. ``static``: always build the additive
    mask (no check whether every key is visible, which would read the mask on the host).
    """
    total = past + q_len
    if key_mask is not None and key_mask.shape[-1] != total:
        raise ValueError(f"attention_mask has {key_mask.shape[-1]} columns, expected past+T = {total}")
    if key_mask is None or (not static and bool(key_mask.all())):
        if q_len == 1:
            return AttnMask(None, False)
        if past == 0:
            return AttnMask(None, True)
        key_mask = None
    q_pos = torch.arange(past, total, device=device)[:, None]  # [T, 1]
    k_pos = torch.arange(total, device=device)[None, :]  # [1, S]
    allowed = (k_pos <= q_pos)[None, None]  # [1, 1, T, S]
    if key_mask is not None:
        allowed = allowed & key_mask.to(device=device, dtype=torch.bool)[:, None, None, :]  # [B,1,T,S]
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)  # [B or 1, 1, T, S]
    return AttnMask(mask, False)


def module_device(module: nn.Module) -> torch.device:
    """The device of a module's first parameter or buffer (cpu for one without any)."""
    for t in module.parameters():
        return t.device
    for t in module.buffers():
        return t.device
    return torch.device("cpu")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttnMask
) -> torch.Tensor:
    """SDPA with grouped KV heads: q [B, nh, T, hd], k/v [B, nkv, S, hd] -> [B, nh, T, hd].

    Decoding (T == 1) in a reduced-precision dtype folds the query heads that share a KV head into
    the query length (q [B, nkv, n_rep, hd]): the same attention, but PyTorch's CPU flash kernel
    runs it ~10x faster than with ``enable_gqa`` at T == 1 in bf16. float32 keeps the plain call,
    so fp32 results stay bit-identical.
    """
    b, nh, t, hd = q.shape
    n_rep = nh // k.shape[1]
    if t == 1 and n_rep > 1 and q.dtype in (torch.bfloat16, torch.float16) and not mask.is_causal:
        fold = q.reshape(b, k.shape[1], n_rep, hd)  # [B, nkv, n_rep, hd]; key mask [B, 1, 1, S] broadcasts
        return F.scaled_dot_product_attention(fold, k, v, attn_mask=mask.mask).view(b, nh, 1, hd)
    if n_rep > 1 and not _SDPA_GQA:
        k = k.repeat_interleave(n_rep, dim=1)  # [B, nh, S, hd]
        v = v.repeat_interleave(n_rep, dim=1)
        n_rep = 1
    kwargs = {"enable_gqa": True} if n_rep > 1 else {}
    return F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask.mask, is_causal=mask.is_causal, **kwargs
    )


class Attention(nn.Module):
    """GQA self-attention with optional q/k/v biases (Qwen2) and per-head q/k RMSNorm (Qwen3)."""

    def __init__(
        self,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        qkv_bias: bool,
        qk_norm: bool,
        eps: float,
        layer_idx: int,
    ) -> None:
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads {num_heads} is not a multiple of num_kv_heads {num_kv_heads}")
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.layer_idx = layer_idx
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=False)
        if qk_norm:
            self.q_norm = RMSNorm(head_dim, eps)
            self.k_norm = RMSNorm(head_dim, eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: AttnMask,
        cache: KVCacheProtocol | None,
    ) -> torch.Tensor:
        b, t, _ = x.shape  # [B, T, H]
        q = self.q_proj(x).view(b, t, self.num_heads, self.head_dim)  # [B, T, nh, hd]
        k = self.k_proj(x).view(b, t, self.num_kv_heads, self.head_dim)  # [B, T, nkv, hd]
        v = self.v_proj(x).view(b, t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            q = self.q_norm(q)
            k = self.k_norm(k)
        q = apply_rotary(q.transpose(1, 2), cos, sin)  # [B, nh, T, hd]
        k = apply_rotary(k.transpose(1, 2), cos, sin)  # [B, nkv, T, hd]
        v = v.transpose(1, 2)  # [B, nkv, T, hd]
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)  # [B, nkv, past+T, hd]
        out = attention(q, k, v, mask)  # [B, nh, T, hd]
        out = out.transpose(1, 2).reshape(b, t, self.num_heads * self.head_dim)  # [B, T, nh*hd]
        return self.o_proj(out)
