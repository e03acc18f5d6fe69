"""Answering from a pure ASGI layer (beneath FastAPI): the wallet's lean path and the access
layer answer for themselves, in the same JSON envelope and with the same error metrics as the
framework's handlers."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from tandem.core.errors import AppError
from tandem.core.failures import count_answered, error_for_unexpected
from tandem.observability.metrics import Receive, Scope, Send

JSON_HEADERS = [(b"content-type", b"application/json")]
log = logging.getLogger(__name__)


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


async def respond_error(send: Send, error: AppError) -> None:
    count_answered(error)
    headers = JSON_HEADERS
    if error.headers:
        headers = [*headers, *((k.lower().encode(), v.encode()) for k, v in error.headers.items())]
    await respond(send, error.status_code, error.to_json_bytes(), headers)


async def respond_unexpected(send: Send, exc: Exception, *, writes: bool, where: str) -> None:
    """Exactly as the app's catch-all handler answers: these layers run outside it."""
    error = error_for_unexpected(exc, writes=writes)
    log.error("%s in %s", error.code, where, exc_info=exc)
    await respond_error(send, error)


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
