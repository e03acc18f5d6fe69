"""The load client's connections against a raw socket server of the test's own: when a
burst's request is sent, and that its response is kept whenever it arrives."""

from __future__ import annotations

import asyncio
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from tandem.loadtest.client import _connect, parse_base_url

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"
WAIT = 30.0  # a bound on waiting for the other thread, never reached when all is well


@dataclass
class Server:
    """One connection: reads a request's headers, answers 200 and closes."""

    address: tuple[str, int]
    received: threading.Event = field(default_factory=threading.Event)
    answered: threading.Event = field(default_factory=threading.Event)


@contextmanager
def one_connection_server() -> Iterator[Server]:
    listener = socket.create_server(("127.0.0.1", 0))
    server = Server(listener.getsockname()[:2])

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(WAIT)
            received = b""
            while b"\r\n\r\n" not in received:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                received += chunk
            server.received.set()
            conn.sendall(OK)
        server.answered.set()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        listener.close()
        thread.join(timeout=WAIT)


def _request(server: Server) -> bytes:
    host, port = server.address
    return parse_base_url(f"http://{host}:{port}").request("GET", "/")


async def test_a_burst_request_is_on_the_wire_when_the_connect_returns() -> None:
    """A burst's request is written as its connection is made, not when the coroutine that
    connected resumes: with thousands connecting at once that can be seconds later, past a
    server's header deadline (nginx's client_header_timeout runs from the accept), and the
    starved client's failure would look like the server's. Here the server has the request
    while this coroutine has not yielded to the event loop since the connect returned."""
    with one_connection_server() as server:
        connection = await _connect(server.address, _request(server))
        # Blocking, on purpose: the event loop runs nothing more until the server has it.
        assert server.received.wait(WAIT), "the request was not written with the connect"
        assert await connection.response() == (200, b"ok")


async def test_a_response_complete_before_it_is_awaited_is_kept() -> None:
    """A response that arrived, and a connection the server closed, before the coroutine
    asked for the response is still that request's response."""
    with one_connection_server() as server:
        connection = await _connect(server.address, _request(server))
        assert server.answered.wait(WAIT)
        async with asyncio.timeout(WAIT):
            # The loop reads the answer and the close (no event tells of them: polled).
            while not connection.closed:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        assert await connection.response() == (200, b"ok")
