"""The route's resource rules (``serve/app.py``): the request timeout runs from arrival (media
fetching and decoding, waiting and generation all count), only ``max_decoding`` requests decode
media at once, decoded full-size media are released before a request waits in the engine, and a
client that hangs up is answered (and logged) as 499 with a matching body."""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

from PIL import Image

from minicpmv.serve import completions

from .conftest import NAME, LiveServer, image_part


def _image_request(i: int, **kw) -> dict:
    img = Image.new("RGB", (1200, 900), (10 * i % 250, 80, 160))  # big, but a tiny PNG
    return {"model": NAME, "max_tokens": 2, "temperature": 0, **kw,
            "messages": [{"role": "user", "content": [image_part(img), {"type": "text", "text": f"what? {i}"}]}]}


def test_request_timeout_counts_media_decoding(model26, monkeypatch):
    """The deadline is set when the request arrives: a request whose media take longer to decode
    than the timeout gets 504 and never reaches the engine, and the engine's deadline for the
    others is arrival + timeout (it used to start when the request reached the engine)."""
    from minicpmv.serve.runtime import ServerState

    real_decode, real_fetch, real_submit = completions.load_image, completions.fetch_media, ServerState.submit
    fetched, deadlines = [], []

    def slow_decode(data, **kw):
        time.sleep(2.0 if data.startswith(b"\x89PNG") and len(data) > 1000 else 0.3)
        return real_decode(data, **kw)

    async def timed_fetch(url, policy):
        fetched.append(asyncio.get_running_loop().time())
        return await real_fetch(url, policy)

    def submit(self, *a, **kw):
        handle = real_submit(self, *a, **kw)
        deadlines.append(handle)
        return handle

    monkeypatch.setattr(completions, "load_image", slow_decode)
    monkeypatch.setattr(completions, "fetch_media", timed_fetch)
    monkeypatch.setattr(ServerState, "submit", submit)
    small = {"model": NAME, "max_tokens": 2, "temperature": 0, "messages": [{"role": "user", "content": [
        image_part(Image.new("RGB", (32, 32), (1, 2, 3))), {"type": "text", "text": "what?"}]}]}
    with LiveServer(model26, request_timeout_s=1.0) as srv:
        assert srv.post(small).status_code == 200  # decoded in 0.3 s, answered within the second
        assert len(deadlines) == 1 and deadlines[0].deadline <= fetched[0] + 1.0
        big = _image_request(0)  # decoding takes 2 s
        resp = srv.post(big)
        assert resp.status_code == 504 and resp.json()["error"]["code"] == "timeout", resp.text
        assert len(deadlines) == 1  # the late request was not queued
        srv.wait_idle()


def test_only_max_decoding_requests_decode_media_at_once(model26, monkeypatch):
    real = completions.load_image
    lock, now, peak = threading.Lock(), [0], [0]

    def counting(*a, **kw):
        with lock:
            now[0] += 1
            peak[0] = max(peak[0], now[0])
        try:
            time.sleep(0.2)
            return real(*a, **kw)
        finally:
            with lock:
                now[0] -= 1

    monkeypatch.setattr(completions, "load_image", counting)
    with LiveServer(model26, max_batch_size=8, max_decoding=2) as srv:
        with ThreadPoolExecutor(6) as pool:
            codes = [r.status_code for r in pool.map(lambda i: srv.post(_image_request(i)), range(6))]
        assert codes == [200] * 6
        assert peak[0] == 2
        srv.wait_idle()


def test_decoded_images_are_released_before_the_request_waits(model26, monkeypatch, slow_steps):
    """While a request sits in the engine, its full-size decoded image is gone (the inputs keep
    only the model-size slices)."""
    real = completions.load_image
    decoded: list[weakref.ref] = []

    def tracking(*a, **kw):
        img = real(*a, **kw)
        decoded.append(weakref.ref(img))
        return img

    monkeypatch.setattr(completions, "load_image", tracking)
    with LiveServer(model26, max_batch_size=1) as srv:
        stream = srv.client().chat.completions.create(**_image_request(0, max_tokens=500, stream=True))
        it = iter(stream)
        next(it)
        next(it)  # generation is under way
        gc.collect()
        assert len(decoded) == 1 and decoded[0]() is None
        stream.close()
        srv.wait_idle()


async def _post_then_hang_up(app, body: bytes) -> tuple[int, dict]:
    """Drive the ASGI app directly: the client sends the body, then disconnects."""
    sent: list[dict] = []
    first = True

    async def receive() -> dict:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": body, "more_body": False}
        return {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/v1/chat/completions", "raw_path": b"/v1/chat/completions", "query_string": b"",
             "root_path": "", "headers": [(b"content-type", b"application/json"),
                                          (b"content-length", str(len(body)).encode())],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 2)}
    await app(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(payload)


def test_a_client_that_hangs_up_gets_a_499_body_and_log_line(model26, slow_steps, caplog):
    body = json.dumps({"model": NAME, "max_tokens": 900, "temperature": 0,
                       "messages": [{"role": "user", "content": "a long story"}]}).encode()
    with LiveServer(model26) as srv, caplog.at_level(logging.INFO, logger="minicpmv.serve"):
        status, payload = asyncio.run(_post_then_hang_up(srv.app, body))
        srv.wait_idle()
    assert status == 499
    assert payload["error"]["code"] == "client_disconnected"
    assert payload["error"]["type"] == "client_closed_request"  # not a 400's invalid_request_error
    assert any("499" in r.getMessage() and "disconnect" in r.getMessage() for r in caplog.records)
