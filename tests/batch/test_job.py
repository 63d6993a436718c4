"""The job's chunked writing: a chunk is written when full or when its oldest row is old enough."""

from __future__ import annotations

import pytest

from minicpmv.batch.job import ChunkSink
from minicpmv.batch.output import open_output, read_output
from minicpmv.errors import InputError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Bar:
    def __init__(self) -> None:
        self.n = 0

    def update(self, k: int) -> None:
        self.n += k


def test_chunks_are_written_when_full_or_when_old(tmp_path):
    out = tmp_path / "out.jsonl"
    clock, bar = Clock(), Bar()
    sink = ChunkSink(open_output(out), chunk_rows=3, chunk_seconds=10.0, progress=bar, clock=clock)
    for i in range(2):
        sink.add({"id": f"r{i}", "answer": "x"})
    sink.tick()
    assert read_output(out) == [] and bar.n == 2  # 2 rows finished, young: still buffered
    sink.add({"id": "r2", "answer": "x"})
    assert len(read_output(out)) == 3 and bar.n == 3  # full chunk
    sink.add({"id": "r3", "answer": "x"})
    clock.now = 9.9
    sink.tick()
    assert len(read_output(out)) == 3
    clock.now = 10.0
    sink.tick()
    assert len(read_output(out)) == 4  # old enough
    with pytest.raises(InputError, match="chunk_rows"):
        ChunkSink(open_output(out), chunk_rows=0, chunk_seconds=1.0)
