"""Fixtures for the server tests: tiny checkpoints, a real uvicorn server on 127.0.0.1 (random
port, in a background thread of this process), an ``openai`` client and media helpers."""

from __future__ import annotations

import base64
import io
import socket
import struct
import threading
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from openai import OpenAI
from PIL import Image

from minicpmv.serve.app import create_app
from minicpmv.serve.config import ServerConfig

CONF = Path(__file__).resolve().parents[1] / "data" / "conformance"
NAME = "tiny"


class ServerClient:
    """Clients of a server at ``self.url`` (the OpenAI client, and raw chat-completion posts)."""

    url: str

    def client(self, **kw) -> OpenAI:
        kw.setdefault("max_retries", 0)
        kw.setdefault("timeout", 120)
        return OpenAI(base_url=f"{self.url}/v1", api_key="test", **kw)

    def post(self, body: dict, **kw) -> httpx.Response:
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=120, **kw)


class LiveServer(ServerClient):
    """A uvicorn server bound to a free loopback port; ``state`` is the app's ServerState."""

    def __init__(self, model, **config) -> None:
        config.setdefault("served_model_name", NAME)
        config.setdefault("max_model_len", 1024)
        self.config = ServerConfig(**config)
        self.app = create_app(self.config, model=model)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._server = uvicorn.Server(uvicorn.Config(self.app, log_level="warning", timeout_graceful_shutdown=5))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._sock]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self._thread.start()
        while not self._server.started:
            if not self._thread.is_alive():
                raise RuntimeError("the test server failed to start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(30)
        self._sock.close()

    @property
    def state(self):
        return self.app.state.server

    def wait_idle(self) -> dict:
        """Poll /health until nothing runs, waits or is in flight (a leak would hang here)."""
        for _ in range(3000):
            info = httpx.get(f"{self.url}/health", timeout=30).json()
            if info["running"] == 0 and info["waiting"] == 0 and info["in_flight"] == 0:
                return info
            time.sleep(0.01)
        raise AssertionError(f"server did not become idle: {info}")



@pytest.fixture(scope="module")
def server45(model45):
    with LiveServer(model45, max_batch_size=8, max_queue=64) as srv:
        yield srv


@pytest.fixture(scope="module")
def server26(model26):
    with LiveServer(model26, max_batch_size=8, max_queue=64) as srv:
        yield srv


def random_image(seed: int, size: tuple[int, int] = (320, 240)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img: Image.Image) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def image_part(img: Image.Image) -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(img)}}


def bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG file whose header declares ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")
