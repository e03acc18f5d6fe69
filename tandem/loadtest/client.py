"""A small HTTP/1.1 load client on asyncio protocols, parsing responses with httptools.

Why not aiohttp or httpx: the load generator shares the machine with the server it measures
(two cores here, with PostgreSQL too), so every microsecond of client CPU is taken from the
server and shows up as server latency. A general-purpose client pays for features a load
generator does not need: a connection pool, header objects, cookies, redirects, streaming and
TLS plumbing. A rough check on the 2-core development box (4000 GET /balance requests, 100 in
flight, against one local tandem server, client CPU from getrusage): httpx spent about 3 ms of
CPU per request, this module about 0.25 ms with a connection per request and 0.1 ms over
keep-alive connections: more than ten times less. Repeat it before quoting it elsewhere.

What this module does instead: one ``asyncio.Protocol`` per connection writes pre-built request
bytes and feeds what arrives into ``httptools.HttpResponseParser`` (the C parser uvicorn uses);
the response completes a future. No header parsing beyond what httptools does in C.

Two shapes:

- :func:`send_burst`: one connection per request (``Connection: close``), up to
  ``concurrency`` in flight (default: all). This is how 10000 clients arrive at once.
- :func:`send_keepalive`: ``connections`` persistent connections, each sending its requests
  one after another; for read throughput, where connection setup would dominate.

Every request is bounded by ``request_timeout`` (connect and response together), so a run
always ends. Limits, on purpose: plain HTTP only, and a response must be delimited by
Content-Length or chunked encoding (a body ended by closing the connection counts as a reset).
"""

from __future__ import annotations

import asyncio
import gc
import json
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httptools

DEFAULT_TIMEOUT = 60.0

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Endpoint:
    """Where requests go: the address to connect to and what to put in ``Host``."""

    host: str
    port: int
    host_header: str
    path_prefix: str = ""
    # Sent as Authorization: Bearer on every request.
    api_key: str | None = None

    def url_path(self, path: str) -> str:
        return self.path_prefix + path

    def request(
        self,
        method: str,
        path: str,
        json_body: Any = None,
        *,
        keep_alive: bool = False,
        headers: Mapping[str, str] | None = None,
    ) -> bytes:
        """``build_request`` for this endpoint: its path prefix, Host and key."""
        return build_request(
            method,
            self.url_path(path),
            self.host_header,
            json_body,
            keep_alive=keep_alive,
            headers={**auth_headers(self.api_key), **(headers or {})},
        )


def auth_headers(api_key: str | None) -> dict[str, str]:
    return {} if api_key is None else {"Authorization": f"Bearer {api_key}"}


def parse_base_url(url: str, api_key: str | None = None) -> Endpoint:
    """``http://host[:port][/prefix]``; raises ValueError for anything else (https included)."""
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"expected http://host[:port], got {url!r}")
    return Endpoint(
        host=parts.hostname,
        port=parts.port or 80,
        host_header=parts.netloc,
        path_prefix=parts.path.rstrip("/"),
        api_key=api_key,
    )


def build_request(
    method: str,
    path: str,
    host: str,
    json_body: Any = None,
    *,
    keep_alive: bool = False,
    headers: Mapping[str, str] | None = None,
) -> bytes:
    """The complete bytes of one request. ``json_body`` None means no body."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}"]
    lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
    body = b""
    if json_body is not None:
        body = json.dumps(json_body, separators=(",", ":")).encode()
        lines.append("Content-Type: application/json")
    if body or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body)}")
    lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


@dataclass(frozen=True, slots=True)
class Result:
    """One request's outcome: a response (``status`` > 0) or the ``error`` that stopped it.

    ``latency`` runs from just before connecting (burst) or writing (keep-alive) to the last
    byte of the response or the failure, in seconds of ``time.perf_counter``.
    """

    status: int
    body: bytes
    latency: float
    error: BaseException | None = None

    def json(self) -> Any:
        return json.loads(self.body)

    def describe(self) -> str:
        """A short label for histograms: the status code, or the error's type."""
        if self.error is not None:
            return type(self.error).__name__
        return str(self.status)


OnDone = Callable[[Result], None]
# What ends one request without a response. TimeoutError and every connection error are
# OSErrors; a malformed response is an HttpParserError.
_FAILURES = (OSError, httptools.HttpParserError)


class _Connection(asyncio.Protocol):
    """One TCP connection carrying one request at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop, first: bytes | None = None) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None
        self._chunks: list[bytes] = []
        self.closed = False
        self.keep_alive = False
        # The request written as soon as the connection is made, and its response (kept
        # apart from ``_waiter``, which is cleared when the response completes, perhaps
        # before ``response`` awaits it).
        self._first = first
        self._first_response: asyncio.Future[tuple[int, bytes]] | None = None
        if first is not None:
            self._waiter = self._first_response = loop.create_future()

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._transport = cast(asyncio.Transport, transport)
        if self._first is not None:
            # Written in the callback that reports the connection, not later by the coroutine
            # awaiting it: with thousands connecting at once on a busy machine, that coroutine
            # can resume seconds after the server accepted, and a server's header deadline
            # (nginx's client_header_timeout, Tandem's own) runs from the accept, so a starved
            # client would be timed out having sent nothing: a failure of the load client
            # that would look like the server's.
            self._transport.write(self._first)
            self._first = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(error)
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(exc or ConnectionResetError("connection closed before the response ended"))

    # httptools callbacks

    def on_body(self, body: bytes) -> None:
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        self.keep_alive = self._parser.should_keep_alive()
        body = b"".join(self._chunks)
        self._chunks = []
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result((self._parser.get_status_code(), body))

    # use

    async def response(self) -> tuple[int, bytes]:
        """The response to the request written when the connection was made."""
        assert self._first_response is not None, "no request given to write"
        return await self._first_response

    async def exchange(self, request: bytes) -> tuple[int, bytes]:
        """Write one request and wait for its response: (status, body)."""
        assert self._transport is not None
        assert self._waiter is None, "one request at a time"
        if self.closed:
            raise ConnectionResetError("connection already closed")
        self._waiter = self._loop.create_future()
        self._transport.write(request)
        return await self._waiter

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def _fail(self, error: BaseException) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_exception(error)


async def _connect(endpoint: tuple[str, int], first: bytes | None = None) -> _Connection:
    """A connection; ``first``, when given, is written the moment it is made."""
    loop = asyncio.get_running_loop()
    _, connection = await loop.create_connection(lambda: _Connection(loop, first), *endpoint)
    return connection


async def fetch(
    host: str, port: int, request: bytes, request_timeout: float = DEFAULT_TIMEOUT
) -> Result:
    """One request on its own connection. Never raises for a failed request: see ``error``."""
    started = time.perf_counter()
    connection: _Connection | None = None
    try:
        async with asyncio.timeout(request_timeout):
            connection = await _connect((host, port), request)
            status, body = await connection.response()
    except _FAILURES as error:
        return Result(0, b"", time.perf_counter() - started, error)
    finally:
        # Sent with Connection: close, the server has usually closed already, so it (not this
        # side) holds the TIME_WAIT and no local port stays tied up.
        if connection is not None:
            connection.close()
    return Result(status, body, time.perf_counter() - started)


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while a burst is in flight.

    Each of the thousands of live connections holds a few dozen objects, and every full
    collection walks all of them, again and again, to find almost nothing: the request objects
    are freed by reference counting. Measured: about a tenth of the client's CPU in a 10000
    burst. What cycles there are (exceptions and their tracebacks) wait for the burst to end.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _collect(results: list[Result | None]) -> list[Result]:
    done = [result for result in results if result is not None]
    assert len(done) == len(results), "every request records a result"
    return done


async def send_burst(
    host: str,
    port: int,
    requests: Sequence[bytes],
    concurrency: int | None = None,
    request_timeout: float = DEFAULT_TIMEOUT,
    on_done: OnDone | None = None,
) -> list[Result]:
    """Send each request on its own connection, ``concurrency`` at a time (None: all at once).

    Results come back in the order of ``requests``. ``on_done`` is called as each one ends.
    """
    results: list[Result | None] = [None] * len(requests)
    pending: Iterator[tuple[int, bytes]] = iter(enumerate(requests))

    # Workers share one iterator (safe: only one coroutine runs at a time); with no limit each
    # worker takes exactly one request, so all connect in the same loop iteration.
    async def worker() -> None:
        for index, request in pending:
            result = await fetch(host, port, request, request_timeout)
            results[index] = result
            if on_done is not None:
                on_done(result)

    workers = len(requests) if concurrency is None else max(1, min(concurrency, len(requests)))
    with _gc_paused():
        await asyncio.gather(*(worker() for _ in range(workers)))
    return _collect(results)


async def send_keepalive(
    host: str,
    port: int,
    request: bytes | Sequence[bytes],
    total: int,
    connections: int,
    request_timeout: float = DEFAULT_TIMEOUT,
    on_done: OnDone | None = None,
    rate: float | None = None,
) -> list[Result]:
    """Send ``request`` ``total`` times over ``connections`` persistent connections (or,
    given a sequence, request ``i`` of it as the ``i``-th), as fast as they go or, with
    ``rate``, request ``i`` no earlier than ``i / rate`` seconds after the start (a steady
    load, as long as the connections keep up).

    Each request must be built with ``keep_alive=True``. A connection that fails or that the
    server closes is replaced for the next request; the failed request is recorded, not retried.
    """
    results: list[Result | None] = [None] * total
    pending = iter(range(total))
    start = time.perf_counter()

    async def worker() -> None:
        connection: _Connection | None = None
        try:
            for index in pending:
                if rate is not None:
                    await asyncio.sleep(start + index / rate - time.perf_counter())
                started = time.perf_counter()
                try:
                    async with asyncio.timeout(request_timeout):
                        if connection is None or connection.closed:
                            connection = await _connect((host, port))
                        status, body = await connection.exchange(
                            request if isinstance(request, bytes) else request[index]
                        )
                    result = Result(status, body, time.perf_counter() - started)
                except _FAILURES as error:
                    result = Result(0, b"", time.perf_counter() - started, error)
                if result.error is not None or connection is None or not connection.keep_alive:
                    if connection is not None:
                        connection.close()
                    connection = None
                results[index] = result
                if on_done is not None:
                    on_done(result)
        finally:
            if connection is not None:
                connection.close()

    with _gc_paused():
        await asyncio.gather(*(worker() for _ in range(max(1, min(connections, total)))))
    return _collect(results)


def run(main: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine on uvloop when it is installed (cheaper per connection), else asyncio."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency except on Windows
        return asyncio.run(main)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main)
