"""``minicpmv serve --ray``: the OpenAI-compatible app (``serve.app.create_app``) as a Ray Serve
deployment with several replicas.

Each replica runs the very same FastAPI app as ``minicpmv serve`` (its lifespan loads the model
and starts the batch engine), so routes, limits, error bodies and answers are identical; Ray
Serve's proxy spreads requests over the replicas. What this module adds:

- ``ServeScale``: a fixed replica count, or autoscaling bounds (``min_replicas`` ..
  ``max_replicas``, scaling on ``target_ongoing_requests`` per replica), and the CPUs / GPUs a
  replica reserves.
- Health: Ray Serve calls ``check_health`` on every replica; it fails when the model is not
  loaded or the engine thread stopped, and Serve replaces the replica.
- ``max_ongoing_requests`` per replica is twice the app's own admission limit (batch + queue),
  so surplus requests reach a replica and get its 429 + Retry-After rather than waiting
  unseen in the proxy.
- Every response names the replica that produced it in ``X-MiniCPMV-Replica`` (host:pid).

``build_application(config, scale)`` returns the bound application (for ``serve.run``);
``app_builder(args)`` is the same for Ray's own CLI on an existing cluster
(``serve run minicpmv.batch.ray_serve:app_builder model=DIR replicas=4``); ``run_serve`` is
what the CLI calls. Ray is imported only through ``ray_setup``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from ..serve.config import ServerConfig
from .ray_setup import connect, import_ray, import_serve

log = logging.getLogger(__name__)

APP_NAME = "minicpmv"
REPLICA_HEADER = "x-minicpmv-replica"


@dataclass(frozen=True)
class ServeScale:
    """How many replicas, and what each reserves."""

    replicas: int | None = None  # fixed count (default 1 when not autoscaling)
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None  # autoscaling target (default: the batch size)
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0

    def __post_init__(self) -> None:
        lo, hi = self.min_replicas, self.max_replicas
        if lo is None and hi is None:
            if self.replicas is not None and self.replicas < 1:
                raise InputError(f"--replicas must be >= 1, got {self.replicas}")
            return
        if lo is None or hi is None:
            raise InputError("autoscaling needs both --min-replicas and --max-replicas")
        if not 0 <= lo <= hi or hi < 1:
            raise InputError(f"autoscaling needs 0 <= --min-replicas <= --max-replicas and --max-replicas >= 1, "
                             f"got {lo}..{hi}")
        if self.replicas is not None:
            raise InputError("give --replicas (a fixed count) or --min-replicas/--max-replicas (autoscaling), "
                             "not both")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None


def deployment_options(config: ServerConfig, scale: ServeScale) -> dict[str, Any]:
    """Ray Serve deployment options for this server config and scale."""
    actor = {"num_cpus": scale.cpus_per_replica}
    if scale.gpus_per_replica:
        actor["num_gpus"] = scale.gpus_per_replica
    opts: dict[str, Any] = {
        "name": APP_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": 2 * (config.max_batch_size + config.max_queue),
    }
    if scale.autoscaling:
        opts["autoscaling_config"] = {
            "min_replicas": scale.min_replicas, "max_replicas": scale.max_replicas,
            "target_ongoing_requests": scale.target_ongoing_requests or config.max_batch_size,
        }
    else:
        opts["num_replicas"] = scale.replicas or 1
    return opts


class ReplicaHeader:
    """ASGI wrapper adding ``X-MiniCPMV-Replica: host:pid`` to every HTTP response."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.name = f"{socket.gethostname()}:{os.getpid()}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def tagged(message: Any) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), (REPLICA_HEADER.encode(), self.name)]}
            await send(message)

        await self.app(scope, receive, tagged)


def build_application(config: ServerConfig, scale: ServeScale) -> Any:
    """The Ray Serve application: ``scale`` replicas of ``create_app(config)``."""
    serve = import_serve()
    if not config.model:
        raise InputError("serve --ray needs a model")

    def make_app() -> ReplicaHeader:
        from ..serve.app import create_app  # imported on the replica

        return ReplicaHeader(create_app(config))

    @serve.ingress(make_app)
    class MiniCPMVReplica:
        def _state(self) -> Any:
            return getattr(self.app.app.state, "server", None)  # type: ignore[attr-defined]  # ReplicaHeader -> FastAPI

        def check_health(self) -> None:
            state = self._state()
            if state is None or not state.engine.alive:
                raise RuntimeError("the model is not loaded or the batch engine stopped")

        def info(self) -> dict[str, Any]:
            """This replica's /health fields and generation defaults (through a Serve handle)."""
            state = self._state()
            if state is None:
                return {"status": "loading"}
            return {**state.health(), "defaults": dataclasses.asdict(state.defaults)}

    return serve.deployment(MiniCPMVReplica, **deployment_options(config, scale)).bind()


def app_builder(args: dict[str, str]) -> Any:
    """Ray's application-builder entry (``serve run minicpmv.batch.ray_serve:app_builder k=v``).

    Keys: ``model`` (required), any ``ServerConfig`` field, and ``replicas``, ``min_replicas``,
    ``max_replicas``, ``target_ongoing_requests``, ``gpus_per_replica``, ``cpus_per_replica``.
    """
    return build_application(*builder_settings(args))


def builder_settings(args: dict[str, Any]) -> tuple[ServerConfig, ServeScale]:
    """``app_builder``'s ``key=value`` strings as the server config and the scale."""
    cfg_fields = {f.name: f for f in dataclasses.fields(ServerConfig)}
    scale_fields = {f.name: f for f in dataclasses.fields(ServeScale)}
    cfg: dict[str, Any] = {}
    scale: dict[str, Any] = {}
    for key, raw in args.items():
        if key not in cfg_fields and key not in scale_fields:
            raise InputError(f"unknown argument {key!r}; known: {', '.join([*cfg_fields, *scale_fields])}")
        try:
            if key in cfg_fields:
                cfg[key] = _parse(raw, ServerConfig(), key)
            else:
                scale[key] = float(raw) if key in ("gpus_per_replica", "cpus_per_replica",
                                                   "target_ongoing_requests") else int(raw)
        except ValueError as e:
            raise InputError(f"{key}={raw!r} is not a valid value ({e})") from e
    return ServerConfig(**cfg), ServeScale(**scale)


def _parse(raw: Any, defaults: ServerConfig, key: str) -> Any:
    default = getattr(defaults, key)
    if not isinstance(raw, str):
        return raw
    if isinstance(default, bool):
        return raw.lower() in ("1", "true", "yes")
    if isinstance(default, int) or key == "max_model_len":
        return int(raw)
    if isinstance(default, float):
        return float(raw)
    return raw


def run_serve(config: ServerConfig, scale: ServeScale, *, host: str, port: int, address: str | None,
              num_cpus: int | None = None, object_store_mb: int | None = None) -> None:
    """Deploy on Ray (joining ``address``, or a local instance) and serve until interrupted."""
    serve = import_serve()
    started = connect(address, num_cpus=num_cpus, object_store_mb=object_store_mb)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_application(config, scale), name=APP_NAME, route_prefix="/")
        what = (f"{scale.min_replicas}..{scale.max_replicas} replicas (autoscaling)" if scale.autoscaling
                else f"{scale.replicas or 1} replica(s)")
        print(f"serving {config.model_name()} on http://{host}:{port} with {what}; Ctrl-C stops", flush=True)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        if started:
            import_ray().shutdown()  # the private instance goes, Serve and the replicas with it
        else:
            serve.delete(APP_NAME)  # leave the cluster as it was
