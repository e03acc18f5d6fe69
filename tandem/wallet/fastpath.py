"""The lean path: the one handler of the wallet's two hot routes, beneath the framework.

FastAPI spends ~0.2 ms of CPU per request on routing, dependency solving and response
validation: more than the whole database round trip of a balance update. This ASGI layer
answers ``POST /balance/update`` and ``GET /balance/{userId}`` itself (405 for any other
method on them), through the ``serve_*`` functions of endpoints.py (the parser, errors and
metrics every route shares; endpoints.lean_operations documents them in the OpenAPI schema),
and passes everything else to FastAPI. Measured against FastAPI routes for the same two:
docs/ARCHITECTURE.md.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import ClassVar

from tandem.core.database import Database
from tandem.core.errors import AppError, MethodNotAllowedError
from tandem.core.failures import count_answered, error_for_unexpected
from tandem.observability.metrics import ROUTE_SCOPE_KEY, ASGIApp, Receive, Scope, Send
from tandem.wallet.endpoints import (
    balance_body,
    serve_balance_read,
    serve_balance_update,
)
from tandem.wallet.schemas import read_body

UPDATE_PATH = "/balance/update"
READ_PREFIX = "/balance/"
_READ_PREFIX_LEN = len(READ_PREFIX)
READ_ROUTE = "/balance/{userId}"
log = logging.getLogger(__name__)
_IDEMPOTENCY_HEADER = b"idempotency-key"
_JSON_HEADERS = [(b"content-type", b"application/json")]


class _PostOnly(MethodNotAllowedError):
    headers: ClassVar[dict[str, str]] = {"Allow": "POST"}


class _GetOnly(MethodNotAllowedError):
    headers: ClassVar[dict[str, str]] = {"Allow": "GET, HEAD"}


class WalletFastPath:
    def __init__(self, app: ASGIApp, database: Database) -> None:
        self.app = app
        self.database = database

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            method: str = scope["method"]
            if path == UPDATE_PATH:
                scope[ROUTE_SCOPE_KEY] = UPDATE_PATH
                if method == "POST":
                    await self._update(scope, receive, send)
                else:
                    await _respond_error(send, _PostOnly("only POST is allowed here"))
                return
            if (
                path.startswith(READ_PREFIX)
                and len(path) > _READ_PREFIX_LEN
                and "/" not in path[_READ_PREFIX_LEN:]
            ):
                scope[ROUTE_SCOPE_KEY] = READ_ROUTE
                if method in ("GET", "HEAD"):
                    query = scope.get("query_string", b"")
                    await self._read(path[_READ_PREFIX_LEN:], query, send)
                else:
                    await _respond_error(send, _GetOnly("only GET and HEAD are allowed here"))
                return
        await self.app(scope, receive, send)

    async def _update(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: list[str] = []
        content_type: str | None = None
        for name, value in scope["headers"]:
            if name == _IDEMPOTENCY_HEADER:
                keys.append(value.decode("latin-1"))
            elif name == b"content-type":
                content_type = value.decode("latin-1")
        try:
            body = await read_body(_chunks(receive))
            result = await serve_balance_update(self.database.hot, body, content_type, keys)
        except AppError as error:
            await _respond_error(send, error)
            return
        except Exception as exc:
            await _respond_unexpected(send, exc, writes=True)
            return
        headers = _JSON_HEADERS
        if result.replayed:
            headers = [*_JSON_HEADERS, (b"idempotent-replayed", b"true")]
        await _respond(send, 200, balance_body(result), headers)

    async def _read(self, raw_user_id: str, query: bytes, send: Send) -> None:
        try:
            result = await serve_balance_read(self.database.hot, raw_user_id, query)
        except AppError as error:
            await _respond_error(send, error)
            return
        except Exception as exc:
            await _respond_unexpected(send, exc, writes=False)
            return
        await _respond(send, 200, balance_body(result))


async def _chunks(receive: Receive) -> AsyncIterator[bytes]:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


async def _respond_unexpected(send: Send, exc: Exception, *, writes: bool) -> None:
    # This path runs outside FastAPI's error middleware, so it answers for itself, exactly as
    # the app's catch-all handler does.
    error = error_for_unexpected(exc, writes=writes)
    log.error("%s on the wallet's lean path", error.code, exc_info=exc)
    await _respond_error(send, error)


async def _respond_error(send: Send, error: AppError) -> None:
    count_answered(error)
    headers = _JSON_HEADERS
    if error.headers:
        headers = [*headers, *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await _respond(send, error.status_code, error.to_json_bytes(), headers)


async def _respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = _JSON_HEADERS
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
