"""The local runner: one process, worker threads that read and preprocess rows, and the
continuous-batching engine answering them.

``run_local(job, rows, sink)`` loads the model once, starts the engine in its background thread
(``engine_adapter.EngineAdapter``) and keeps at most ``2 x max_batch_size + workers`` rows in
flight, so memory stays bounded whatever the collection's size: ``workers`` threads prepare rows
(``prepare.Preparer``) and submit them to the engine as they are ready; the calling thread
collects finished rows in completion order and gives them to the sink, which writes them in
chunks. A row that fails (bad file, too long, engine error) is a record with its error. On an
interrupt the rows already finished are handed to the sink before the engine stops. This module
does not know about Ray or the output format.
"""

from __future__ import annotations

import logging
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .engine_adapter import Answer, EngineAdapter, error_text
from .inputs import Row
from .job import BatchJob, ChunkSink, record
from .prepare import Preparer

log = logging.getLogger(__name__)


def run_local(job: BatchJob, rows: list[Row], sink: ChunkSink) -> None:
    """Answer ``rows`` with one model in this process; see the module docstring."""
    from ..api import load

    model = load(job.model, dtype=job.dtype, device=job.device)
    adapter = EngineAdapter(model, max_batch_size=job.max_batch_size, max_model_len=job.max_model_len,
                            batch_invariant=job.batch_invariant)
    preparer = Preparer(model.processor, job.defaults)
    results: queue.Queue[dict[str, Any]] = queue.Queue()
    slots = threading.Semaphore(2 * adapter.max_batch_size + max(1, job.workers))
    stop = threading.Event()

    def work(row: Row) -> None:
        try:
            prepared = preparer(row)
            if prepared.error is not None:
                results.put(record(row.id, Answer(error=prepared.error)))
                return
            assert prepared.inputs is not None
            adapter.submit(prepared.inputs, prepared.settings, lambda a: results.put(record(row.id, a)))
        except Exception as e:  # noqa: BLE001 - a row's failure must reach the output, not kill the job
            log.exception("row %r failed", row.id)
            results.put(record(row.id, Answer(error=error_text(e))))

    def feed(pool: ThreadPoolExecutor) -> None:
        for row in rows:
            while not slots.acquire(timeout=0.5):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            pool.submit(work, row)

    adapter.start()
    pool = ThreadPoolExecutor(max(1, job.workers), thread_name_prefix="minicpmv-batch-prep")
    feeder = threading.Thread(target=feed, args=(pool,), name="minicpmv-batch-feed", daemon=True)
    feeder.start()
    try:
        for _ in range(len(rows)):
            while True:
                try:
                    rec = results.get(timeout=min(1.0, max(0.05, sink.chunk_seconds)))
                    break
                except queue.Empty:
                    sink.tick()
            slots.release()
            sink.add(rec)
            sink.tick()
    finally:
        stop.set()
        _drain(results, sink)
        feeder.join()
        pool.shutdown(wait=True, cancel_futures=True)
        adapter.stop()


def _drain(results: queue.Queue[dict[str, Any]], sink: ChunkSink) -> None:
    """Hand over whatever finished but was not collected yet (after an interrupt)."""
    while True:
        try:
            sink.add(results.get_nowait())
        except queue.Empty:
            return
