"""Fuzzing the OpenAI endpoint (hypothesis) with arbitrary JSON, near-valid request bodies and
garbage media against a real server on loopback: every answer is a well-formed success or an
OpenAI-style 4xx error, never a 500 or a traceback; nothing leaks (the server is idle after each
example) and it keeps serving. Derandomized like tests/property/test_fuzz_inputs.py; what wider
searches found is pinned with ``@example``."""

from __future__ import annotations

import base64
import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from .conftest import NAME, LiveServer, png_bytes, random_image

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
PNG = png_bytes(random_image(3, (40, 30)))

_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner, max_size=3),
    max_leaves=12)
_numbers = st.one_of(st.integers(-5, 40), st.floats(-3, 3, allow_nan=False), st.integers(-2**66, 2**66),
                     st.just(1e308), st.text(max_size=3), st.none(), st.booleans())


def _media_url(seed: int, kind: int) -> str:
    rnd = random.Random(seed)
    data = bytearray(PNG)
    for _ in range(kind):
        data[rnd.randrange(len(data))] = rnd.randrange(256)
    choices = [f"data:image/png;base64,{base64.b64encode(bytes(data)).decode()}",
               "data:image/png;base64,@@@", "data:,", "file:///etc/passwd", "http://[::1", "ftp://x/y",
               "a\x00b.png", "data:image/png;base64," + "A" * 7, "", "http://127.0.0.1:9/x.png"]
    return choices[seed % len(choices)] if kind > 3 else choices[0]


_text_part = st.fixed_dictionaries({"type": st.just("text"), "text": st.text(max_size=40)})
_media_part = st.builds(
    lambda kind, s, k: {"type": f"{kind}_url", f"{kind}_url": {"url": _media_url(s, k)}},
    st.sampled_from(["image", "image", "video"]), st.integers(0, 10**6), st.integers(0, 8))
_user = st.builds(lambda c: {"role": "user", "content": c},
                  st.one_of(st.text(max_size=60), st.lists(st.one_of(_text_part, _media_part), min_size=1, max_size=3)))
_turns = st.builds(
    lambda system, first, rest: ([{"role": "system", "content": system}] if system is not None else [])
    + [first] + [m for a, u in rest for m in ({"role": "assistant", "content": a}, u)],
    st.none() | st.text(max_size=20), _user, st.lists(st.tuples(st.text(max_size=20), _user), max_size=1))
_params = {"max_tokens": st.integers(1, 4), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
           "top_k": st.integers(-1, 50), "repetition_penalty": st.floats(0.5, 2), "min_tokens": st.integers(0, 3),
           "n": st.integers(1, 3), "seed": st.integers(-2**70, 2**70), "presence_penalty": st.floats(-2, 2),
           "stream": st.booleans(), "stop": st.one_of(st.text(min_size=1, max_size=4),
                                                      st.lists(st.text(min_size=1, max_size=3), max_size=3)),
           "logit_bias": st.dictionaries(st.integers(0, 600).map(str), st.floats(-100, 100), max_size=3),
           "chat_template_kwargs": st.fixed_dictionaries({"enable_thinking": st.booleans()}),
           "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()})}
_valid = st.fixed_dictionaries({"model": st.just(NAME), "messages": _turns}, optional=_params)
_FIELDS = sorted({*_params, "model", "messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                  "logprobs", "frequency_penalty"})
_one_broken = st.tuples(_valid, st.sampled_from(_FIELDS), st.one_of(_numbers, _json)).map(
    lambda t: {**t[0], t[1]: t[2]})
_broken_message = st.tuples(_valid, st.integers(0, 3), st.sampled_from(["role", "content", "extra"]), _json).map(
    lambda t: {**t[0], "messages": [({**m, t[2]: t[3]} if i == t[1] else m) for i, m in enumerate(t[0]["messages"])]})
_body = st.one_of(_valid, _one_broken, _broken_message)


@pytest.fixture(scope="module")
def server(model45, tmp_path_factory):
    media = tmp_path_factory.mktemp("media")
    (media / "ok.png").write_bytes(PNG)
    with LiveServer(model45, max_batch_size=4, max_queue=8, max_model_len=256, max_images=2,
                    max_body_bytes=64 * 1024, media_dir=str(media), request_timeout_s=120) as srv:
        yield srv


def _check(resp: httpx.Response, streamed: bool) -> None:
    event(f"status {resp.status_code}" + (f" {resp.json()['error']['code']}" if resp.status_code >= 400 else ""))
    assert resp.status_code != 500 and resp.status_code < 500, resp.text[:500]
    if resp.status_code >= 400:
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"] and err["code"], err
        assert "Traceback" not in err["message"]
        return
    assert resp.status_code == 200
    if streamed:
        events = [line for line in resp.text.splitlines() if line]
        assert events and events[-1] == "data: [DONE]", resp.text[-300:]
        for e in events[:-1]:
            payload = json.loads(e.removeprefix("data: "))
            assert "error" not in payload or payload["error"]["type"] != "server_error", payload
    else:
        data = resp.json()
        assert data["object"] == "chat.completion" and data["choices"], data


def _post(server, body: object) -> httpx.Response:
    raw = json.dumps(body, allow_nan=True).encode()
    return httpx.post(f"{server.url}/v1/chat/completions", content=raw, timeout=120,
                      headers={"content-type": "application/json"})


@SETTINGS
@given(body=_body)
@example(body={"model": NAME, "messages": [{"role": "user", "content": ""}], "temperature": 5e-324})  # found: 500
@example(body={"model": NAME, "messages": [{"role": "user", "content": "x"}], "repetition_penalty": 1e-300})
def test_near_valid_bodies(server, body):
    if not (isinstance(body.get("max_tokens"), int) and not isinstance(body.get("max_tokens"), bool)):
        body.setdefault("max_completion_tokens", 3)  # keep valid answers short (the context is 256)
    resp = _post(server, body)
    _check(resp, streamed=body.get("stream") is True and resp.headers.get("content-type", "").startswith(
        "text/event-stream"))
    server.wait_idle()


@settings(max_examples=25, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=_json, raw=st.binary(max_size=80), ctype=st.sampled_from(["application/json", "text/plain", ""]))
@example(body=None, raw=b"\xee", ctype="application/json")  # found: a 400 without an error code
def test_arbitrary_json_and_bytes(server, body, raw, ctype):
    _check(_post(server, body), streamed=False)
    resp = httpx.post(f"{server.url}/v1/chat/completions", content=raw, timeout=60,
                      headers={"content-type": ctype} if ctype else {})
    _check(resp, streamed=False)
    server.wait_idle()


def test_still_serving_after_the_fuzz(server):
    resp = _post(server, {"model": NAME, "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 200 and httpx.get(f"{server.url}/health", timeout=30).json()["status"] == "ok"
