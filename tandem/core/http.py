"""The HTTP server's own limits, which uvicorn lacks: uvicorn's httptools protocol with

- a cap on the bytes of a request line and headers (431), so a 64 MiB header cannot hold an
  instance's event loop while it is parsed;
- a deadline for the headers (from the connection's first byte, or from the first byte of the
  next request on a kept-alive connection) and one for the body (408 or a close), so slow and
  idle sockets are closed instead of held forever;
- a cap on open connections per instance that answers 503 in the JSON envelope at once, before
  the descriptors run out (uvicorn's own ``limit_concurrency`` answers plain text);
- a declared body above the cap refused on every route (413), and a path holding a NUL or
  another control character (encoded or not) refused (422, as every malformed path
  parameter is) before any route sees it.

Why a subclass rather than a proxy in front: the limits must hold on every instance however it
is reached (nginx has its own, deploy/nginx/). The subclass overrides four of uvicorn's
protocol callbacks and calls them; uvicorn is pinned to the minor version it was written and
tested against (tests/core/test_http_limits.py).
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any
from urllib.parse import unquote_to_bytes

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tandem.core.errors import envelope

_STATUS = {
    422: b"Unprocessable Content",
    408: b"Request Timeout",
    413: b"Content Too Large",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}
# Seconds a refused connection is kept half-closed before it is closed.
_LINGER = 1.0
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")


class Limits:
    """Set once per process, before the server starts (``tandem serve``)."""

    max_header_bytes = 32 * 1024
    max_body_bytes = 64 * 1024
    header_timeout = 10.0
    body_timeout = 30.0
    max_connections = 20_000


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_bytes = 0
        self._awaiting_headers = True
        self._refused = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # A connection that never sends a byte is closed too.
        self._arm(Limits.header_timeout, 408, "request_timeout", "no request headers in time")

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        # While a request's headers are still incomplete after a chunk is parsed, the chunk
        # counts whole towards them (one that also finished a previous request's body
        # over-counts by that tail). What the parser buffers is bounded by the limit plus one
        # read; headers that complete within a chunk never count its body bytes.
        super().data_received(data)
        if self._refused or not self._awaiting_headers:
            return
        self._header_bytes += len(data)
        if self._header_bytes > Limits.max_header_bytes:
            self._refuse(
                431,
                "request_header_too_large",
                f"request line and headers exceed {Limits.max_header_bytes} bytes",
            )

    def on_message_begin(self) -> None:
        # The first byte of a request: its headers are counted and timed from here.
        self._awaiting_headers = True
        self._header_bytes = 0
        self._arm(Limits.header_timeout, 408, "request_timeout", "headers too slow")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if not self._refused:
            super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._refused:
            super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_headers = False
        self._header_bytes = 0
        self._disarm()
        if len(self.connections) > Limits.max_connections:
            self._refuse(503, "service_unavailable", "this instance is at its connection cap")
            return
        refusal = _refusal(self.url, self.headers)
        if refusal is not None:
            self._refuse(*refusal)
            return
        self._arm(Limits.body_timeout, 408, "request_timeout", "request body too slow")
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._disarm()
        super().on_message_complete()

    def on_response_complete(self) -> None:
        # Answered (perhaps before its body came: a refusal): no body deadline is left for
        # it; until the next request begins, uvicorn's keep-alive timeout closes an idle one.
        self._disarm()
        super().on_response_complete()

    # --- helpers ----------------------------------------------------------------------------

    def _arm(self, seconds: float, status: int, code: str, message: str) -> None:
        self._disarm()
        self._timer = self.loop.call_later(seconds, self._expired, status, code, message)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self, status: int, code: str, message: str) -> None:
        self._timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A request in progress (its body too slow): the app sees the disconnect; what it
            # had started answering cannot be replaced by a 408.
            self.transport.close()
            return
        self._refuse(status, code, message)

    def _refuse(self, status: int, code: str, message: str) -> None:
        """Answer in the JSON envelope and close: the request never reaches the app. Behind
        a pipelined request still being answered, that answer finishes and the connection
        closes after it instead (nothing is written into it)."""
        self._refused = True
        self._disarm()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            self.transport.pause_reading()
            return
        body = json.dumps(envelope(code, message), separators=(",", ":")).encode()
        head = b"HTTP/1.1 %d %s\r\n" % (status, _STATUS[status])
        headers = b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        if status == 503:
            headers += b"retry-after: 1\r\n"
        self.transport.write(head + headers + b"connection: close\r\n\r\n" + body)
        # Half-close, and discard what still arrives for a moment before closing: closing
        # with unread bytes would reset the connection, and the client could lose the answer.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(_LINGER, self.transport.close)


def _refusal(url: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[int, str, str] | None:
    path = url.split(b"?", 1)[0]
    if _CONTROL.search(path) or (b"%" in path and _CONTROL.search(unquote_to_bytes(path))):
        return 422, "validation_error", "the path holds a control character"
    for name, value in headers:
        if name == b"content-length" and (
            not value.isdigit() or int(value) > Limits.max_body_bytes
        ):
            return 413, "payload_too_large", f"bodies are at most {Limits.max_body_bytes} bytes"
    return None
