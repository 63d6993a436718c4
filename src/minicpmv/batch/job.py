"""What a batch job is and where its records go: ``BatchJob`` / ``RayOptions`` (everything
``minicpmv batch`` was asked), ``record`` (one output record from an ``Answer``), ``ChunkSink``
(the runners hand it finished records; it writes them in chunks of ``chunk_rows`` records or
every ``chunk_seconds``, whichever comes first, and advances the progress bar) and ``Summary``.
Running a job is ``runner.run_batch``. This module does not decode media or touch the engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..errors import InputError
from .engine_adapter import Answer
from .output import JsonlWriter, ParquetWriter


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
