"""``serve --ray``: the OpenAI-compatible app as a Ray Serve deployment with 2 replicas per model.

The server's own OpenAI-client tests (``tests/serve/test_api.py``) run here unchanged against
the Ray-served apps (the tiny 2.6 and 4.5 checkpoints, 2 replicas each, behind Ray Serve's
proxy on loopback); then 32 concurrent requests must be answered by both replicas, each with
the answer the request gets alone. The settings (replica counts, autoscaling bounds, Ray's
``app_builder`` arguments) are checked without a cluster.
"""

from __future__ import annotations

import concurrent.futures as cf
import socket
import time
from types import SimpleNamespace

import httpx
import pytest

from minicpmv.batch.ray_serve import REPLICA_HEADER, ServeScale, build_application, builder_settings, deployment_options
from minicpmv.errors import InputError
from minicpmv.serve.config import GenerationDefaults, ServerConfig
from serve.conftest import NAME, ServerClient, image_part, random_image
from serve.test_api import (  # noqa: F401 - collected here, run against the fixtures below
    test_max_completion_tokens_and_length,
    test_models_and_health,
    test_one_image_stream_equals_non_stream_and_chat,
    test_raw_sse_format_ends_with_done,
    test_seed_n_and_sampling_defaults,
    test_several_images_and_history,
    test_stop_strings_cut_the_answer,
    test_text_only_matches_library_chat,
    test_thinking_on_returns_reasoning_separately,
    test_thinking_refused_on_2_6,
)

from .conftest import TINY26, TINY45

REPLICAS = 2
MAX_BODY = 4 * 2**20


class RayServed(ServerClient):
    """The LiveServer interface of tests/serve/conftest.py for an app served by Ray Serve."""

    def __init__(self, serve, app_name: str, port: int) -> None:
        self.serve = serve
        self.app_name = app_name
        self.url = f"http://127.0.0.1:{port}/{app_name}"

    @property
    def state(self) -> SimpleNamespace:
        """What the tests read of the server state, asked of a replica through a Serve handle."""
        info = self.serve.get_app_handle(self.app_name).info.remote().result()
        return SimpleNamespace(defaults=GenerationDefaults(**info["defaults"]))

    def wait_idle(self) -> dict:
        """Poll /health until every replica reports nothing running, waiting or in flight."""
        idle: dict[str, dict] = {}
        for _ in range(3000):
            resp = httpx.get(f"{self.url}/health", timeout=30)
            info = resp.json()
            replica = resp.headers[REPLICA_HEADER]
            if info["running"] == 0 and info["waiting"] == 0 and info["in_flight"] == 0:
                idle[replica] = info
                if len(idle) == REPLICAS:
                    return info
            else:
                idle.pop(replica, None)
            time.sleep(0.01)
        raise AssertionError(f"the replicas did not become idle: {idle}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_serve(ray_instance):
    from ray import serve

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    scale = ServeScale(replicas=REPLICAS, cpus_per_replica=0.5)
    try:
        for name, ckpt in (("s26", TINY26), ("s45", TINY45)):
            config = ServerConfig(model=str(ckpt), dtype="float32", served_model_name=NAME, max_model_len=1024,
                                  max_batch_size=8, max_queue=64, max_body_bytes=MAX_BODY)
            serve.run(build_application(config, scale), name=name, route_prefix=f"/{name}")
        yield serve, port
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def server26(ray_serve):
    return RayServed(ray_serve[0], "s26", ray_serve[1])


@pytest.fixture(scope="module")
def server45(ray_serve):
    return RayServed(ray_serve[0], "s45", ray_serve[1])


def test_32_concurrent_requests_are_spread_over_both_replicas(server45):
    pool = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "user", "content": [image_part(random_image(21, (96, 64))), {"type": "text", "text": "What?"}]}],
        [{"role": "user", "content": "Tell me about " + "the sea " * 10}],
        [{"role": "user", "content": "One"}, {"role": "assistant", "content": "Two"},
         {"role": "user", "content": "Three?"}],
    ]

    def ask(i: int) -> tuple[int, str, str]:
        body = {"model": NAME, "messages": pool[i % len(pool)], "max_tokens": 8, "temperature": 0}
        resp = httpx.post(f"{server45.url}/v1/chat/completions", json=body, timeout=120)
        assert resp.status_code == 200, resp.text
        return i % len(pool), resp.json()["choices"][0]["message"]["content"], resp.headers[REPLICA_HEADER]

    alone = {k: ask(k)[1] for k in range(len(pool))}
    with cf.ThreadPoolExecutor(32) as ex:
        results = list(ex.map(ask, range(32)))
    replicas = {r for _, _, r in results}
    assert len(replicas) == REPLICAS, replicas  # both replicas answered some of the 32
    assert [text for _, text, _ in results] == [alone[k] for k, _, _ in results]
    server45.wait_idle()


def test_errors_and_health_pass_through_serve(server26):
    resp = server26.post({"model": "nope", "messages": [{"role": "user", "content": "hi"}]})
    assert resp.status_code == 404 and resp.json()["error"]["code"] == "model_not_found"
    resp = server26.post({"model": NAME, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                          "temperature": -1})
    assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"
    assert resp.headers["x-request-id"]
    big = httpx.post(f"{server26.url}/v1/chat/completions", content=b"x" * (MAX_BODY + 1), timeout=60,
                     headers={"content-type": "application/json"})
    assert big.status_code == 413 and big.json()["error"]["code"] == "body_too_large"
    info = server26.serve.get_app_handle("s26").info.remote().result()
    assert info["status"] == "ok" and info["max_model_len"] == 1024


def test_fixed_and_autoscaling_deployments():
    cfg = ServerConfig(model="m", max_batch_size=4, max_queue=12)
    fixed = deployment_options(cfg, ServeScale(replicas=3, gpus_per_replica=1, cpus_per_replica=2))
    assert fixed == {"name": "minicpmv", "num_replicas": 3, "max_ongoing_requests": 32,
                     "ray_actor_options": {"num_cpus": 2, "num_gpus": 1}}
    auto = deployment_options(cfg, ServeScale(min_replicas=0, max_replicas=5))
    assert auto["autoscaling_config"] == {"min_replicas": 0, "max_replicas": 5, "target_ongoing_requests": 4}
    assert "num_replicas" not in auto and auto["ray_actor_options"] == {"num_cpus": 1.0}
    assert deployment_options(cfg, ServeScale())["num_replicas"] == 1


@pytest.mark.parametrize("kw, match", [
    ({"replicas": 0}, "--replicas must be >= 1"),
    ({"min_replicas": 1}, "needs both"),
    ({"min_replicas": 3, "max_replicas": 2}, "0 <= --min-replicas <= --max-replicas"),
    ({"min_replicas": 0, "max_replicas": 0}, "--max-replicas >= 1"),
    ({"replicas": 2, "min_replicas": 1, "max_replicas": 4}, "not both"),
])
def test_bad_scales_are_refused(kw, match):
    with pytest.raises(InputError, match=match):
        ServeScale(**kw)


def test_app_builder_arguments():
    cfg, scale = builder_settings({"model": "/m", "replicas": "4", "gpus_per_replica": "1", "device": "cuda",
                                   "max_batch_size": "16", "max_model_len": "2048", "allow_remote_media": "true"})
    assert cfg == ServerConfig(model="/m", device="cuda", max_batch_size=16, max_model_len=2048,
                               allow_remote_media=True)
    assert scale == ServeScale(replicas=4, gpus_per_replica=1.0)
    with pytest.raises(InputError, match="unknown argument 'replica'"):
        builder_settings({"model": "/m", "replica": "2"})
    with pytest.raises(InputError, match="max_batch_size='many' is not a valid value"):
        builder_settings({"model": "/m", "max_batch_size": "many"})
