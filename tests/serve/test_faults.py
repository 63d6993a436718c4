"""Bad input and bad luck: every fault gets its documented OpenAI-style error, nothing crashes,
and no engine slot or in-flight count leaks (``wait_idle`` after each test).

Error table (also in ``serve/errors.py``): 400 invalid request / image / base64 / content part /
too many images / context length / remote media disabled; 403 path outside the media dir;
404 unknown model; 413 body too large; 429 busy (Retry-After); 500 internal (request id);
503 engine stopped (Retry-After); 504 request timeout.
"""

from __future__ import annotations

import base64
import concurrent.futures as cf
import time

import httpx
import openai
import pytest

from minicpmv.errors import InputError

from .conftest import NAME, LiveServer, bomb_png, image_part, png_bytes, random_image


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    (root / "ok.png").write_bytes(png_bytes(random_image(5, (64, 64))))
    (tmp_path_factory.getbasetemp() / "secret.png").write_bytes(png_bytes(random_image(6, (64, 64))))
    return root


@pytest.fixture(scope="module")
def server(model26, media_dir):
    with LiveServer(model26, max_batch_size=4, max_queue=8, max_body_bytes=256 * 1024,
                    media_dir=str(media_dir), max_images=3) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _no_leaks(request):
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").wait_idle()


@pytest.fixture
def slow_steps(monkeypatch):
    """Make every decode step take >= 5 ms, so 900 tokens surely outlast a disconnect."""
    from minicpmv.engine.batch import BatchEngine

    real = BatchEngine._decode_step

    def slow(self):
        time.sleep(0.005)
        real(self)

    monkeypatch.setattr(BatchEngine, "_decode_step", slow)


def _user(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": [*parts, {"type": "text", "text": "describe"}]}]


def _error(resp: httpx.Response, status: int, code: str | None = None) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if code is not None:
        assert err["code"] == code, err
    return err


def _body(messages: list[dict], **kw) -> dict:
    return {"model": NAME, "messages": messages, "max_tokens": 4, "temperature": 0, **kw}


def test_malformed_base64(server):
    part = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBOR%%%not-base64"}}
    _error(server.post(_body(_user(part))), 400, "invalid_base64")


def test_decompression_bomb_png(server):
    url = "data:image/png;base64," + base64.b64encode(bomb_png()).decode()
    err = _error(server.post(_body(_user({"type": "image_url", "image_url": {"url": url}}))), 400, "invalid_image")
    assert "pixel" in err["message"]


def test_bytes_that_are_not_an_image(server):
    url = "data:image/png;base64," + base64.b64encode(b"definitely not a png").decode()
    _error(server.post(_body(_user({"type": "image_url", "image_url": {"url": url}}))), 400, "invalid_image")


def test_wrong_content_part_type(server):
    part = {"type": "file", "file": {"file_data": "AAAA", "filename": "a.pdf"}}
    err = _error(server.post(_body(_user(part))), 400)
    assert "messages" in err["message"]
    part = {"type": "input_audio", "input_audio": {"data": "AAAA", "format": "wav"}}  # audio: MiniCPM-o only
    assert "audio input" in _error(server.post(_body(_user(part))), 400, "unsupported")["message"]
    with pytest.raises(openai.BadRequestError):
        server.client().chat.completions.create(model=NAME, messages=_user({"type": "image", "image": "x"}))


def test_oversized_body(server):
    big = "x" * (300 * 1024)
    _error(server.post(_body([{"role": "user", "content": big}])), 413, "body_too_large")

    def chunks():  # no Content-Length: the limit is enforced while reading
        yield b'{"model": "tiny", "messages": [{"role": "user", "content": "'
        for _ in range(40):
            yield b"y" * 8192
        yield b'"}]}'

    resp = httpx.post(f"{server.url}/v1/chat/completions", content=chunks(),
                      headers={"content-type": "application/json"}, timeout=60)
    _error(resp, 413)


def test_unknown_model(server):
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        server.client().chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "hi"}])


def test_remote_url_disabled(server):
    part = {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}
    err = _error(server.post(_body(_user(part))), 400, "remote_media_disabled")
    assert "--allow-remote-media" in err["message"]


def test_remote_url_to_loopback_refused_even_when_enabled(model26):
    with LiveServer(model26, max_batch_size=1, allow_remote_media=True) as srv:
        part = {"type": "image_url", "image_url": {"url": f"{srv.url}/health"}}
        _error(srv.post(_body(_user(part))), 400, "media_address_forbidden")
        srv.wait_idle()


def test_local_paths(server, media_dir):
    inside = server.post(_body(_user({"type": "image_url", "image_url": {"url": f"file://{media_dir / 'ok.png'}"}})))
    assert inside.status_code == 200, inside.text
    for url in (f"file://{media_dir.parent / 'secret.png'}", f"file://{media_dir}/../secret.png", "../secret.png"):
        _error(server.post(_body(_user({"type": "image_url", "image_url": {"url": url}}))), 403,
               "media_path_forbidden")
    _error(server.post(_body(_user({"type": "image_url", "image_url": {"url": "missing.png"}}))), 400,
           "media_not_found")


def test_local_paths_off_without_media_dir(server26, media_dir):
    part = {"type": "image_url", "image_url": {"url": f"file://{media_dir / 'ok.png'}"}}
    _error(server26.post(_body(_user(part))), 400, "local_media_disabled")


def test_too_many_images(server):
    img = image_part(random_image(7, (32, 32)))
    _error(server.post(_body(_user(img, img, img, img))), 400, "too_many_images")


def test_prompt_longer_than_context(server):
    long = " ".join(["word"] * 1500)
    err = _error(server.post(_body([{"role": "user", "content": long}])), 400, "context_length_exceeded")
    assert "max_model_len" in err["message"]
    _error(server.post(_body([{"role": "user", "content": "hi"}], max_tokens=5000)), 400, "context_length_exceeded")


def test_bad_parameters(server):
    hi = [{"role": "user", "content": "hi"}]
    _error(server.post(_body(hi, temperature=5)), 400)
    _error(server.post(_body(hi, n=0)), 400)
    _error(server.post(_body(hi, n=9)), 400)  # more choices than batch rows
    _error(server.post(_body(hi, logit_bias={"99999": 5})), 400)
    _error(server.post(_body(hi, tools=[{"type": "function", "function": {"name": "f"}}])), 400, "unsupported")
    _error(server.post(_body(hi, response_format={"type": "json_object"})), 400, "unsupported")
    _error(server.post(_body([{"role": "assistant", "content": "first"}])), 400)
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=b"{not json", timeout=30,
                      headers={"content-type": "application/json"})
    _error(resp, 400)
    _error(httpx.get(f"{server.url}/v1/nothing-here", timeout=30), 404)


def test_internal_error_is_500_with_request_id_and_server_keeps_serving(server, monkeypatch):
    cls = type(server.state.model.processor)
    real = cls.__call__

    def failing(self, conversations, **kw):
        if "explode" in str(conversations):
            raise ZeroDivisionError("simulated bug")
        return real(self, conversations, **kw)

    monkeypatch.setattr(cls, "__call__", failing)
    resp = server.post(_body([{"role": "user", "content": "explode"}]))
    err = _error(resp, 500, "internal_error")
    assert resp.headers["x-request-id"] in err["message"]
    ok = server.post(_body([{"role": "user", "content": "fine"}]))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] is not None


def test_engine_error_during_prefill_is_isolated(server, monkeypatch):
    engine = server.state.engine
    real = engine.runner.encode_features

    def failing(inputs, *a, **k):
        if "kaboom" in inputs.prompts[0]:
            raise InputError("simulated bad image features")
        return real(inputs, *a, **k)

    monkeypatch.setattr(engine.runner, "encode_features", failing)
    _error(server.post(_body([{"role": "user", "content": "kaboom"}])), 400, "invalid_request")
    assert server.post(_body([{"role": "user", "content": "fine"}])).status_code == 200


def test_busy_server_answers_429_with_retry_after(model26, slow_steps):
    with LiveServer(model26, max_batch_size=1, max_queue=0) as srv:
        client = srv.client()
        stream = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "long"}],
                                                max_tokens=900, temperature=0, stream=True)
        next(iter(stream))
        resp = srv.post(_body([{"role": "user", "content": "second"}]))
        _error(resp, 429, "server_busy")
        assert int(resp.headers["retry-after"]) >= 1
        stream.close()
        srv.wait_idle()
        assert srv.post(_body([{"role": "user", "content": "third"}])).status_code == 200


def test_stopped_engine_gives_503(model26):
    with LiveServer(model26, max_batch_size=1) as srv:
        srv.state.engine.stop()
        health = httpx.get(f"{srv.url}/health", timeout=30)
        assert health.status_code == 503 and health.json()["status"] == "unavailable"
        resp = srv.post(_body([{"role": "user", "content": "hi"}]))
        _error(resp, 503, "unavailable")
        assert "retry-after" in resp.headers


def test_request_timeout_is_504_and_frees_the_slot(model26):
    with LiveServer(model26, max_batch_size=2, request_timeout_s=0.01) as srv:
        body = _body([{"role": "user", "content": "slow"}], max_tokens=900)
        _error(srv.post(body), 504, "timeout")
        stream = srv.client().chat.completions.create(**{**body, "stream": True})
        with pytest.raises(openai.APIError, match="timeout"):
            list(stream)
        srv.wait_idle()
        assert srv.state.engine.stats.generated_tokens < 1800


def test_client_disconnect_mid_stream_frees_the_slot(server, slow_steps):
    engine = server.state.engine
    before = engine.stats.generated_tokens
    client = server.client()
    streams = [client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": f"go {i}"}],
                                              max_tokens=900, temperature=0, stream=True) for i in range(4)]
    for s in streams:  # every batch row is busy; read a little, then hang up
        it = iter(s)
        next(it)
        next(it)
        s.close()
    server.wait_idle()
    assert engine.stats.generated_tokens - before < 4 * 900  # generation stopped early
    with cf.ThreadPoolExecutor(8) as pool:  # a following burst still gets every slot
        results = list(pool.map(lambda i: server.post(_body([{"role": "user", "content": f"burst {i}"}])),
                                range(8)))
    assert all(r.status_code == 200 for r in results)


def test_non_streaming_client_disconnect_is_noticed(server, slow_steps):
    engine = server.state.engine
    before = engine.stats.generated_tokens
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v1/chat/completions", timeout=0.3,
                   json=_body([{"role": "user", "content": "long"}], max_tokens=900))
    server.wait_idle()
    assert engine.stats.generated_tokens - before < 900
