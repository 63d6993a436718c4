"""LLM backbones (Qwen2 for 2.6, Qwen3 for 4.5) against the official text-only conformance vectors,
plus the building blocks: masks, KV cache, RoPE, RMSNorm, GQA, parameter names, tied weights."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from minicpmv.errors import ConfigError
from minicpmv.modeling.layers import (
    GatedMLP,
    KVCacheProtocol,
    RMSNorm,
    RotaryEmbedding,
    SimpleKVCache,
    apply_rotary,
    attention,
    build_attn_mask,
)
from minicpmv.modeling.llm import BACKBONES, Qwen2ForCausalLM, Qwen3ForCausalLM, build_backbone

TEXT_CASES = [("2.6", "text_only"), ("4.5", "text_only_thinking")]
STEPS = 16


@pytest.fixture(scope="module")
def llms(tiny_config, tiny_state) -> dict:
    out = {}
    for v in ("2.6", "4.5"):
        llm = build_backbone(tiny_config(v).text)
        sd = {k[len("llm."):]: t for k, t in tiny_state(v).items() if k.startswith("llm.")}
        llm.load_state_dict(sd, strict=True)
        out[v] = llm.float().eval()
    return out


def _greedy(
    llm, embeds, mask, positions, *, cached: bool, steps: int = STEPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy loop over inputs_embeds; returns (ids [B, steps], logits [B, steps, V])."""
    emb_layer = llm.get_input_embeddings()
    ids, logits = [], []
    cache = SimpleKVCache() if cached else None
    full_emb, full_mask = embeds, mask
    step_in = embeds
    with torch.no_grad():
        for _ in range(steps):
            pos = positions(full_mask)
            if cached:
                pos = pos[:, -step_in.shape[1]:]
                lg = llm(step_in, pos, full_mask, cache=cache, last_only=True)[:, -1]  # [B, V]
            else:
                lg = llm(full_emb, pos, full_mask, last_only=True)[:, -1]  # [B, V]
            nxt = lg.argmax(-1)  # [B]
            ids.append(nxt)
            logits.append(lg)
            step_in = emb_layer(nxt)[:, None]  # [B, 1, H]
            full_emb = torch.cat([full_emb, step_in], dim=1)
            full_mask = torch.cat([full_mask, torch.ones_like(full_mask[:, :1])], dim=1)
    return torch.stack(ids, 1), torch.stack(logits, 1)


@pytest.mark.parametrize("version,name", TEXT_CASES)
def test_text_only_greedy_matches_reference(llms, load_case, positions, version, name) -> None:
    case = load_case(version, name)
    llm = llms[version]
    ids, mask = case.t["input_ids"], case.t["attention_mask"]
    embeds = llm.get_input_embeddings()(ids)  # [B, T, H]
    torch.testing.assert_close(embeds.double().sum(-1), case.t["embeds_rowsum"], atol=1e-3, rtol=1e-5)
    got_ids, got_logits = _greedy(llm, embeds, mask, positions, cached=False)
    torch.testing.assert_close(got_logits, case.t["step_logits"], atol=1e-4, rtol=1e-4)
    assert got_ids.tolist() == case.t["greedy_ids"].tolist()


@pytest.mark.parametrize("version,name", TEXT_CASES)
def test_cached_greedy_equals_uncached(llms, load_case, positions, version, name) -> None:
    case = load_case(version, name)
    llm = llms[version]
    ids, mask = case.t["input_ids"], case.t["attention_mask"]
    embeds = llm.get_input_embeddings()(ids)
    ref_ids, ref_logits = _greedy(llm, embeds, mask, positions, cached=False)
    got_ids, got_logits = _greedy(llm, embeds, mask, positions, cached=True)
    assert got_ids.tolist() == ref_ids.tolist() == case.t["greedy_ids"].tolist()
    torch.testing.assert_close(got_logits, ref_logits, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_single_pass(llms, load_case, positions) -> None:
    case = load_case("2.6", "text_only")
    llm = llms["2.6"]
    ids, mask = case.t["input_ids"], case.t["attention_mask"]
    embeds = llm.get_input_embeddings()(ids)
    pos = positions(mask)
    with torch.no_grad():
        full = llm(embeds, pos, mask)  # [1, T, V]
        cache = SimpleKVCache()
        a = llm(embeds[:, :17], pos[:, :17], mask[:, :17], cache=cache)
        b = llm(embeds[:, 17:], pos[:, 17:], mask, cache=cache)  # past 17, T > 1: explicit causal mask
    assert cache.get_seq_length() == ids.shape[1]
    torch.testing.assert_close(torch.cat([a, b], 1), full, atol=1e-5, rtol=0)


def test_left_padded_batch_matches_single_rows(llms, load_case, positions) -> None:
    case = load_case("4.5", "text_only_thinking")
    llm = llms["4.5"]
    long_ids = case.t["input_ids"][0]
    short_ids = long_ids[9:]
    pad = long_ids.shape[0] - short_ids.shape[0]
    ids = torch.stack([long_ids, torch.cat([torch.zeros(pad, dtype=torch.long), short_ids])])  # [2, T]
    mask = (torch.arange(ids.shape[1])[None] >= torch.tensor([[0], [pad]])).long()  # [2, T]
    emb = llm.get_input_embeddings()
    with torch.no_grad():
        batched = llm(emb(ids), positions(mask), mask)  # [2, T, V]
        one = llm(emb(long_ids[None]), positions(torch.ones_like(long_ids[None])), None)
        two = llm(emb(short_ids[None]), positions(torch.ones_like(short_ids[None])), None)
    assert torch.isfinite(batched).all(), "fully masked (padding) query rows must stay finite"
    torch.testing.assert_close(batched[0], one[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batched[1, pad:], two[0], atol=1e-5, rtol=0)


def test_last_only_is_last_row(llms, load_case, positions) -> None:
    case = load_case("2.6", "text_only")
    llm = llms["2.6"]
    mask = case.t["attention_mask"]
    embeds = llm.get_input_embeddings()(case.t["input_ids"])
    with torch.no_grad():
        full = llm(embeds, positions(mask), mask)
        last = llm(embeds, positions(mask), mask, last_only=True)
        hidden = llm.forward_hidden(embeds, positions(mask), mask)
    assert full.dtype == last.dtype == torch.float32
    assert last.shape == (1, 1, llm.config.vocab_size)
    # one row and many rows may take different GEMM paths (2.4e-6 apart on a Sapphire Rapids host)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=0)
    assert hidden.shape == embeds.shape


@pytest.mark.parametrize("version", ["2.6", "4.5"])
def test_parameter_names_and_shapes_equal_checkpoint(tiny_config, tiny_state, version) -> None:
    llm = build_backbone(tiny_config(version).text)
    want = {k[len("llm."):]: tuple(t.shape) for k, t in tiny_state(version).items() if k.startswith("llm.")}
    got = {k: tuple(t.shape) for k, t in llm.state_dict().items()}
    assert got == want
    per_layer = sum(1 for k in got if k.startswith("model.layers.0."))
    assert per_layer == (12 if version == "2.6" else 11)  # spec §3: qkv biases vs q/k norms


def test_backbone_registry_and_unknown_family(tiny_config) -> None:
    assert {"qwen2": Qwen2ForCausalLM, "qwen3": Qwen3ForCausalLM}.items() <= BACKBONES.items()
    assert set(BACKBONES) == {"qwen2", "qwen3", "llama", "minicpm"}
    assert isinstance(build_backbone(tiny_config("4.5").text), Qwen3ForCausalLM)
    bad = dataclasses.replace(tiny_config("2.6").text, family="llama7")
    with pytest.raises(ConfigError, match="llama7"):
        build_backbone(bad)


def test_tied_word_embeddings(tiny_config) -> None:
    cfg = dataclasses.replace(tiny_config("4.5").text, tie_word_embeddings=True)
    llm = build_backbone(cfg)
    assert llm.lm_head.weight is llm.model.embed_tokens.weight
    names = [n for n, _ in llm.named_parameters()]
    assert "lm_head.weight" not in names and "model.embed_tokens.weight" in names
    untied = build_backbone(tiny_config("4.5").text)
    assert untied.lm_head.weight is not untied.model.embed_tokens.weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_mlp_in_place_without_autograd_gives_the_same_values(dtype: torch.dtype) -> None:
    """Inference runs silu and the product in place: bit for bit what the autograd path computes,
    down(silu(gate(x)) * up(x)), and that path still trains."""
    torch.manual_seed(0)
    mlp = GatedMLP(16, 40).to(dtype)
    x = torch.randn(3, 5, 16, dtype=dtype)
    ref = mlp.down_proj(F.silu(x @ mlp.gate_proj.weight.t()) * (x @ mlp.up_proj.weight.t()))
    with torch.inference_mode():
        fast = mlp(x)
    with torch.no_grad():
        assert torch.equal(mlp(x), fast)
    tracked = mlp(x)
    assert torch.equal(tracked.detach(), fast) and torch.equal(fast, ref.detach())
    tracked.sum().backward()
    assert mlp.gate_proj.weight.grad is not None


def test_rmsnorm_float32_math_weight_after_cast() -> None:
    torch.manual_seed(0)
    norm = RMSNorm(64, eps=1e-6).to(torch.bfloat16)
    with torch.no_grad():
        norm.weight.copy_(1 + 0.1 * torch.randn(64))
    x = (3 * torch.randn(5, 64)).to(torch.bfloat16)
    xf = x.float()
    ref = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    out = norm(x)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ref)


def test_rotary_tables_float32_and_rotate_half() -> None:
    rope = RotaryEmbedding(64, 1e6).to(torch.bfloat16)  # .to() must not degrade inv_freq
    inv = rope.inv_freq(torch.device("cpu"))
    assert inv.dtype == torch.float32
    exact = 1e6 ** (-torch.arange(0, 64, 2, dtype=torch.float64) / 64)
    torch.testing.assert_close(inv.double(), exact, rtol=1e-6, atol=0)
    pos = torch.tensor([[0, 1, 5000]])
    cos, sin = rope(pos, torch.float32)
    assert cos.shape == (1, 3, 64)
    torch.testing.assert_close(cos[0, 2, :32], torch.cos(5000 * inv), atol=1e-6, rtol=0)
    torch.testing.assert_close(cos[..., :32], cos[..., 32:])
    # position 0 is the identity; the rotation preserves the norm of every (i, i+32) pair
    x = torch.randn(1, 2, 3, 64)
    y = apply_rotary(x, cos, sin)
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])
    pair = lambda t: t[..., :32] ** 2 + t[..., 32:] ** 2  # noqa: E731
    torch.testing.assert_close(pair(y), pair(x), atol=1e-4, rtol=1e-5)


def test_attention_mask_causal_visibility_and_finite_min() -> None:
    key_mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]], dtype=torch.bool)
    m = build_attn_mask(key_mask, q_len=2, past=2, dtype=torch.float32, device=torch.device("cpu"))
    assert m.mask is not None and not m.is_causal and m.mask.shape == (2, 1, 2, 4)
    allowed = m.mask[:, 0] == 0
    assert allowed[0].tolist() == [[False, True, True, False], [False, True, True, True]]
    assert allowed[1].tolist() == [[True, True, False, False], [True, True, False, True]]
    assert torch.isfinite(m.mask).all() and m.mask.min() == torch.finfo(torch.float32).min
    # all-visible fast paths
    ones = torch.ones(1, 3, dtype=torch.bool)
    assert build_attn_mask(ones, 3, 0, torch.float32, torch.device("cpu")).is_causal
    assert build_attn_mask(ones, 1, 2, torch.float32, torch.device("cpu")).mask is None
    with pytest.raises(ValueError, match="past"):
        build_attn_mask(ones, 2, 2, torch.float32, torch.device("cpu"))


def test_gqa_attention_equals_repeated_heads_and_masked_rows_finite() -> None:
    torch.manual_seed(0)
    q = torch.randn(2, 4, 3, 8)
    k, v = torch.randn(2, 2, 5, 8), torch.randn(2, 2, 5, 8)
    key_mask = torch.tensor([[1, 1, 1, 1, 1], [0, 0, 0, 1, 1]], dtype=torch.bool)
    m = build_attn_mask(key_mask, 3, 2, torch.float32, torch.device("cpu"))
    out = attention(q, k, v, m)
    kr, vr = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)  # [2, 4, 5, 8]
    ref = F.scaled_dot_product_attention(q, kr, vr, attn_mask=m.mask)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)
    # row 1, query 0 (absolute position 2) sees no key at all -> uniform, finite
    assert torch.isfinite(out).all()


def test_simple_cache_follows_protocol() -> None:
    cache = SimpleKVCache()
    assert isinstance(cache, KVCacheProtocol)
    k = torch.zeros(1, 2, 3, 4)
    cache.update(0, k, k)
    ka, _ = cache.update(0, k[:, :, :1], k[:, :, :1])
    assert ka.shape == (1, 2, 4, 4) and cache.get_seq_length() == 4
    with pytest.raises(IndexError):
        cache.update(2, k, k)
