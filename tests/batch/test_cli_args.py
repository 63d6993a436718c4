"""``minicpmv batch`` / ``serve --ray`` flags: mapping onto the job, the command end to end with its
progress bar and summary, and one-line errors for flags that need ``--ray``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from openai import OpenAI

from minicpmv.batch.cli_args import job_from_args
from minicpmv.batch.job import BatchJob, RayOptions
from minicpmv.batch.output import read_output
from minicpmv.cli import build_parser, main

from .conftest import TINY26


def test_flags_map_onto_the_job():
    args = build_parser().parse_args(["batch", "-m", "M", "-i", "in", "-o", "out.jsonl", "--greedy", "--think",
                                      "--max-new-tokens", "16", "--system", "Be brief.", "--seed", "3",
                                      "--ray", "auto", "--replicas", "3", "--gpus-per-replica", "1",
                                      "--cpus-per-replica", "4", "--cpu-workers", "2", "--rows-per-call", "32"])
    assert job_from_args(args) == BatchJob(
        model="M", input="in", output="out.jsonl", dtype="bfloat16", device="cpu",
        defaults={"max_new_tokens": 16, "temperature": 0.0, "seed": 3, "enable_thinking": True,
                  "system_prompt": "Be brief."},
        ray=RayOptions(address="auto", replicas=3, gpus_per_replica=1.0, cpus_per_replica=4.0, cpu_workers=2,
                       rows_per_call=32))
    local = job_from_args(build_parser().parse_args(["batch", "-i", "in", "-o", "o.jsonl", "--temperature", "0.5"]))
    assert local.ray is None and local.defaults == {"max_new_tokens": 512, "temperature": 0.5}
    bare_ray = job_from_args(build_parser().parse_args(["batch", "-i", "in", "-o", "o.jsonl", "--ray"]))
    assert bare_ray.ray == RayOptions()  # a local Ray instance, 1 replica


def test_batch_command_writes_the_output_with_progress_and_summary(mixed_folder, tmp_path, capsys):
    out = tmp_path / "out.jsonl"
    rc = main(["batch", "-m", str(TINY26), "--dtype", "float32", "-i", str(mixed_folder), "-o", str(out),
               "--greedy", "--max-new-tokens", "3", "--prompt", "Caption:"])
    err = capsys.readouterr().err
    assert rc == 0
    assert "6/6" in err and "row/s" in err  # tqdm: count and rate
    assert err.rstrip().endswith("rows/s") and "6 row(s) written (2 with an error), 0 already done" in err
    ids = sorted(r["id"] for r in read_output(out))
    assert ids == ["a.png", "b.png", "broken.jpg", "clip.mp4", "corrupt.png", "sub/c.png"]


def test_flags_that_need_ray_are_refused_in_one_line(tmp_path, capsys):
    rc = main(["batch", "-i", str(tmp_path), "-o", str(tmp_path / "o.jsonl"), "--replicas", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "minicpmv: error: --replicas needs --ray (the local runner has one model)\n"
    rc = main(["serve", "--replicas", "2"])
    err = capsys.readouterr().err
    assert rc == 2 and err == "minicpmv: error: --replicas, --min-replicas and --max-replicas need --ray\n"
    rc = main(["batch", "-i", str(tmp_path / "none"), "-o", str(tmp_path / "o.jsonl"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("minicpmv: error: input ") and err.count("\n") == 1


def _processes_mentioning(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def test_serve_ray_command_serves_two_replicas_and_stops_cleanly():
    """As a user runs it: its own local Ray (2 CPUs, small object store), SIGTERM, nothing left."""
    ray_tmp = tempfile.mkdtemp(prefix="mcv-ray-", dir="/tmp")  # short: Ray's socket paths live under it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(TINY26), "--dtype", "float32",
           "--ray", "--replicas", "2", "--cpus-per-replica", "0.5", "--ray-num-cpus", "2",
           "--ray-object-store-mb", "200", "--port", str(port), "--max-model-len", "512"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "RAY_TMPDIR": ray_tmp}, start_new_session=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    try:
        url = f"http://127.0.0.1:{port}"
        while not any("Ctrl-C stops" in line for line in lines):  # the command says when it serves
            assert proc.poll() is None, "".join(lines)
            time.sleep(0.1)
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        resp = client.chat.completions.with_raw_response.create(
            model="_checkpoint", messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0)
        assert resp.headers["x-minicpmv-replica"] and resp.parse().usage.completion_tokens <= 3
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        reader.join(30)
        out = "".join(lines)
        assert proc.returncode == 0, out
        assert "with 2 replica(s)" in out and "Traceback" not in out, out
        assert _processes_mentioning(ray_tmp) == []  # the private Ray instance is gone
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        for pid in _processes_mentioning(ray_tmp):  # only processes of the instance this test started
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(ray_tmp, ignore_errors=True)
