"""``batch --ray``: Ray Data with 2 model replicas gives the local runner's records, and a replica
killed mid-job loses and duplicates nothing (a local Ray instance, the tiny 2.6 checkpoint)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import threading
import time

import pytest

from minicpmv.batch.job import RayOptions
from minicpmv.batch.output import read_output
from minicpmv.batch.runner import run_batch

from .conftest import by_id, greedy_job

TWO = RayOptions(replicas=2, cpus_per_replica=1, rows_per_call=2)


def test_mixed_folder_on_two_replicas_equals_local(ray_instance, mixed_folder, local_mixed, tmp_path):
    out = tmp_path / "out.jsonl"
    summary = run_batch(greedy_job(mixed_folder, out, ray=TWO))
    assert (summary.written, summary.failed, summary.duplicates, summary.skipped_files) == (6, 2, 0, 1)
    assert by_id(read_output(out)) == local_mixed
    assert ray_instance.is_initialized()  # the runner used the session's Ray and left it running


def test_parquet_table_on_two_replicas_equals_local(ray_instance, parquet_table, local_table, tmp_path):
    out = tmp_path / "out.parquet"
    run_batch(greedy_job(parquet_table, out, prompt="Describe it.", ray=TWO))
    assert not (tmp_path / "out.parquet.parts").exists()
    assert by_id(read_output(out)) == local_table


def _pids(folder) -> set[int]:
    return {int(p.read_text()) for p in folder.iterdir()}


def test_killed_replica_loses_and_duplicates_no_row(ray_instance, tmp_path):
    n = 32
    table = tmp_path / "count.jsonl"
    table.write_text("".join(json.dumps({"id": f"q{i:02d}", "prompt": f"Count to {i}."}) + "\n" for i in range(n)),
                     encoding="utf-8")
    settings = {"temperature": 0.0, "max_new_tokens": 24}
    reference = tmp_path / "reference.jsonl"
    run_batch(greedy_job(table, reference, defaults=settings, max_batch_size=2))

    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    out = tmp_path / "out.jsonl"
    job = greedy_job(table, out, defaults=settings, max_batch_size=2, chunk_rows=1, chunk_seconds=0.0,
                     ray=dataclasses.replace(TWO, pid_dir=str(pid_dir)))
    errors: list[BaseException] = []

    def run() -> None:
        try:
            run_batch(job)
        except BaseException as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    worker = threading.Thread(target=run)
    worker.start()
    try:
        while not (out.exists() and out.read_bytes().count(b"\n") >= 2 and len(_pids(pid_dir)) == 2):
            assert worker.is_alive(), errors
            time.sleep(0.02)
        victim = min(_pids(pid_dir))
        os.kill(victim, signal.SIGKILL)
        done_at_kill = out.read_bytes().count(b"\n")
    finally:
        worker.join(600)
    assert not errors, errors
    assert done_at_kill < n, "the job was over before the replica was killed"
    assert by_id(read_output(out)) == by_id(read_output(reference))


def test_a_job_the_cluster_cannot_hold_is_refused_or_warned(caplog):
    from minicpmv.batch.ray_data import check_resources
    from minicpmv.errors import InputError

    two = RayOptions(replicas=2, cpus_per_replica=1, cpu_workers=1)
    check_resources(two, {"CPU": 3.0}, strict=True)
    with pytest.raises(InputError, match="offers 2 CPUs and 0 GPUs, but 2 replica.* reserve 3 CPUs"):
        check_resources(two, {"CPU": 2.0}, strict=True)
    with pytest.raises(InputError, match="reserve 3 CPUs and 2 GPUs"):
        check_resources(dataclasses.replace(two, gpus_per_replica=1), {"CPU": 8.0, "GPU": 1.0}, strict=True)
    check_resources(two, {"CPU": 2.0}, strict=False)  # a cluster that may grow: a warning
    assert "waiting for the cluster to grow" in caplog.text
