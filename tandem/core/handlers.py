"""The FastAPI app's error handlers: every error it answers, in the one envelope
(core/errors.py), exactly as the layers beneath it answer theirs (core/asgi.py)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from tandem.core.asgi import note_error
from tandem.core.errors import AppError, ClientDisconnectedError, envelope
from tandem.core.failures import error_for_unexpected

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(envelope(code, message, details), status_code=status)


def _answer(request: Request, error: AppError) -> JSONResponse:
    note_error(request.scope, error)
    return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(request: Request, exc: AppError) -> JSONResponse:
        return _answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
                "type": e.get("type", "value_error"),
                "message": e.get("msg", "invalid"),
            }
            for e in exc.errors()
        ]
        return _error(422, "validation_error", "invalid request", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (e.g. bytes that are not UTF-8): for the
            # client it is malformed input like any other, so the same 422 and code.
            return _error(422, "validation_error", str(exc.detail))
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, _: ClientDisconnect) -> JSONResponse:
        # Raised while the body is read, before any route changes anything.
        log.info(
            "client disconnected before sending all of %s %s", request.method, request.url.path
        )
        return _answer(request, ClientDisconnectedError("the client disconnected mid-request"))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        writes = request.method not in ("GET", "HEAD", "OPTIONS")
        error = error_for_unexpected(exc, writes=writes)
        log.error("%s", error.code, exc_info=exc)
        return _answer(request, error)
