"""OpenAI-style error responses for the server.

Every error leaves the server as ``{"error": {"message", "type", "param", "code"}}`` with an HTTP
status that says whose fault it is. ``APIError`` is what the serving code raises;
``from_library_error`` maps the library's typed exceptions (``minicpmv.errors``) onto it, and
``install_error_handlers`` registers FastAPI handlers for those, for request-validation errors,
for unknown routes and for everything else (a 500 that names the request id; the traceback goes
to the log, the server keeps serving).

Status codes: 400 invalid request (bad JSON, schema, content part, image, base64, too many
images, prompt longer than the context, remote media disabled), 403 local file outside the media
directory, 404 unknown model or route, 413 body too large, 429 too many requests in flight
(Retry-After), 431 request headers too large, 499 the client hung up (logged; nobody reads the
body), 500 internal error, 503 engine not available (Retry-After), 504 request timeout (counted
from the request's arrival).
This module does not know about the model or the engine.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (
    ContextLengthError,
    FeatureNotAvailableError,
    ImageError,
    InputError,
    MiniCPMVError,
    OverloadedError,
    TemplateError,
    UnknownVersionError,
)

log = logging.getLogger(__name__)

_TYPES = {400: "invalid_request_error", 403: "permission_error", 404: "not_found_error",
          413: "invalid_request_error", 429: "rate_limit_error", 431: "invalid_request_error",
          499: "client_closed_request",
          500: "server_error", 503: "server_error", 504: "timeout_error"}


_HTTP_CODES = {400: "invalid_request", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class APIError(Exception):
    """An error with an HTTP status and OpenAI error fields."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 retry_after: int | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, code=self.code, param=self.param)

    def response(self, request_id: str | None = None) -> JSONResponse:
        headers = {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
        if request_id:
            headers["X-Request-ID"] = request_id
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def error_body(status: int, message: str, *, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def from_library_error(e: MiniCPMVError) -> APIError:
    """The HTTP face of a typed library error."""
    if isinstance(e, ContextLengthError):
        return APIError(400, str(e), code="context_length_exceeded", param="messages")
    if isinstance(e, ImageError):
        return APIError(400, str(e), code="invalid_image", param="messages")
    if isinstance(e, (InputError, TemplateError)):
        return APIError(400, str(e), code="invalid_request", param="messages")
    if isinstance(e, OverloadedError):
        return APIError(429, str(e), code="server_busy", retry_after=1)
    if isinstance(e, (FeatureNotAvailableError, UnknownVersionError)):
        return APIError(400, str(e), code="unsupported")
    return APIError(500, f"internal error: {e}", code="internal_error")


def request_id_of(request: Request) -> str:
    return str(getattr(request.state, "request_id", "") or "")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    where = ".".join(loc) or "body"
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"invalid request: {where}: {first.get('msg', 'invalid value')}{more}", where


def install_error_handlers(app: FastAPI) -> None:
    """Register the OpenAI-style handlers on ``app``."""

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response(request_id_of(request))

    @app.exception_handler(MiniCPMVError)
    async def _library_error(request: Request, exc: MiniCPMVError) -> JSONResponse:
        return from_library_error(exc).response(request_id_of(request))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return APIError(400, message, code="invalid_request", param=param).response(request_id_of(request))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = str(exc.detail)
        if exc.status_code == 400 and "parsing the body" in message:  # FastAPI: not UTF-8 / not JSON
            message = "invalid request: the body is not valid JSON text (UTF-8)"
        err = APIError(exc.status_code, message, code=_HTTP_CODES.get(exc.status_code, "http_error"))
        return err.response(request_id_of(request))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        rid = request_id_of(request)
        log.error("internal error in request %s", rid, exc_info=exc)
        return internal_error(rid).response(rid)


def timed_out() -> APIError:
    """504: the request's deadline (``--request-timeout``, counted from its arrival) passed."""
    return APIError(504, "the request took longer than the server's request timeout", code="timeout")


def client_closed() -> APIError:
    """499 (nginx's "client closed request"): the client hung up before the answer was ready;
    nobody reads the body, but the status, log line and body agree."""
    return APIError(499, "the client closed the connection before the answer was complete",
                    code="client_disconnected")


def internal_error(request_id: str) -> APIError:
    return APIError(500, f"internal server error (request id {request_id}); see the server log",
                    code="internal_error")
