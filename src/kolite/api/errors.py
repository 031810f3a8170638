"""The one place where kolite's errors become HTTP statuses and OpenAI-style error bodies."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Send

from kolite.api.protocol import ErrorDetail, ErrorResponse
from kolite.errors import (
    ContextTooLong,
    GenerationFailed,
    InvalidRequest,
    KoliteError,
    ModelNotFound,
    ModelNotReady,
    Overloaded,
    RequestTimeout,
)

log = logging.getLogger(__name__)

# (status, OpenAI error type) per class; the first match in order wins (subclasses first).
_STATUS: list[tuple[type[KoliteError], int, str]] = [
    (ContextTooLong, 400, "invalid_request_error"),
    (InvalidRequest, 400, "invalid_request_error"),
    (ModelNotFound, 404, "not_found_error"),
    (Overloaded, 429, "rate_limit_error"),
    (ModelNotReady, 503, "service_unavailable"),
    (RequestTimeout, 504, "timeout_error"),
    (GenerationFailed, 500, "server_error"),
]


# OpenAI error codes per class, matched like `_STATUS` (a refusal by the KV pool is a context error too:
# clients that shorten their prompt on context_length_exceeded do the right thing).
_CODES: list[tuple[type[KoliteError], str]] = [
    (ContextTooLong, "context_length_exceeded"),
    (ModelNotFound, "model_not_found"),
]


def error_response(status: int, message: str, type_: str, param: str | None = None,
                   code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, param=param, code=code))
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def status_of(exc: KoliteError) -> tuple[int, str]:
    for cls, status, type_ in _STATUS:
        if isinstance(exc, cls):
            return status, type_
    return 500, "server_error"


def error_of(exc: BaseException) -> tuple[int, ErrorResponse]:
    """The one builder of kolite's error bodies: HTTP status and OpenAI's error shape for `exc`, for a
    JSON response and for an error event in a stream alike. Anything not a KoliteError is a 500 whose
    message says nothing of the internals."""
    if not isinstance(exc, KoliteError):
        return 500, ErrorResponse(error=ErrorDetail(message="internal server error", type="server_error"))
    status, type_ = status_of(exc)
    code = next((code for cls, code in _CODES if isinstance(exc, cls)), None)
    return status, ErrorResponse(error=ErrorDetail(message=str(exc), type=type_, param=getattr(exc, "param", None),
                                                   code=code))


async def send_error(send: Send, status: int, message: str, code: str,
                     headers: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    """An error answer straight from ASGI middleware (before any route runs), in the same OpenAI shape."""
    body = ErrorResponse(error=ErrorDetail(message=message, type="invalid_request_error", code=code))
    data = body.model_dump_json().encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()),
                            *headers]})
    await send({"type": "http.response.body", "body": data})


def error_event(exc: BaseException) -> str:
    """An error in the middle of a stream (the status line is already sent), as OpenAI sends it."""
    return error_of(exc)[1].model_dump_json()


async def _kolite_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, KoliteError)
    status, body = error_of(exc)
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


async def _validation_error(_: Request, exc: Exception) -> JSONResponse:
    """A body that is not JSON, or fields out of range: 400, as OpenAI answers both (its
    invalid_request_error, naming the field in `param`), never FastAPI's 422."""
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {}
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error") or first.get("msg")
        return error_response(400, f"could not parse the JSON body of the request: {detail}",
                              "invalid_request_error", None, "invalid_json")
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    message = "; ".join(
        f"{'.'.join(str(p) for p in e.get('loc', ()) if p != 'body') or 'body'}: {e.get('msg')}" for e in errors
    )
    return error_response(400, message or "invalid request", "invalid_request_error",
                          ".".join(loc) or None, "invalid_value")


async def _http_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), "invalid_request_error" if exc.status_code < 500
                          else "server_error", headers=exc.headers)


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unhandled error", exc_info=exc)
    return error_response(500, "internal server error", "server_error")


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(KoliteError, _kolite_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
