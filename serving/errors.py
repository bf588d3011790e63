"""Error answers of the HTTP service: one JSON shape, ``{"error": str, "detail"?: any}``.

Anything a client sent may come back in an error (a field name, an unknown type, a bundle path),
and it may hold characters that UTF-8 cannot encode (a lone surrogate is valid JSON) or that
corrupt a log (NUL, CR, LF): every error text goes through :func:`escape_unprintable` first, so
an error answer can never itself fail with a 500.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.schemas import ErrorOut


def escape_unprintable(text: str) -> str:
    """``text`` with every non-printable character written as a Python escape (``\\x00``,
    ``\\udfff``); printable text is returned unchanged. For logs and error messages."""
    if text.isprintable():
        return text
    return "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text
    )


def _escaped(value: Any) -> Any:
    """``value`` (JSON-like) with every string in it escaped."""
    if isinstance(value, str):
        return escape_unprintable(value)
    if isinstance(value, dict):
        return {escape_unprintable(str(k)): _escaped(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(v) for v in value]
    return value


def error_response(
    status_code: int,
    error: str,
    *,
    detail: Any = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The contract's error answer; ``error`` and every string in ``detail`` escaped."""
    body = ErrorOut(error=escape_unprintable(error), detail=_escaped(detail))
    return JSONResponse(
        status_code=status_code, content=body.model_dump(exclude_none=True), headers=headers
    )


class BodyTooLargeError(StarletteHTTPException):
    """A streamed body (no Content-Length) went past the limit.

    An HTTPException because FastAPI's body parsing turns any other exception raised while it
    reads the body into a 400 "error parsing the body"; this one it re-raises, and the app's
    handler answers 413 like the Content-Length path.
    """

    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail="request body too large")
        self.limit = limit


def too_large_error(limit: int) -> ErrorOut:
    return ErrorOut(error="request body too large", detail={"max_bytes": limit})


async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
    # The location names the field; the message says what is wrong. The input itself is left
    # out: the client has it, and echoing it would echo whatever it held.
    detail = [
        {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
        for e in exc.errors()
    ]
    return error_response(422, "invalid request", detail=detail)


async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
    # Framework-raised errors (unknown route 404, 405, undecodable body 400) get the same
    # {"error": ...} shape as ours; Starlette's default would answer {"detail": ...}.
    if isinstance(exc, BodyTooLargeError):
        error = too_large_error(exc.limit)
        return JSONResponse(
            status_code=413, content=error.model_dump(exclude_none=True), headers=exc.headers
        )
    return error_response(exc.status_code, str(exc.detail), headers=exc.headers)


def install_error_handlers(app: FastAPI) -> None:
    """Answer validation and framework errors in the contract's shape."""
    app.exception_handler(RequestValidationError)(validation_error)
    app.exception_handler(StarletteHTTPException)(http_error)
