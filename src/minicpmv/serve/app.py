"""The FastAPI application: ``create_app`` factory, middleware and the three routes.

``create_app(config, model=None)`` builds the app without touching the model; the model is
loaded (unless one is passed in) and the ``BatchEngine`` thread started in the app's lifespan,
and stopped on shutdown. Routes: ``POST /v1/chat/completions``, ``GET /v1/models``,
``GET /health``, and ``POST /v1/audio/speech`` (``speech.py``, which also answers chat requests
that ask for audio). ``GuardMiddleware`` gives every request an id (``X-Request-ID``), refuses headers
over ``max_header_bytes`` with 431 and bodies over ``max_body_bytes`` with 413 (by Content-Length,
and while reading a chunked body), and turns any exception that escapes a route into a logged 500
that names the request id.

Resources, per request: the timeout runs from arrival (waiting for a decoding slot, fetching and
decoding media, the engine queue and generation all count; a request whose preparation ends
past its deadline is answered 504 without being queued); at most ``max_decoding`` requests with
media fetch and decode them at once; the decoded full-size media are dropped once the processor
has made the model-size slices, so a request waiting in the engine holds only those. A client
that hangs up before a non-streamed answer is complete is logged and answered 499.

Routes stay thin: the pipeline lives in ``completions.py``. No model at import time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.datastructures import MutableHeaders
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..engine.chat import ChatModel
from .completions import Prepared, complete, prepare, stream
from .config import ServerConfig
from .errors import APIError, client_closed, install_error_handlers, request_id_of, timed_out
from .runtime import ServerState, slot_by_deadline
from .schemas import ChatCompletionRequest, ImagePart, InputAudioPart, ModelCard, ModelList, VideoPart
from .speech import complete_spoken, install_speech_routes, prepare_spoken, stream_spoken

log = logging.getLogger(__name__)


class _BodyTooLarge(HTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than the server's limit of {limit} bytes")


class GuardMiddleware:
    """Request ids, header and body size limits, and a 500 for anything that escapes (pure ASGI)."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_header_bytes: int = 32 * 1024) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_header = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        rid = uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        started = False

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                MutableHeaders(scope=message).append("X-Request-ID", rid)
            await send(message)

        headers = scope.get("headers", [])
        size = sum(len(k) + len(v) + 4 for k, v in headers)  # "name: value\r\n"
        if size > self.max_header:
            await _send_error(send_with_id, APIError(
                431, f"the request headers hold {size} bytes ({len(headers)} headers), over the server's limit of "
                f"{self.max_header} bytes", code="headers_too_large"))
            return
        length = dict(headers).get(b"content-length", b"0")
        if length.isdigit() and int(length) > self.max_body:
            await _send_error(send_with_id, APIError(413, str(_BodyTooLarge(self.max_body).detail),
                                                     code="body_too_large"))
            return
        try:
            await self.app(scope, self._limited(receive), send_with_id)
        except Exception as e:  # noqa: BLE001 - the last line of defence: log, answer 500, keep serving
            log.error("unhandled error in request %s", rid, exc_info=e)
            if not started:
                await _send_error(send_with_id, APIError(
                    500, f"internal server error (request id {rid}); see the server log", code="internal_error"))

    def _limited(self, receive: Receive) -> Receive:
        seen = 0

        async def wrapped() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_body:
                    raise _BodyTooLarge(self.max_body)
            return message

        return wrapped


async def _send_error(send: Send, err: APIError) -> None:
    body = json.dumps(err.body()).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": err.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _ClosingStream(StreamingResponse):
    """A streaming response that runs ``on_close`` however the stream ends (even unstarted)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self._on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _state(request: Request) -> ServerState:
    state = getattr(request.app.state, "server", None)
    if state is None:
        raise APIError(503, "the model is still loading", code="unavailable", retry_after=5)
    return state


def _has_media(body: ChatCompletionRequest) -> bool:
    return any(isinstance(part, (ImagePart, VideoPart, InputAudioPart)) for msg in body.messages
               if isinstance(msg.content, list) for part in msg.content)


async def _prepare_in_time(state: ServerState, body: ChatCompletionRequest, slots: asyncio.Semaphore,
                           deadline: float, preparer: Callable[..., Awaitable[Prepared]]) -> Prepared:
    """``preparer`` (``prepare`` or ``prepare_spoken``) within the request's deadline, holding a
    decoding slot when the request has media."""
    media = _has_media(body) or body.wants_audio  # a spoken answer also runs a prompt pass for its voice
    async with slot_by_deadline(slots, deadline) if media else contextlib.nullcontext():
        prep = await preparer(state, body)
    for ref in prep.plan.media:
        ref.value = None  # the full-size decoded media: the inputs hold the model-size slices
    if asyncio.get_running_loop().time() >= deadline:
        raise timed_out()
    return prep


async def chat_completions(body: ChatCompletionRequest, request: Request) -> Any:
    """POST /v1/chat/completions"""
    arrived = asyncio.get_running_loop().time()
    state = _state(request)
    deadline = arrived + state.config.request_timeout_s
    if body.model != state.name:
        raise APIError(404, f"the model {body.model!r} does not exist; this server serves {state.name!r}",
                       code="model_not_found", param="model")
    release = state.acquire()
    handle = None
    try:
        spoken = body.wants_audio  # a spoken answer: speech.py's pipeline around the same engine
        prep = await _prepare_in_time(state, body, request.app.state.decoding, deadline,
                                      prepare_spoken if spoken else prepare)
        handle = state.submit(prep.inputs, prep.params, prep.plan.n)
        handle.deadline = min(handle.deadline, deadline)
        response_id = f"chatcmpl-{handle.request_id}"
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            streaming, owned = handle, release
            handle = release = None  # the response owns them now

            def on_close() -> None:
                streaming.close()
                owned()

            make_events: Any = stream_spoken if spoken else stream
            return _ClosingStream(make_events(state, prep, streaming, response_id, include_usage), on_close)
        finish: Any = complete_spoken if spoken else complete
        result = await finish(state, prep, handle, response_id, request.is_disconnected)
    finally:
        if handle is not None:
            handle.close()
        if release is not None:
            release()
    if result is None:
        log.info("request %s: the client disconnected before the answer was complete (499); generation cancelled",
                 request_id_of(request))
        return client_closed().response(request_id_of(request))
    return JSONResponse(result.model_dump())


async def list_models(request: Request) -> ModelList:
    """GET /v1/models"""
    state = _state(request)
    card = ModelCard(id=state.name, created=state.created, max_model_len=state.engine.max_model_len)
    return ModelList(data=[card])


async def health(request: Request) -> JSONResponse:
    """GET /health"""
    state = getattr(request.app.state, "server", None)
    if state is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    info = state.health()
    return JSONResponse(info, status_code=200 if info["status"] == "ok" else 503)


def create_app(config: ServerConfig, *, model: ChatModel | None = None) -> FastAPI:
    """The server app. ``model`` is loaded from ``config.model`` at startup when not given."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        chat_model = model
        if chat_model is None:
            from ..api import load

            chat_model = await asyncio.to_thread(load, config.model, dtype=config.dtype, device=config.device,
                                                 compile=config.compile or False)
        state = ServerState(config, chat_model)
        state.engine.start()
        app.state.decoding = asyncio.Semaphore(max(1, config.max_decoding))
        app.state.server = state
        log.info("serving %s (MiniCPM-V %s): batch %d, context %d", state.name, chat_model.version.name,
                 state.engine.max_batch_size, state.engine.max_model_len)
        try:
            yield
        finally:
            state.draining = True
            await asyncio.to_thread(state.engine.stop)

    app = FastAPI(title="minicpmv", version="1", lifespan=lifespan)
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, max_body_bytes=config.max_body_bytes, max_header_bytes=config.max_header_bytes)
    app.post("/v1/chat/completions", response_model=None)(chat_completions)
    app.get("/v1/models")(list_models)
    app.get("/health")(health)
    install_speech_routes(app)
    return app
