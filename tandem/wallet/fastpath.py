"""The lean path: the one handler of the wallet's two hot routes, beneath the framework.

FastAPI spends ~0.2 ms of CPU per request on routing, dependency solving and response
validation: more than the whole database round trip of a balance update. This ASGI layer
answers ``POST /balance/update`` and ``GET /balance/{userId}`` itself (405 for any other
method on them), through the ``serve_*`` functions of hotroutes.py (the parser, errors and
metrics every route shares; hotroutes.OPERATIONS documents them in the OpenAPI schema), and
passes everything else to FastAPI. Measured against FastAPI routes for the same two:
docs/decisions.md, "The wallet's hot path".
"""

from __future__ import annotations

from typing import ClassVar

from tandem.core.asgi import (
    JSON_HEADERS,
    ASGIApp,
    Receive,
    Scope,
    Send,
    body_chunks,
    respond,
    respond_error,
    respond_unexpected,
)
from tandem.core.callers import caller_of
from tandem.core.dependencies import Instance
from tandem.core.errors import AppError, MethodNotAllowedError
from tandem.observability.metrics import ROUTE_SCOPE_KEY
from tandem.wallet.hotroutes import (
    READ_ROUTE,
    UPDATE_PATH,
    balance_body,
    serve_balance_read,
    serve_balance_update,
)
from tandem.wallet.schemas import content_type_of, read_body
from tandem.wallet.service import WalletBatches

READ_PREFIX = READ_ROUTE.removesuffix("{userId}")
_READ_PREFIX_LEN = len(READ_PREFIX)
_IDEMPOTENCY_HEADER = b"idempotency-key"
_WHERE = "the wallet's lean path"


class _PostOnly(MethodNotAllowedError):
    headers: ClassVar[dict[str, str]] = {"Allow": "POST"}


class _GetOnly(MethodNotAllowedError):
    headers: ClassVar[dict[str, str]] = {"Allow": "GET, HEAD"}


class WalletFastPath:
    def __init__(self, app: ASGIApp, instance: Instance, batches: WalletBatches | None) -> None:
        self.app = app
        self.instance = instance
        self.database = instance.database
        # The process's group commit of balance changes (batching.py; None: off).
        self.batches = batches

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            method: str = scope["method"]
            if path == UPDATE_PATH:
                scope[ROUTE_SCOPE_KEY] = UPDATE_PATH
                if method == "POST":
                    await self._update(scope, receive, send)
                else:
                    await respond_error(scope, send, _PostOnly("only POST is allowed here"))
                return
            if (
                path.startswith(READ_PREFIX)
                and len(path) > _READ_PREFIX_LEN
                and "/" not in path[_READ_PREFIX_LEN:]
            ):
                scope[ROUTE_SCOPE_KEY] = READ_ROUTE
                if method in ("GET", "HEAD"):
                    query = scope.get("query_string", b"")
                    await self._read(scope, path[_READ_PREFIX_LEN:], query, send)
                else:
                    error = _GetOnly("only GET and HEAD are allowed here")
                    await respond_error(scope, send, error)
                return
        await self.app(scope, receive, send)

    async def _update(self, scope: Scope, receive: Receive, send: Send) -> None:
        keys: list[str] = []
        content_types: list[str] = []
        for name, value in scope["headers"]:
            if name == _IDEMPOTENCY_HEADER:
                keys.append(value.decode("latin-1"))
            elif name == b"content-type":
                content_types.append(value.decode("latin-1"))
        try:
            body = await read_body(body_chunks(receive))
            content_type = content_type_of(content_types)
            result = await serve_balance_update(
                self.instance, caller_of(scope), body, content_type, keys, self.batches
            )
        except AppError as error:
            await respond_error(scope, send, error)
            return
        except Exception as exc:
            await respond_unexpected(scope, send, exc, writes=True, where=_WHERE)
            return
        headers = JSON_HEADERS
        if result.replayed:
            headers = [*JSON_HEADERS, (b"idempotent-replayed", b"true")]
        await respond(send, 200, balance_body(result), headers)

    async def _read(self, scope: Scope, raw_user_id: str, query: bytes, send: Send) -> None:
        try:
            result = await serve_balance_read(self.database.pool, raw_user_id, query)
        except AppError as error:
            await respond_error(scope, send, error)
            return
        except Exception as exc:
            await respond_unexpected(scope, send, exc, writes=False, where=_WHERE)
            return
        await respond(send, 200, balance_body(result))
