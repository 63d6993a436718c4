"""``minicpmv serve`` as a user runs it: a subprocess that loads the checkpoint itself (the app
factory loads nothing at import or construction), answers on loopback, and exits on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from minicpmv.serve.app import create_app
from minicpmv.serve.config import ServerConfig

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "tests" / "data" / "conformance" / "2.6" / "_checkpoint"


def test_create_app_loads_nothing():
    app = create_app(ServerConfig(model="/nonexistent/checkpoint"))
    assert getattr(app.state, "server", None) is None
    assert {r.path for r in app.routes} >= {"/v1/chat/completions", "/v1/models", "/health"}


def test_serve_command_end_to_end():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "minicpmv.cli", "serve", "--model", str(TINY), "--dtype", "float32",
           "--host", "127.0.0.1", "--port", str(port), "--max-batch-size", "2", "--max-model-len", "512"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(1200):
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        client = OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list().data] == ["_checkpoint"]
        resp = client.chat.completions.create(model="_checkpoint", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3, temperature=0)
        assert resp.usage.completion_tokens <= 3 and resp.choices[0].message.content is not None
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=60)
    # uvicorn shuts down gracefully, then re-raises the signal it caught (exit by SIGTERM)
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Traceback" not in out, out
    # without -v: what was loaded, the address, a ready line and one line per request
    assert "_checkpoint (MiniCPM-V 2.6) loaded" in out and f"http://127.0.0.1:{port}" in out, out
    assert "Application startup complete" in out, out
    assert '"POST /v1/chat/completions HTTP/1.1" 200' in out and '"GET /v1/models HTTP/1.1" 200' in out, out
