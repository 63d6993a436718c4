"""A batch job from end to end: find the rows, skip those already done, run, write, report.

``run_batch(job)`` discovers the input's rows (``inputs.discover``), opens the output (``output``:
the ids it already holds are skipped, so a rerun resumes), and hands the remaining rows to the
local runner (``local.run_local``: one process, the continuous-batching engine) or, with
``job.ray`` set, to the Ray Data runner (``ray_data.run_ray``). Both runners give their records
to a ``ChunkSink``, which writes them in chunks of ``chunk_rows`` records or every
``chunk_seconds`` (whichever comes first) and drives the progress bar (tqdm: rate and ETA).
The ``Summary`` says how many rows were done, failed, skipped and how long it took. This module
does not decode media or touch the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import InputError
from .engine_adapter import Answer
from .inputs import Row, discover
from .output import JsonlWriter, ParquetWriter, open_output

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray job runs (``minicpmv batch --ray``)."""

    address: str | None = None  # None: connect to the running Ray if any, else start a local one
    replicas: int = 1
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    cpu_workers: int = 1  # actors that read, decode and preprocess
    rows_per_call: int | None = None  # rows a replica gets at a time (default: 2 x max_batch_size)
    num_cpus: int | None = None  # CPUs a local Ray offers (default: the machine's)
    object_store_mb: int | None = None  # a local Ray's object store (default: Ray's choice)
    pid_dir: str | None = None  # each replica writes replica-PID.pid here (to monitor or signal them)


@dataclass(frozen=True)
class BatchJob:
    """Everything ``minicpmv batch`` was asked to do."""

    model: str
    input: str
    output: str
    prompt: str | None = None
    defaults: dict[str, Any] = field(default_factory=dict)  # job-wide generation settings
    dtype: str = "bfloat16"
    device: str = "cpu"
    max_batch_size: int = 8
    max_model_len: int | None = None
    batch_invariant: bool = True
    workers: int = 2  # local: threads that read and preprocess rows
    chunk_rows: int = 64
    chunk_seconds: float = 10.0
    progress: bool = True
    ray: RayOptions | None = None


@dataclass
class Summary:
    rows: int = 0  # rows in the input
    already_done: int = 0  # skipped because the output held them
    written: int = 0
    failed: int = 0  # written with an error
    duplicates: int = 0  # second results for a row, dropped
    skipped_files: int = 0  # files in an input folder that are neither images nor videos
    seconds: float = 0.0

    def line(self) -> str:
        rate = self.written / self.seconds if self.seconds > 0 else 0.0
        extra = f", {self.skipped_files} other file(s) ignored" if self.skipped_files else ""
        return (f"{self.written} row(s) written ({self.failed} with an error), {self.already_done} already done, "
                f"{self.rows} in the input{extra}; {self.seconds:.1f} s, {rate:.2f} rows/s")


def record(row_id: str, answer: Answer) -> dict[str, Any]:
    """One output record."""
    return {"id": row_id, "answer": answer.answer, "reasoning": answer.reasoning,
            "prompt_tokens": answer.prompt_tokens, "completion_tokens": answer.completion_tokens,
            "finish_reason": answer.finish_reason, "error": answer.error}


class ChunkSink:
    """Collects records and writes them to the output in chunks; advances the progress bar per row."""

    def __init__(self, writer: JsonlWriter | ParquetWriter, *, chunk_rows: int, chunk_seconds: float,
                 progress: Any = None, clock: Callable[[], float] = time.monotonic) -> None:
        if chunk_rows < 1:
            raise InputError(f"chunk_rows must be >= 1, got {chunk_rows}")
        self.writer = writer
        self.chunk_rows = chunk_rows
        self.chunk_seconds = chunk_seconds
        self.progress = progress
        self.clock = clock
        self.buffer: list[dict[str, Any]] = []
        self._last = clock()

    def add(self, rec: dict[str, Any]) -> None:
        self.buffer.append(rec)
        if self.progress is not None:
            self.progress.update(1)  # finished rows, written with the next chunk
        if len(self.buffer) >= self.chunk_rows:
            self.flush()

    def tick(self) -> None:
        """Flush when the oldest buffered record has waited ``chunk_seconds``."""
        if self.buffer and self.clock() - self._last >= self.chunk_seconds:
            self.flush()

    def flush(self) -> None:
        self._last = self.clock()
        if not self.buffer:
            return
        chunk, self.buffer = self.buffer, []
        self.writer.write(chunk)


def _progress(total: int, initial: int, enabled: bool) -> Any:
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError as e:
        raise InputError('the progress bar needs tqdm: pip install "minicpmv[batch]" (or pass --no-progress)') from e
    return tqdm(total=total, initial=initial, unit="row", dynamic_ncols=True, smoothing=0.1)


def run_batch(job: BatchJob) -> Summary:
    """Run ``job`` (see the module docstring); returns what happened."""
    started = time.perf_counter()
    if job.ray is not None:
        from .ray_setup import import_ray

        import_ray()  # a missing extra fails before any file is listed
    _refuse_input_as_output(job)
    found = discover(job.input, default_prompt=job.prompt)
    writer = open_output(job.output)
    todo: list[Row] = [r for r in found.rows if r.id not in writer.done]
    summary = Summary(rows=len(found.rows), already_done=len(found.rows) - len(todo),
                      skipped_files=found.skipped_files)
    if summary.already_done:
        log.info("%s already holds %d of the %d rows; doing the other %d", job.output, summary.already_done,
                 summary.rows, len(todo))
    bar = _progress(len(found.rows), summary.already_done, job.progress)
    sink = ChunkSink(writer, chunk_rows=job.chunk_rows, chunk_seconds=job.chunk_seconds, progress=bar)
    try:
        if todo:
            if job.ray is not None:
                from .ray_data import run_ray

                run_ray(job, todo, sink)
            else:
                from .local import run_local

                run_local(job, todo, sink)
    finally:
        sink.flush()  # on an interrupt too: every finished row reaches the output
        writer.close()
        if bar is not None:
            bar.close()
    summary.written, summary.failed, summary.duplicates = writer.written, writer.failed, writer.duplicates
    summary.seconds = time.perf_counter() - started
    return summary


def _refuse_input_as_output(job: BatchJob) -> None:
    if Path(job.input).is_file() and Path(job.input).resolve() == Path(job.output).resolve():
        raise InputError(f"the output {job.output} is the input table; give another output file")
