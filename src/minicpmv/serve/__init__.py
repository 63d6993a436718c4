"""OpenAI-compatible HTTP server (``minicpmv serve``; needs the ``[serve]`` extra).

``create_app(ServerConfig(...))`` (in ``app.py``) builds a FastAPI app serving
``POST /v1/chat/completions`` (text, images, video, streaming, thinking), ``GET /v1/models`` and
``GET /health`` on top of the continuous-batching ``engine.batch.BatchEngine``. Importing this
package loads neither FastAPI nor a model; ``serve`` runs uvicorn.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .app import create_app
    from .config import ServerConfig

__all__ = ["create_app", "ServerConfig", "serve"]


def check_extra() -> None:
    """MiniCPMVError unless the ``[serve]`` extra (FastAPI, uvicorn, httpx) is installed."""
    try:
        import fastapi  # noqa: F401
        import httpx  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        from ..errors import MiniCPMVError

        raise MiniCPMVError(f"the server needs the [serve] extra: pip install 'minicpmv[serve]' ({e})") from e


def serve(config: Any, *, model: Any = None, host: str = "127.0.0.1", port: int = 8000,
          log_level: str = "info") -> None:
    """Run the server with uvicorn until interrupted; ``model`` (a loaded ``ChatModel``) is served
    as it is, else ``config.model`` is loaded at startup. At ``info`` uvicorn prints the address,
    the ready line and one line per request."""
    check_extra()
    import uvicorn

    from .app import create_app

    # h11 also refuses a header block that arrives in pieces beyond the limit, before buffering more
    uvicorn.run(create_app(config, model=model), host=host, port=port, log_level=log_level,
                h11_max_incomplete_event_size=getattr(config, "max_header_bytes", None))


def __getattr__(name: str) -> Any:
    if name == "create_app":
        from .app import create_app

        return create_app
    if name == "ServerConfig":
        from .config import ServerConfig

        return ServerConfig
    raise AttributeError(f"module 'minicpmv.serve' has no attribute {name!r}")
