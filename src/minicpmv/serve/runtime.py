"""The server's working state: the model, the batch engine, admission control, and the bridge
from engine events (engine thread) to asyncio (request handlers).

``ServerState.admit()`` counts requests in flight (from arrival until the response or stream
ends) and refuses with 429 + Retry-After beyond ``max_batch_size + max_queue``, or with 503 when
the engine is not running. ``ServerState.submit`` queues a request in the ``BatchEngine`` and
returns a ``Handle`` whose ``events()`` yields the request's ``BatchEvent``s in order, enforcing
the per-request deadline (504) and noticing client disconnects; ``Handle.close()`` cancels what is
still running (idempotent), which frees the engine's cache rows at the next token boundary.
``by_deadline`` bounds other work of a request (speech synthesis) by the same deadline. Parsing,
media and text assembly live in ``convert.py``, ``media.py`` and ``completions.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

from ..engine.batch import BatchEngine, BatchEvent, BatchRequest
from ..engine.chat import ChatModel
from ..engine.sampling import SamplingParams
from ..processing.processor import ModelInputs
from .config import GenerationDefaults, ServerConfig
from .errors import APIError, timed_out
from .media import MediaPolicy

log = logging.getLogger(__name__)

Disconnected = Callable[[], Awaitable[bool]]
T = TypeVar("T")


@contextlib.asynccontextmanager
async def slot_by_deadline(slots: asyncio.Semaphore, deadline: float) -> AsyncIterator[None]:
    """Hold one of ``slots`` (the server's decoding slots) for the block; waiting for it past
    ``deadline`` is a 504."""
    await by_deadline(slots.acquire(), deadline)
    try:
        yield
    finally:
        slots.release()


async def by_deadline(work: Awaitable[T], deadline: float) -> T:
    """``work`` if it ends before ``deadline`` (event-loop time), else 504. Work in a thread cannot
    be interrupted: it finishes in the background and its result is dropped."""
    remaining = deadline - asyncio.get_running_loop().time()
    try:
        return await asyncio.wait_for(work, max(remaining, 0.0))
    except asyncio.TimeoutError:
        raise timed_out() from None


class Handle:
    """One submitted request: its event queue, deadline and cancellation."""

    def __init__(self, engine: BatchEngine, request_id: str, n: int, deadline: float) -> None:
        self.engine = engine
        self.request_id = request_id
        self.n = n
        self.deadline = deadline
        self.queue: asyncio.Queue[BatchEvent] = asyncio.Queue()
        self._finished: set[int] = set()
        self._closed = False

    @property
    def done(self) -> bool:
        return len(self._finished) >= self.n

    def close(self) -> None:
        """Cancel whatever still runs (safe to call more than once)."""
        if not self._closed:
            self._closed = True
            if not self.done:
                self.engine.cancel(self.request_id)

    def cancel_choice(self, index: int) -> None:
        self.engine.cancel(self.request_id, index)

    async def events(self, disconnected: Disconnected | None = None, poll_s: float = 0.5) -> AsyncIterator[BatchEvent]:
        """Events until every choice finished; 504 past the deadline; stops if the client left."""
        loop = asyncio.get_running_loop()
        checked = loop.time()
        while not self.done:
            remaining = self.deadline - loop.time()
            if remaining <= 0:
                raise timed_out()
            if disconnected is not None and loop.time() - checked >= poll_s:  # also while tokens flow
                checked = loop.time()
                if await disconnected():
                    log.info("client of request %s disconnected; cancelling it", self.request_id)
                    self.close()
                    return
            try:
                event = await asyncio.wait_for(self.queue.get(), min(remaining, poll_s))
            except asyncio.TimeoutError:
                continue
            if event.finish_reason is not None:
                self._finished.add(event.index)
            yield event


class ServerState:
    """Everything the routes need; built once per app in its lifespan."""

    def __init__(self, config: ServerConfig, model: ChatModel) -> None:
        self.config = config
        self.model = model
        self.name = config.model_name(Path(model.path).name if model.path else "minicpmv")
        self.created = int(time.time())
        self.defaults = GenerationDefaults.from_checkpoint(model.path) if model.path else GenerationDefaults()
        self.engine = BatchEngine(
            model, max_batch_size=config.max_batch_size, max_model_len=config.max_model_len,
            max_queue=config.max_queue, batch_invariant=config.batch_invariant,
        )
        self.media = MediaPolicy(
            allow_remote=config.allow_remote_media,
            media_dir=Path(config.media_dir) if config.media_dir else None,
            max_bytes=config.max_media_bytes, timeout_s=config.remote_timeout_s,
            max_redirects=config.remote_max_redirects,
        )
        self.in_flight = 0
        self.limit = config.max_batch_size + config.max_queue
        self.draining = False

    def acquire(self) -> Callable[[], None]:
        """Count one request in flight, or refuse it (429 when full, 503 when not serving).

        Returns the request's release function (idempotent)."""
        if self.draining or not self.engine.alive:
            raise APIError(503, "the server is not accepting requests (shutting down or engine stopped)",
                           code="unavailable", retry_after=5)
        if self.in_flight >= self.limit:
            raise APIError(429, f"too many requests in flight ({self.limit}); retry shortly",
                           code="server_busy", retry_after=1)
        self.in_flight += 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self.in_flight -= 1

        return release

    def submit(self, inputs: ModelInputs, params: SamplingParams, n: int) -> Handle:
        """Queue a request in the engine; events arrive on the returned handle."""
        loop = asyncio.get_running_loop()
        request = BatchRequest(inputs, params, on_event=lambda e: None, n=n, id0_quirk=self.config.id0_quirk)
        handle = Handle(self.engine, request.request_id, n, loop.time() + self.config.request_timeout_s)

        def on_event(event: BatchEvent) -> None:
            loop.call_soon_threadsafe(handle.queue.put_nowait, event)

        request.on_event = on_event
        self.engine.submit(request)
        return handle

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok" if self.engine.alive and not self.draining else "unavailable",
            "model": self.name,
            "running": self.engine.num_running,
            "waiting": self.engine.num_waiting,
            "in_flight": self.in_flight,
            "max_batch_size": self.engine.max_batch_size,
            "max_model_len": self.engine.max_model_len,
        }
