"""BatchEngine: continuous batching on the tiny 2.6 / 4.5 checkpoints.

The central claim is batch invariance: with ``batch_invariant=True`` a request's logits are
bit-identical (``torch.equal``) whether it runs alone or joins a batch at any token boundary,
so greedy tokens and seeded samples are too. The rest covers scheduling (slots freed and
reused, FIFO admission, cancellation, n choices), limits and failure isolation.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from minicpmv.engine.batch import BatchEngine, BatchEvent, BatchRequest, generate_batch, row_buckets, row_step
from minicpmv.engine.generate import DecodeMode, DecodeRow, choose_tokens
from minicpmv.engine.sampling import SamplingParams
from minicpmv.errors import ContextLengthError, InputError, OverloadedError

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"


def SamplingOptions(max_new_tokens: int, temperature: float = 0.0, **kw) -> SamplingParams:  # noqa: N802
    """A request's settings as the server builds them (OpenAI semantics: temperature 0 = greedy)."""
    return SamplingParams.from_openai(max_tokens=max_new_tokens, temperature=temperature, **kw)




def _image(seed: int, size: tuple[int, int] = (300, 200)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def _conversations() -> list[list[dict]]:
    convs = [[{"role": "user", "content": [f"question number {i} " * (i + 1)]}] for i in range(5)]
    convs.append([{"role": "user", "content": [_image(1), "What is in the picture?"]}])
    convs.append([{"role": "user", "content": ["Compare", _image(2, (500, 300)), _image(3)]},
                  {"role": "assistant", "content": ["They differ."]},
                  {"role": "user", "content": ["How?"]}])
    return convs


def _inputs(model, conv):
    return model.processor([conv], max_length=10**6)


class _Recorder:
    """Collects events per request id."""

    def __init__(self) -> None:
        self.events: dict[str, list[BatchEvent]] = {}

    def request(self, inputs, options: SamplingParams, **kw) -> BatchRequest:
        req = BatchRequest(inputs, options, self._sink, want_logits=True, **kw)
        self.events[req.request_id] = []
        return req

    def _sink(self, event: BatchEvent) -> None:
        self.events[event.request_id].append(event)

    def tokens(self, rid: str, index: int = 0) -> list[int]:
        return [e.token_id for e in self.events[rid] if e.index == index and e.token_id is not None]

    def logits(self, rid: str) -> list[torch.Tensor]:
        return [e.logits for e in self.events[rid] if e.logits is not None]

    def finish(self, rid: str, index: int = 0) -> str | None:
        ends = [e.finish_reason for e in self.events[rid] if e.index == index and e.finish_reason]
        assert len(ends) == 1, self.events[rid]
        return ends[0]


def _run_alone(engine, model, conv, options) -> tuple[list[int], list[torch.Tensor]]:
    rec = _Recorder()
    req = rec.request(_inputs(model, conv), options)
    engine.submit(req)
    engine.run_until_idle()
    return rec.tokens(req.request_id), rec.logits(req.request_id)


def test_greedy_logits_bitwise_equal_alone_and_batched(model):
    """Rows join at different token boundaries, finish at different lengths and reuse slots."""
    engine = BatchEngine(model, max_batch_size=6, max_model_len=1024)
    assert 1 < engine.row_step < 6  # decode steps run 4 or 6 rows here (MKL: multiples of 4)
    convs = _conversations()
    limits = [12, 5, 20, 9, 16, 14, 11]
    pairs = list(zip(convs, limits, strict=True))
    alone = [_run_alone(engine, model, c, SamplingOptions(max_new_tokens=n)) for c, n in pairs]
    rec = _Recorder()
    reqs = [rec.request(_inputs(model, c), SamplingOptions(max_new_tokens=n)) for c, n in pairs]
    for k, req in enumerate(reqs):  # 7 requests, 6 slots: the last one waits for a freed slot
        engine.submit(req)
        for _ in range(k % 3):
            engine.step()
    engine.run_until_idle()
    assert engine.stats.busy_rows_sum > engine.stats.steps  # rows really shared decode steps
    for req, (tokens, logits) in zip(reqs, alone, strict=True):
        assert rec.tokens(req.request_id) == tokens
        got = rec.logits(req.request_id)
        assert len(got) == len(logits) and all(torch.equal(a, b) for a, b in zip(got, logits, strict=True))
    assert engine.num_running == 0 and sorted(engine._free) == list(range(6))


def test_engine_alone_matches_chat_model_greedy(model):
    engine = BatchEngine(model, max_batch_size=2, max_model_len=1024)
    for conv in _conversations()[4:]:
        tokens, _ = _run_alone(engine, model, conv, SamplingOptions(max_new_tokens=16))
        batch = model.runner.prepare(model.processor([conv]), id0_quirk=False)
        ref = model.runner.generate_ids(batch, SamplingParams(max_new_tokens=16))[0]
        end = next((i + 1 for i, t in enumerate(ref) if t in model.terminator_ids()), len(ref))
        assert tokens and tokens == ref[:end]  # the engine stops at the terminator; chat() pads after it


def test_seeded_sampling_is_batch_invariant(model45):
    engine = BatchEngine(model45, max_batch_size=4, max_model_len=1024)
    convs = _conversations()[:4]
    opts = [SamplingOptions(max_new_tokens=10, temperature=0.9, top_p=0.9, top_k=50, seed=7 + i) for i in range(4)]
    alone = [_run_alone(engine, model45, c, o)[0] for c, o in zip(convs, opts, strict=True)]
    together = generate_batch(engine, [(_inputs(model45, c), o) for c, o in zip(convs, opts, strict=True)])
    assert together == alone
    other = _run_alone(engine, model45, convs[0], SamplingOptions(max_new_tokens=10, temperature=0.9, seed=8))[0]
    assert other != alone[0]


def test_n_choices_share_one_prefill(model26):
    engine = BatchEngine(model26, max_batch_size=4, max_model_len=512)
    conv = _conversations()[0]
    rec = _Recorder()
    greedy = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=6), n=3)
    engine.submit(greedy)
    engine.run_until_idle()
    assert engine.stats.prefills == 1
    assert rec.tokens(greedy.request_id, 0) == rec.tokens(greedy.request_id, 1) == rec.tokens(greedy.request_id, 2)
    sampled = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=6, temperature=1.0, seed=3), n=2)
    engine.submit(sampled)
    engine.run_until_idle()
    second = _run_alone(engine, model26, conv, SamplingOptions(max_new_tokens=6, temperature=1.0, seed=4))[0]
    assert rec.tokens(sampled.request_id, 1) == second  # choice i is seeded with seed + i


def test_cancel_frees_the_slot_for_a_waiting_request(model26):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=512)
    rec = _Recorder()
    conv = _conversations()[0]
    long = [rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=200)) for _ in range(2)]
    waiting = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=3))
    for r in [*long, waiting]:
        engine.submit(r)
    engine.step()
    assert engine.num_running == 2 and engine.num_waiting == 1
    engine.cancel(long[0].request_id)
    engine.step()  # the cancelled row leaves, the waiting request is prefilled into its slot
    assert rec.finish(long[0].request_id) == "cancelled"
    assert engine.num_waiting == 0 and engine.num_running == 2
    engine.cancel(long[1].request_id)
    engine.run_until_idle()
    assert rec.finish(waiting.request_id) == "length" and len(rec.tokens(waiting.request_id)) == 3
    assert len(rec.tokens(long[0].request_id)) < 5 and engine.num_running == 0


def test_cancel_while_waiting_and_single_choice(model26):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=512)
    rec = _Recorder()
    conv = _conversations()[1]
    queued = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=4))
    engine.submit(queued)
    engine.cancel(queued.request_id)
    assert engine.num_waiting == 0
    two = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=50), n=2)
    engine.submit(two)
    engine.step()
    engine.cancel(two.request_id, 1)
    engine.run_until_idle()
    assert rec.finish(two.request_id, 1) == "cancelled" and rec.finish(two.request_id, 0) == "length"
    assert len(rec.tokens(two.request_id, 0)) == 50 and rec.events[queued.request_id] == []


def test_finish_reasons_stop_token_and_length(model26):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=512)
    conv = _conversations()[2]
    tokens, _ = _run_alone(engine, model26, conv, SamplingOptions(max_new_tokens=8))
    rec = _Recorder()
    req = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=8, stop_token_ids=(tokens[3],)))
    engine.submit(req)
    engine.run_until_idle()
    cut = tokens.index(tokens[3]) + 1
    assert rec.tokens(req.request_id) == tokens[:cut] and rec.finish(req.request_id) == "stop"


def test_submit_limits(model26):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=64, max_queue=1)
    rec = _Recorder()
    small = _inputs(model26, _conversations()[0])
    with pytest.raises(ContextLengthError, match="max_model_len"):
        engine.submit(rec.request(small, SamplingOptions(max_new_tokens=60)))
    with pytest.raises(InputError, match="n must be"):
        engine.submit(rec.request(small, SamplingOptions(max_new_tokens=4), n=3))
    for _ in range(3):  # two free slots + one queue place
        engine.submit(rec.request(small, SamplingOptions(max_new_tokens=4)))
    with pytest.raises(OverloadedError, match="queue is full"):
        engine.submit(rec.request(small, SamplingOptions(max_new_tokens=4)))
    with pytest.raises(InputError, match="max_model_len"):
        BatchEngine(model26, max_model_len=10**9)


def test_failing_prefill_only_fails_its_request(model26):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=512)
    rec = _Recorder()
    good = rec.request(_inputs(model26, _conversations()[0]), SamplingOptions(max_new_tokens=4))
    two_rows = model26.runner.prepare(model26.processor(_conversations()[:2]), id0_quirk=False)  # a batch of 2: refused
    bad = rec.request(two_rows, SamplingOptions(max_new_tokens=4))
    engine.submit(bad)
    engine.submit(good)
    engine.run_until_idle()
    assert rec.finish(bad.request_id) == "error" and isinstance(rec.events[bad.request_id][0].error, InputError)
    assert rec.finish(good.request_id) == "length" and len(rec.tokens(good.request_id)) == 4


def test_failing_decode_step_ends_rows_and_engine_recovers(model26, monkeypatch):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=512)
    rec = _Recorder()
    conv = _conversations()[0]
    victim = rec.request(_inputs(model26, conv), SamplingOptions(max_new_tokens=10))
    engine.submit(victim)
    engine.step()  # prefill + first decode step
    real = engine.lm.forward

    def broken(*a, **k):
        raise RuntimeError("simulated device failure")

    monkeypatch.setattr(engine.lm, "forward", broken)
    engine.step()
    monkeypatch.setattr(engine.lm, "forward", real)
    assert rec.finish(victim.request_id) == "error" and engine.num_running == 0
    tokens, _ = _run_alone(engine, model26, conv, SamplingOptions(max_new_tokens=10))
    assert len(tokens) == 10


def test_background_thread_serves_and_stops(model45):
    engine = BatchEngine(model45, max_batch_size=2, max_model_len=512)
    engine.start()
    done = threading.Event()
    got: list[BatchEvent] = []

    def sink(event: BatchEvent) -> None:
        got.append(event)
        if event.finish_reason:
            done.set()

    engine.submit(BatchRequest(_inputs(model45, _conversations()[0]), SamplingOptions(max_new_tokens=5), sink))
    assert done.wait(60)
    assert [e.finish_reason for e in got][-1] == "length" and len(got) == 5
    engine.stop()
    assert not engine.alive
    with pytest.raises(OverloadedError, match="shutting down"):
        engine.submit(BatchRequest(_inputs(model45, _conversations()[0]), SamplingOptions(max_new_tokens=5), sink))


def test_fast_mode_runs_only_busy_rows(model26):
    engine = BatchEngine(model26, max_batch_size=8, max_model_len=1024, batch_invariant=False)
    convs = _conversations()[:3]
    out = generate_batch(engine, [(_inputs(model26, c), SamplingOptions(max_new_tokens=6)) for c in convs])
    exact = BatchEngine(model26, max_batch_size=8, max_model_len=1024)
    ref = generate_batch(exact, [(_inputs(model26, c), SamplingOptions(max_new_tokens=6)) for c in convs])
    assert [len(t) for t in out] == [6, 6, 6]
    assert [t[0] for t in out] == [t[0] for t in ref]  # the prefill is the same in both modes


def _pick(logits, history, params, eos=()):
    return choose_tokens(logits[None], [DecodeRow(params, generated=list(history))], eos)[0]


def test_choose_tokens_penalties_and_bias():
    logits = torch.tensor([0.0, 5.0, 4.9, 1.0])
    assert _pick(logits, [], SamplingOptions(max_new_tokens=1)) == 1
    assert _pick(logits, [1], SamplingOptions(max_new_tokens=1, presence_penalty=0.5)) == 2
    assert _pick(logits, [1], SamplingOptions(max_new_tokens=1, frequency_penalty=0.05)) == 1
    assert _pick(logits, [1, 1, 1], SamplingOptions(max_new_tokens=1, frequency_penalty=0.05)) == 2
    assert _pick(logits, [], SamplingOptions(max_new_tokens=1, logit_bias=[(3, 10.0)])) == 3
    assert _pick(logits, [], SamplingOptions(max_new_tokens=1, min_tokens=1), (1,)) == 2


def test_rows_with_different_settings_are_processed_one_by_one():
    logits = torch.tensor([[0.0, 5.0, 4.9, 1.0], [0.0, 5.0, 4.9, 1.0]])
    rows = [DecodeRow(SamplingOptions(max_new_tokens=3), generated=[1]),
            DecodeRow(SamplingOptions(max_new_tokens=3, presence_penalty=0.5), generated=[1])]
    assert choose_tokens(logits, rows, ()) == [1, 2]
    rows[0].finish_reason = "stop"
    assert choose_tokens(logits, rows, ()) == [0, 2]  # a finished row pads


class _RowwiseLinear(torch.nn.Linear):
    """A linear layer computed row by row (elementwise products, then a sum): each row's result is
    the same whatever the row count. torch's own fp32 GEMM is not on every CPU (on a Sapphire
    Rapids host 4 and 8 rows of an 8x8 layer round differently), so the probe is tested on this."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, None, :] * self.weight[None]).sum(-1) + self.bias  # [rows, out]


class _RowCountSensitive(_RowwiseLinear):
    """A linear layer whose rounding depends on how many rows it gets (like a GEMM tail path)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + (x.shape[0] % 4) * 1e-3


def test_row_step_probes_linear_layers():
    torch.manual_seed(0)
    assert row_step(torch.nn.Sequential(_RowwiseLinear(8, 8)), 1) == 1
    assert row_step(torch.nn.Sequential(_RowCountSensitive(8, 8)), 8) == 4
    assert row_step(torch.nn.Sequential(_RowCountSensitive(8, 8)), 6) == 6  # 4 and 6 rows round differently


def test_same_image_in_a_later_request_is_not_encoded_again(model26, monkeypatch):
    engine = BatchEngine(model26, max_batch_size=2, max_model_len=1024)
    calls = []
    real = model26.model.encode_images
    monkeypatch.setattr(model26.model, "encode_images", lambda *a, **k: calls.append(1) or real(*a, **k))
    conv = [{"role": "user", "content": [_image(7), "What is it?"]}]
    first, first_logits = _run_alone(engine, model26, conv, SamplingOptions(max_new_tokens=6))
    assert len(calls) == 1
    again, again_logits = _run_alone(engine, model26, conv, SamplingOptions(max_new_tokens=6))
    assert len(calls) == 1 and engine.features.hits > 0  # served from the engine's feature cache
    assert again == first and all(torch.equal(a, b) for a, b in zip(again_logits, first_logits, strict=True))
    _run_alone(engine, model26, [{"role": "user", "content": [_image(8), "And this?"]}],
               SamplingOptions(max_new_tokens=2))
    assert len(calls) == 2  # a different image is encoded


def _mixed_run(engine, model, limits=(12, 5, 20, 9, 16, 14, 11)):
    """The requests of ``_conversations`` joining at different token boundaries; tokens and logits."""
    rec = _Recorder()
    reqs = [rec.request(_inputs(model, c), SamplingOptions(max_new_tokens=n))
            for c, n in zip(_conversations(), limits, strict=True)]
    for k, req in enumerate(reqs):
        engine.submit(req)
        for _ in range(k % 3):
            engine.step()
    engine.run_until_idle()
    return [(rec.tokens(r.request_id), rec.logits(r.request_id)) for r in reqs]


def test_static_width_gives_the_rounded_width_logits_bitwise(model, monkeypatch):
    """Static shapes (every step attends over max_model_len, rows from the buckets) under the
    batch-invariant settings: bit-identical to the rounded-width engine."""
    static = BatchEngine(model, max_batch_size=6, max_model_len=1024, decode_mode=DecodeMode(static=True))
    buckets = static.row_buckets  # [4, 6] where 4-row and 6-row GEMMs agree per row, [2, 4, 6] on hosts
    assert buckets[-1] == 6 and all(b % buckets[0] == 0 for b in buckets[:-1])  # where 2 rows do too
    shapes = []
    real = static.lm.forward
    monkeypatch.setattr(static.lm, "forward", lambda e, p, m, **k: shapes.append(tuple(m.shape)) or real(e, p, m, **k))
    got = _mixed_run(static, model)
    monkeypatch.undo()
    ref = _mixed_run(BatchEngine(model, max_batch_size=6, max_model_len=1024), model)
    assert [t for t, _ in got] == [t for t, _ in ref]
    pairs = [(a, b) for (_, la), (_, lb) in zip(got, ref, strict=True) for a, b in zip(la, lb, strict=True)]
    assert pairs and all(torch.equal(a, b) for a, b in pairs)
    decode_shapes = {s for s in shapes if s[0] > 1}
    assert decode_shapes <= {(b, 1024) for b in buckets} and len(decode_shapes) >= 2  # several buckets used


def test_compiled_engine_alone_equals_batched_and_eager(model26):
    """The compiled step (one graph: 4 rows, the probed row count, at the static width) gives the
    same logits alone and in a batch, and the eager engine's tokens."""
    compiled = BatchEngine(model26, max_batch_size=4, max_model_len=512, decode_mode=DecodeMode(compile="default"))
    assert compiled.row_buckets[-1] == 4  # [4], or [2, 4] on a host whose 2-row GEMMs agree per row
    limits = [9, 5, 12, 7]
    convs = _conversations()[3:]
    work = list(zip(convs, limits, strict=True))
    alone = [_run_alone(compiled, model26, c, SamplingOptions(max_new_tokens=n)) for c, n in work]
    rec = _Recorder()
    reqs = [rec.request(_inputs(model26, c), SamplingOptions(max_new_tokens=n)) for c, n in work]
    for req in reqs:
        compiled.submit(req)
        compiled.step()
    compiled.run_until_idle()
    assert compiled.stats.busy_rows_sum > compiled.stats.steps
    for req, (tokens, logits) in zip(reqs, alone, strict=True):
        assert rec.tokens(req.request_id) == tokens
        assert all(torch.equal(a, b) for a, b in zip(rec.logits(req.request_id), logits, strict=True))
    eager = BatchEngine(model26, max_batch_size=4, max_model_len=512)
    assert [_run_alone(eager, model26, c, SamplingOptions(max_new_tokens=n))[0]
            for c, n in work] == [t for t, _ in alone]


def test_row_buckets():
    assert row_buckets(1, 64) == [1, 2, 4, 8, 16, 32, 64]
    assert row_buckets(4, 24) == [4, 8, 16, 24]
    assert row_buckets(6, 6) == [6]
