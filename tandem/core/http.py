"""The HTTP server's own limits, which uvicorn lacks: uvicorn's httptools protocol with

- a cap on the bytes of a request line and headers (431), counted per request: the reads
  that leave its headers incomplete (so a 64 MiB header cannot hold an instance's event loop
  while it is parsed), and the URL and header fields the parser hands over (so a header
  completing within one read is counted too);
- a deadline for the headers (from the connection's first byte, or from the first byte of the
  next request on a kept-alive connection) and one for the body (408 or a close), so slow and
  idle sockets are closed instead of held forever. A request's deadline runs until the request
  has arrived whole, whatever was answered meanwhile: an early answer (a 401 before the body)
  leaves the body deadline running, and the keep-alive timeout starts once both the answer and
  the request are complete;
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
        self._header_bytes = 0  # reads that ended with this request's headers incomplete
        self._field_bytes = 0  # URL and header fields of this request, as parsed
        self._awaiting_headers = True
        # From a request's first byte to its last: its header or body deadline is armed, and
        # uvicorn's keep-alive timer is not (it would close a slow request early, and a byte
        # arriving cancels it: it cannot be a request's deadline).
        self._in_request = False
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
            self._refuse_large_headers()

    def on_message_begin(self) -> None:
        if self._refused:
            return
        # The first byte of a request: its headers are counted and timed from here.
        self._in_request = True
        self._awaiting_headers = True
        self._header_bytes = 0
        self._field_bytes = 0
        self._unset_keepalive_if_required()
        self._arm(Limits.header_timeout, 408, "request_timeout", "headers too slow")
        super().on_message_begin()

    def on_url(self, url: bytes) -> None:
        if self._refused or self._count_fields(len(url)):
            return
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        # ": " and CRLF: the bytes a field takes on the wire, at least.
        if self._refused or self._count_fields(len(name) + len(value) + 4):
            return
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_headers = False
        self._header_bytes = 0
        self._field_bytes = 0
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
        self._in_request = False
        self._disarm()
        super().on_message_complete()
        if (
            self.cycle is not None
            and self.cycle.response_complete
            and not self.pipeline
            and self.timeout_keep_alive_task is None
            and not self.transport.is_closing()
        ):
            # Answered before it had arrived whole (uvicorn armed its keep-alive timer at the
            # answer, and the body's bytes cancelled it): idle from now on, so the same timer.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )

    def on_response_complete(self) -> None:
        # The deadline armed belongs to the request being read, which may be this answer's
        # (answered before its body came: a refusal) or a later one already begun: it keeps
        # running. uvicorn arms its keep-alive timer only for a connection with no request
        # in progress.
        super().on_response_complete()
        if self._in_request:
            self._unset_keepalive_if_required()

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
        if not self._awaiting_headers and self.cycle is not None:
            if self.cycle.response_complete:
                # Its body too slow, though already answered (a 401 before the body): the
                # answer was sent, nothing more is.
                self._refuse(status, code, message, answer=False)
            else:
                # Its body too slow while the app reads it: the app sees the disconnect; what
                # it had started answering cannot be replaced by a 408.
                self.transport.close()
            return
        self._refuse(status, code, message)

    def _count_fields(self, size: int) -> bool:
        """Count a parsed part of the request line and headers; refuse (True) past the cap,
        however the bytes were split into reads."""
        self._field_bytes += size
        if self._field_bytes <= Limits.max_header_bytes:
            return False
        self._refuse_large_headers()
        return True

    def _refuse_large_headers(self) -> None:
        self._refuse(
            431,
            "request_header_too_large",
            f"request line and headers exceed {Limits.max_header_bytes} bytes",
        )

    def _refuse(self, status: int, code: str, message: str, *, answer: bool = True) -> None:
        """Answer in the JSON envelope (unless ``answer`` is false: the request was answered
        already) and close: the request never reaches the app. Behind a pipelined request
        still being answered, that answer finishes and the connection closes after it
        instead (nothing is written into it)."""
        self._refused = True
        self._disarm()
        self._unset_keepalive_if_required()
        if self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
            self.transport.pause_reading()
            return
        if answer:
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
