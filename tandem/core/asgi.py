"""The ASGI interface the layers beneath FastAPI speak (the metrics, the access layer, the
wallet's lean path), and answering from them in the same JSON envelope as the framework's
handlers (tandem/core/handlers.py)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from tandem.core.errors import AppError
from tandem.core.failures import error_for_unexpected

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# The error a response answers, left in the request's scope by whichever layer rendered it
# (both HTTP paths' renderers call note_error), for the metrics middleware, which is
# outermost and sees every response, to count database failures once per answer.
ERROR_SCOPE_KEY = "tandem.error"

JSON_HEADERS = [(b"content-type", b"application/json")]
log = logging.getLogger(__name__)


def note_error(scope: Scope, error: AppError) -> None:
    """Record the error this request is answered with (see ERROR_SCOPE_KEY), and drop its
    traceback."""
    scope[ERROR_SCOPE_KEY] = error
    # An answered error's traceback is of no further use, and it is a reference cycle: the
    # error -> its traceback -> the frames it passed -> their locals, which hold the error and
    # the request's connection (scope, protocol, transport). Left to the cyclic collector,
    # every refused request kept its connection's objects alive until a collection: 170000
    # objects per burst of 10000 withdrawals (5000 refused), whose collections took ~0.4 s of
    # the server's CPU in a 2.3 s burst (docs/performance.md). Cut here, they are freed at once.
    error.__traceback__ = None


async def respond(
    send: Send, status: int, body: bytes, headers: list[tuple[bytes, bytes]] = JSON_HEADERS
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [*headers, (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_error(scope: Scope, send: Send, error: AppError) -> None:
    note_error(scope, error)
    headers = JSON_HEADERS
    if error.headers:
        headers = [*headers, *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await respond(send, error.status_code, error.to_json_bytes(), headers)


async def respond_unexpected(
    scope: Scope, send: Send, exc: Exception, *, writes: bool, where: str
) -> None:
    """Exactly as the app's catch-all handler answers: these layers run outside it."""
    error = error_for_unexpected(exc, writes=writes)
    log.error("%s in %s", error.code, where, exc_info=exc)
    await respond_error(scope, send, error)


async def body_chunks(receive: Receive) -> AsyncIterator[bytes]:
    """The request body's chunks as they arrive (an async iterator of bytes)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return
        yield message.get("body", b"")
        if not message.get("more_body", False):
            return


def header(scope: Scope, name: bytes) -> list[str]:
    """Every value of one request header (lower-case name), in order."""
    return [value.decode("latin-1") for key, value in scope["headers"] if key == name]
