"""Continuous batching: many generation requests share one decode batch.

``BatchEngine`` owns a ``SlotKVCache`` (``max_batch_size`` rows of ``max_model_len`` positions,
preallocated). A new request waits in a FIFO queue; at the next token boundary it is prefilled
*alone* (batch 1, exactly as ``ChatModel`` would prefill it: ``ModelRunner.prepare`` gives the
embeddings, the image features coming from the engine's feature cache) straight into a free slot,
copied into one more slot per further choice (``n``), and from then on it decodes together with
every other running row, one token per step. Tokens are chosen by the token loop's own
``choose_tokens`` (the same processors and sampler as ``chat()``). A row that finishes
(terminator, stop token id, token limit) or is cancelled leaves at once and frees its slot.

How rows of different lengths share the cache: each row's tokens sit left-aligned in its slot
(position 0 .. len-1, no left padding); a decode step writes every row's new key/value at that
row's own length and attends over a width ``W`` with a per-row key mask (positions past the
row's length, and id-0 tokens when the official quirk is on, are hidden with ``finfo.min``, so
they get exactly zero weight). Positions follow HF (``#visible tokens - 1``), as in
``generate.py``.

Batch invariance (``batch_invariant=True``, the default). Measured on CPU (fp32): a GEMM's
result for a row can change with the number of rows in the call (MKL rounds the rows of a
partial block differently), and the flash SDPA kernel's result for a row depends on the batch
size and the row's position in it. So decode steps (1) use PyTorch's math SDPA kernel, whose
softmax and weighted sum give bit-identical results whatever the batch size and whatever the key
window beyond a row's length (masked positions contribute exact zeros; checked for every window
64..4096 in steps of 64), with the window rounded up to a multiple of 64; and (2) run a number of
rows (busy or idle dummy rows) taken from a set of row counts for which every linear layer of
the LLM computes each row bit-identically: ``row_step`` probes the layer shapes once at start
(typically multiples of 4 on MKL; if nothing smaller qualifies, always ``max_batch_size``). A
request's logits, hence its greedy tokens and seeded samples, are then bit-identical alone or in
any batch; ``tests/engine/test_batch_engine.py`` checks this with ``torch.equal`` on the tiny
checkpoints. The price is some compute for idle rows; ``batch_invariant=False`` runs exactly the
rows up to the highest busy slot with the exact window and the default SDPA kernel: faster, but
logits may then differ in the last bits between batches (about 1e-6 on the tiny checkpoints).

Static shapes (``decode_mode``, by default the runner's; ``load(compile=...)``). A static mode
attends over the whole ``max_model_len`` at every step and runs a number of rows taken from a few
buckets (powers of two times the row granularity, and ``max_batch_size``), so decode steps come in
a handful of shapes: compiled once with the row count symbolic, a CUDA graph recorded per bucket
with "reduce-overhead". Every row's
token, position and write index reach the device in one copy per step, and the step is the token
loop's own ``decode_logits`` (eager or compiled). With the batch-invariant settings a row's logits
are the same at the static width as at the rounded width.

This module does not parse HTTP or decode text (``stream.TextStream`` does); it works on token
ids. It is thread-safe for ``submit``/``cancel`` from any thread while ``step`` runs in one
thread (``start`` runs it in a background thread).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ..checks import is_int
from ..errors import ContextLengthError, InputError, MiniCPMVError, OverloadedError
from ..processing.processor import ModelInputs
from .chat import ChatModel
from .features import FeatureCache
from .generate import DecodeMode, DecodeRow, choose_tokens, forward_last, mark_rows, prefill_positions, run_step
from .kv_cache import SlotKVCache
from .runner import PreparedBatch
from .sampling import SamplingParams, make_generator
from .stream import FinishReason

log = logging.getLogger(__name__)

WIDTH_STEP = 64  # batch-invariant decoding attends over a multiple of this many positions


# ---------------------------------------------------------------------------- public records
@dataclass(frozen=True)
class BatchEvent:
    """One generated token of one choice, or the end of a choice.

    ``token_id`` is None only for events without a token (cancelled, error). ``logits`` (raw
    float32 ``[V]`` the token was chosen from) is filled when the request asked for it.
    """

    request_id: str
    index: int
    token_id: int | None = None
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    error: BaseException | None = None
    logits: torch.Tensor | None = None


EventCallback = Callable[[BatchEvent], None]


@dataclass
class BatchRequest:
    """A conversation to answer: processor output for exactly one conversation (or an already
    prepared batch of one row), its sampling settings (choice i draws with ``seed + i``), and
    where to send events. ``id0_quirk`` applies the reference's id-0 prompt mask."""

    inputs: ModelInputs | PreparedBatch
    params: SamplingParams
    on_event: EventCallback
    n: int = 1
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex)
    id0_quirk: bool = False
    want_logits: bool = False

    @property
    def prompt_len(self) -> int:
        if isinstance(self.inputs, PreparedBatch):
            return int(self.inputs.inputs_embeds.shape[1])
        return len(self.inputs.input_ids[0])


@dataclass
class EngineStats:
    """Counters since the engine was built (read them from any thread; they only grow)."""

    steps: int = 0
    prefills: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0
    busy_rows_sum: int = 0  # sum over decode steps of the rows that were busy


@dataclass
class _Row(DecodeRow):
    """One running choice: the token loop's row plus where it lives in the slot cache."""

    request: BatchRequest | None = None
    index: int = 0
    slot: int = 0
    length: int = 0  # positions in the cache
    visible: int = 0  # visible positions (the HF position of the next token is this value)
    prompt_tokens: int = 0
    pending: int = 0  # chosen token not yet fed to the model


# ---------------------------------------------------------------------------- row counts
def row_step(lm: Any, max_rows: int) -> int:
    """The smallest row granularity R whose row counts give bit-identical linear layers.

    Decoding with ``rows`` in {R, 2R, ...} (capped at ``max_rows``) is batch-invariant only if
    every linear layer of the LLM computes each row exactly as it does with ``max_rows`` rows.
    Kernel choice depends on shapes only, so one probe per layer shape on random input shows it;
    R = ``max_rows`` (always invariant: a single shape) when no smaller R passes.
    """
    module = getattr(lm, "llm", lm)
    layers: dict[tuple[int, int, bool], torch.nn.Linear] = {}
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            layers.setdefault((m.in_features, m.out_features, m.bias is not None), m)
    gen = torch.Generator().manual_seed(0)
    with torch.inference_mode():
        probes = []
        for layer in layers.values():
            x = torch.randn(max_rows, layer.in_features, generator=gen).to(layer.weight.dtype)
            x = x.to(layer.weight.device)
            probes.append((layer, x, layer(x)))  # [max_rows, out]
        step = 1
        while step < max_rows:
            counts = [*range(step, max_rows, step), max_rows]
            if all(torch.equal(layer(x[:n]), ref[:n]) for layer, x, ref in probes for n in counts):
                return step
            step *= 2
    return max_rows


def row_buckets(step: int, max_rows: int) -> list[int]:
    """The row counts of static-shape decode steps: ``step`` times powers of two, and ``max_rows``."""
    out, n = [], step
    while n < max_rows:
        out.append(n)
        n *= 2
    return [*out, max_rows]


# ---------------------------------------------------------------------------- engine
class BatchEngine:
    """Continuous-batching generator over a ``ChatModel``; see the module docstring.

    ``max_batch_size`` rows decode together; ``max_model_len`` positions per row (prompt +
    answer; default min(model context, 4096)); ``max_queue`` requests may wait beyond the free
    slots before ``submit`` raises ``OverloadedError``; ``prefill_budget`` caps the prompt tokens
    prefilled in one iteration (at least one request is always admitted).
    """

    def __init__(
        self,
        model: ChatModel,
        *,
        max_batch_size: int = 8,
        max_model_len: int | None = None,
        max_queue: int = 256,
        batch_invariant: bool = True,
        prefill_budget: int = 8192,
        feature_cache: FeatureCache | None = None,
        decode_mode: DecodeMode | None = None,
    ) -> None:
        runner = model.runner
        limit = runner.context_length
        capacity = min(limit, 4096) if max_model_len is None else int(max_model_len)
        if not 2 <= capacity <= limit:
            raise InputError(f"max_model_len must be in [2, {limit}] for this checkpoint, got {capacity}")
        if not is_int(max_batch_size) or max_batch_size < 1:
            raise InputError(f"max_batch_size must be an integer >= 1, got {max_batch_size!r}")
        if not is_int(max_queue) or max_queue < 0:
            raise InputError(f"max_queue must be an integer >= 0, got {max_queue!r}")
        self.runner = runner
        self.lm = runner.model
        self.max_batch_size = max_batch_size
        self.max_model_len = capacity
        self.max_queue = max_queue
        self.batch_invariant = batch_invariant
        self.prefill_budget = prefill_budget
        self.eos_ids = runner.eos_ids
        self.stats = EngineStats()
        self.features = feature_cache if feature_cache is not None else FeatureCache()  # engine thread only
        self._cache = SlotKVCache.for_model(self.lm, max_batch_size, capacity)
        self.row_step = row_step(self.lm, max_batch_size) if batch_invariant else 1
        self.decode_mode = decode_mode if decode_mode is not None else runner.decode_mode
        self._step = self.decode_mode.step(dynamic_rows=True)
        self.row_buckets = row_buckets(self.row_step, max_batch_size)
        if self.decode_mode.compile is not None:
            self._cache.mark_static()
        self._rows: dict[int, _Row] = {}  # slot -> row (engine thread only)
        self._free = list(range(max_batch_size))  # lowest slot first
        self._waiting: deque[BatchRequest] = deque()
        self._cancelled: set[tuple[str, int | None]] = set()  # (request id, choice or None = all)
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- submission (any thread) -------------------------------------------------------------
    @property
    def num_running(self) -> int:
        return len(self._rows)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def alive(self) -> bool:
        """True while the background loop runs (or, without one, until ``stop``)."""
        if self._stopping:
            return False
        return self._thread is None or self._thread.is_alive()

    def check(self, request: BatchRequest) -> None:
        """Raise the error ``submit`` would raise for this request's shape (no queue checks)."""
        if not is_int(request.n) or not 1 <= request.n <= self.max_batch_size:
            raise InputError(f"n must be between 1 and {self.max_batch_size} (the batch size), got {request.n!r}")
        t, new = request.prompt_len, request.params.max_new_tokens
        if t < 1:
            raise InputError("the prompt holds no tokens")
        if t + new > self.max_model_len:
            raise ContextLengthError(
                f"the prompt has {t} tokens and up to {new} new tokens were requested, but the "
                f"context holds {self.max_model_len} tokens (max_model_len); shorten the "
                "conversation, use fewer or smaller images, or lower max_tokens"
            )

    def submit(self, request: BatchRequest) -> str:
        """Queue a request; it joins the running batch at the next token boundary."""
        self.check(request)
        with self._cond:
            if self._stopping:
                raise OverloadedError("the batch engine is shutting down")
            if len(self._waiting) >= self.max_queue + len(self._free):  # free slots take requests at once
                raise OverloadedError(f"the request queue is full ({self.max_queue} waiting); retry later")
            self._waiting.append(request)
            self._cond.notify_all()
        return request.request_id

    def cancel(self, request_id: str, index: int | None = None) -> None:
        """Stop a request (or only its choice ``index``): dropped from the queue, or its rows
        leave at the next token boundary with finish_reason 'cancelled'."""
        with self._cond:
            before = len(self._waiting)
            if index is None:
                self._waiting = deque(r for r in self._waiting if r.request_id != request_id)
            if len(self._waiting) == before:
                self._cancelled.add((request_id, index))
            self._cond.notify_all()

    # -- the loop ------------------------------------------------------------------------------
    def has_work(self) -> bool:
        with self._cond:
            return bool(self._rows or self._waiting or self._cancelled)

    def step(self) -> None:
        """One scheduling iteration: apply cancellations, admit waiting requests, decode once."""
        with torch.inference_mode():
            self._apply_cancellations()
            self._admit()
            if self._rows:
                self._decode_step()

    def run_until_idle(self, max_steps: int | None = None) -> None:
        """Step in the calling thread until nothing is running or waiting (tests, scripts)."""
        n = 0
        while self.has_work() and (max_steps is None or n < max_steps):
            self.step()
            n += 1

    def start(self) -> None:
        """Run the loop in a daemon thread (idempotent)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._loop, name="minicpmv-batch-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop the loop; running and waiting requests end with finish_reason 'cancelled'."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for req in waiting:
            for i in range(req.n):
                self._emit(req, BatchEvent(req.request_id, i, finish_reason="cancelled"))
        for row in list(self._rows.values()):
            self._finish(row, "cancelled")

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._stopping and not (self._rows or self._waiting or self._cancelled):
                    self._cond.wait()
                if self._stopping:
                    return
            try:
                self.step()
            except Exception:  # noqa: BLE001 - keep serving; step already failed the rows it could
                log.exception("batch engine step failed")
                self._fail_all(RuntimeError("internal error in the batch engine"))

    # -- scheduling ----------------------------------------------------------------------------
    def _apply_cancellations(self) -> None:
        with self._cond:
            ids, self._cancelled = self._cancelled, set()
        if ids:
            hit = [r for r in self._rows.values()
                   if (r.request.request_id, None) in ids or (r.request.request_id, r.index) in ids]
            for row in hit:
                self._finish(row, "cancelled")

    def _admit(self) -> None:
        budget, admitted = self.prefill_budget, 0
        while True:
            with self._cond:
                if not self._waiting or len(self._free) < self._waiting[0].n:
                    return
                t = self._waiting[0].prompt_len
                if admitted and t > budget:
                    return
                req = self._waiting.popleft()
            budget, admitted = budget - t, admitted + 1
            self._prefill_guarded(req)

    def _prefill_guarded(self, req: BatchRequest) -> None:
        try:
            self._prefill(req)
        except MiniCPMVError as e:
            self._fail_request(req, e)
        except Exception as e:  # noqa: BLE001 - one bad request must not stop the engine
            log.exception("prefill of request %s failed", req.request_id)
            self._fail_request(req, e)

    def _prepare(self, req: BatchRequest) -> PreparedBatch:
        if isinstance(req.inputs, PreparedBatch):
            prep = req.inputs
        else:
            if len(req.inputs) != 1:
                raise InputError(f"a batch request holds one conversation, got {len(req.inputs)}")
            prep = self.runner.prepare(req.inputs, feature_cache=self.features, id0_quirk=req.id0_quirk)
        if prep.inputs_embeds.shape[0] != 1:
            raise InputError(f"a batch request holds one conversation, got {prep.inputs_embeds.shape[0]}")
        return prep

    def _prefill(self, req: BatchRequest) -> None:
        """Prefill the request alone into its first slot; further choices copy that slot."""
        prep = self._prepare(req)
        mask = prep.attention_mask.to(device=self.lm.device, dtype=torch.long)  # [1, T]
        t = int(mask.shape[1])
        slots = [self._free.pop(0) for _ in range(req.n)]
        try:
            cache = self._cache.prefill(slots[0], mask[0])
            logits = forward_last(self.lm, prep.inputs_embeds, prefill_positions(mask), mask, cache)  # [1, V]
        except BaseException:
            self._free = sorted(self._free + slots)
            raise
        self.stats.prefills += 1
        self.stats.prompt_tokens += t
        rows = []
        for i, slot in enumerate(slots):
            if i:
                self._cache.copy_slot(slots[0], slot, t)
            row = _Row(req.params, self._generator(req.params, i), request=req, index=i, slot=slot, length=t,
                       visible=int(mask.sum()), prompt_tokens=t)
            self._rows[slot] = row
            rows.append(row)
        self._choose(rows, logits.expand(len(rows), -1))

    def _generator(self, params: SamplingParams, index: int) -> torch.Generator | None:
        """Choice ``index`` draws with ``seed + index`` (a fresh random seed without one)."""
        if params.do_sample and params.seed is None:
            params = replace(params, seed=secrets.randbits(63))
        return make_generator(params, self.lm.device, index)

    def _shape(self) -> tuple[int, int]:
        """(rows, key width) of the next decode step; see the module docstring."""
        width = max(r.length for r in self._rows.values()) + 1
        rows = max(self._rows) + 1
        if self.decode_mode.static:
            return next(n for n in self.row_buckets if n >= rows), self.max_model_len
        if self.batch_invariant:
            rows = min(-(-rows // self.row_step) * self.row_step, self.max_batch_size)
            return rows, min(-(-width // WIDTH_STEP) * WIDTH_STEP, self.max_model_len)
        return rows, width

    def _decode_step(self) -> None:
        rows_n, width = self._shape()
        busy = list(self._rows.values())
        rows = [[0, 0, 0] for _ in range(rows_n)]  # token, position, write index per row (idle rows: 0)
        slots = [r.slot for r in busy]
        for r in busy:
            rows[r.slot] = [r.pending, r.visible, r.length]
            self._cache.mask[r.slot, r.length] = 1  # each row's new key becomes visible
        dev = self.lm.device
        try:
            tokens, pos, write = torch.tensor(rows, dtype=torch.long).T.to(dev)  # [R] x3, one copy to the device
            pos, mask = pos[:, None], self._cache.mask[:rows_n, :width]  # [R, 1], [R, W]
            if self.decode_mode.compile is not None:
                mark_rows(tokens, pos, mask, write)
            cache = self._cache.decode(rows_n, width, write, static=self.decode_mode.static)
            with self._attention_kernel():
                logits = run_step(self._step, self.lm, tokens, pos, mask, cache)  # [R, V]
        except Exception as e:  # noqa: BLE001 - fail the running rows, keep the engine alive
            log.exception("decode step failed; ending %d running rows", len(busy))
            self._fail_all(e)
            return
        self.stats.steps += 1
        self.stats.busy_rows_sum += len(busy)
        for r in busy:
            r.length += 1
            r.visible += 1
        self._choose(busy, logits[slots])

    def _attention_kernel(self) -> contextlib.AbstractContextManager[Any]:
        if not self.batch_invariant:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def _choose(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next token from its logits ([R, V], row order) and send the events."""
        chosen = choose_tokens(logits, rows, self.eos_ids)
        for row, tok, row_logits in zip(rows, chosen, logits, strict=True):
            finish = row.accept(tok, self.eos_ids)
            self.stats.generated_tokens += 1
            if finish is None and row.length >= self.max_model_len:
                finish = "length"  # cannot happen when submit's length check held; kept as a guard
            req = row.request
            assert req is not None
            event = BatchEvent(req.request_id, row.index, token_id=tok, finish_reason=finish,
                               prompt_tokens=row.prompt_tokens, logits=row_logits if req.want_logits else None)
            if finish is not None:
                self._release(row)
            else:
                row.pending = tok
            self._emit(req, event)

    # -- endings -------------------------------------------------------------------------------
    def _release(self, row: _Row) -> None:
        if self._rows.get(row.slot) is row:
            del self._rows[row.slot]
            self._cache.release(row.slot)
            self._free.append(row.slot)
            self._free.sort()

    def _finish(self, row: _Row, reason: FinishReason, error: BaseException | None = None) -> None:
        self._release(row)
        self._emit(row.request, BatchEvent(row.request.request_id, row.index, finish_reason=reason,
                                           prompt_tokens=row.prompt_tokens, error=error))

    def _fail_request(self, req: BatchRequest, error: BaseException) -> None:
        for row in [r for r in self._rows.values() if r.request is req]:
            self._release(row)
        for i in range(req.n):
            self._emit(req, BatchEvent(req.request_id, i, finish_reason="error", error=error))

    def _fail_all(self, error: BaseException) -> None:
        for row in list(self._rows.values()):
            self._finish(row, "error", error)

    def _emit(self, req: BatchRequest, event: BatchEvent) -> None:
        try:
            req.on_event(event)
        except Exception:  # noqa: BLE001 - a broken listener only loses its own request
            log.exception("event callback of request %s failed; cancelling it", req.request_id)
            with self._cond:
                self._cancelled.add((req.request_id, None))


def generate_batch(
    engine: BatchEngine, requests: list[tuple[ModelInputs | PreparedBatch, SamplingParams]]
) -> list[list[int]]:
    """Run ``requests`` through ``engine`` in the calling thread; return each one's token ids.

    A convenience for scripts and tests (the engine must not run a background loop); the first
    request error is raised after the batch has run.
    """
    results: list[list[int]] = [[] for _ in requests]
    errors: list[BaseException] = []
    for (inputs, params), sink in zip(requests, results, strict=True):
        engine.submit(BatchRequest(inputs, params, _collector(sink, errors)))
    started = time.perf_counter()
    engine.run_until_idle()
    log.debug("generate_batch: %d requests in %.3f s", len(requests), time.perf_counter() - started)
    if errors:
        raise errors[0]
    return results


def _collector(sink: list[int], errors: list[BaseException]) -> EventCallback:
    def on_event(event: BatchEvent) -> None:
        if event.error is not None:
            errors.append(event.error)
        if event.token_id is not None:
            sink.append(event.token_id)

    return on_event
