"""The server's own limits (tandem/core/http.py) on a real `tandem serve`, over raw sockets:
probes of oversize headers and bodies, slow and idle clients, the connection
cap and control characters in a path."""

from __future__ import annotations

import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.support import API_KEY, Server, http_get, samples, start_server, wait_for

LIMITS = {
    "TANDEM_HTTP_HEADER_TIMEOUT": "1.0",
    "TANDEM_HTTP_BODY_TIMEOUT": "1.0",
    "TANDEM_HTTP_MAX_CONNECTIONS": "40",
    # Above the 1.5 s pause of test_normal_keep_alive_traffic_is_never_refused.
    "TANDEM_KEEP_ALIVE_TIMEOUT": "3",
}


# Every timer but the body deadline far beyond how long a test waits (DRIBBLE_WAIT): a
# connection this server closes within that wait was closed by the body deadline.
BODY_DEADLINE_ONLY = {
    **LIMITS,
    "TANDEM_HTTP_HEADER_TIMEOUT": "600",
    "TANDEM_KEEP_ALIVE_TIMEOUT": "600",
}
DRIBBLE_WAIT = 30.0


@pytest.fixture(scope="module")
def limited(database_url: str, log_dir: Path) -> Iterator[Server]:
    server = start_server(database_url, log_dir, extra_env=LIMITS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def body_deadline_only(database_url: str, log_dir: Path) -> Iterator[Server]:
    server = start_server(database_url, log_dir, extra_env=BODY_DEADLINE_ONLY)
    yield server
    server.stop()


def connect(server: Server) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=10)


def answer(sock: socket.socket) -> tuple[int, dict[str, object] | None]:
    """Status and JSON body of the response (the server closes after these refusals)."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else None


def request(path: str, *extra: str, body: bytes = b"") -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: t", f"Authorization: Bearer {API_KEY}", *extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def test_oversize_headers_are_431_without_reading_them_all(limited: Server) -> None:
    with connect(limited) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 200_000)
        status, body = answer(sock)
    assert status == 431
    assert body is not None
    assert body["error"]["code"] == "request_header_too_large"
    # The instance still answers (nothing was held).
    assert http_get(f"{limited.url}/health/live").status_code == 200


def test_headers_above_the_cap_are_431_however_they_arrive(limited: Server) -> None:
    """The cap counts a request's headers, not one read: 32,000 bytes in small pieces, then
    2,000 more completing the headers within one read, is 431 (not served)."""
    with connect(limited) as sock:
        sock.sendall(b"GET /health/live HTTP/1.1\r\nHost: t\r\n")
        try:
            for index in range(32):
                sock.sendall(b"X-Piece-%02d: " % index + b"a" * 986 + b"\r\n")  # 1,000 bytes
                time.sleep(0.005)  # pace the pieces into separate reads
            sock.sendall(b"X-Last: " + b"a" * 1990 + b"\r\n\r\n")
        except OSError:
            pass  # refused and closed while sending: the answer is still there to read
        status, body = answer(sock)
    assert status == 431
    assert body is not None
    assert body["error"]["code"] == "request_header_too_large"


def closed_by_server(sock: socket.socket, *, dribble: bool) -> Callable[[], bool]:
    """A ``wait_for`` predicate: true once the server has closed ``sock``; each call first
    sends one more body byte when ``dribble``. The socket is made non-blocking: with a
    timeout, Python polls before each call (MSG_DONTWAIT or not), so a call could wait up to
    that timeout, and a dribble would be one byte per timeout rather than per poll."""
    sock.settimeout(0)

    def closed() -> bool:
        try:
            if dribble:
                sock.send(b"x")
            return sock.recv(65536, socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except (ConnectionResetError, BrokenPipeError):
            return True

    return closed


_EARLY_ANSWERED = (
    "POST /users HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
    "Content-Length: 1000\r\n\r\n"
)


def test_an_early_answer_keeps_the_body_deadline(body_deadline_only: Server) -> None:
    """An anonymous POST answered 401 before its body, its body then sent a byte at a time:
    closed by the body deadline (1 s), on a server whose header and keep-alive timers (600 s)
    are far beyond the wait (DRIBBLE_WAIT), so no other timer can be what closed it."""
    with connect(body_deadline_only) as sock:
        sock.sendall(_EARLY_ANSWERED.encode())
        first = one_response(sock)
        assert first.startswith(b"HTTP/1.1 401 "), first[:100]
        wait_for(closed_by_server(sock, dribble=True), DRIBBLE_WAIT, "closed by the server")


def test_an_early_answer_then_idle_meets_the_keep_alive_timeout(limited: Server) -> None:
    """An anonymous POST answered 401 before its body, the rest of its body sent, then
    nothing: closed by the keep-alive timeout (3 s here)."""
    with connect(limited) as sock:
        sock.sendall(_EARLY_ANSWERED.encode())
        first = one_response(sock)
        assert first.startswith(b"HTTP/1.1 401 "), first[:100]
        sock.sendall(b"x" * 1000)
        wait_for(closed_by_server(sock, dribble=False), 15, "closed by the server")


def test_a_declared_oversize_body_is_413_on_any_route(limited: Server) -> None:
    for path in ("/tasks/x/pause", "/users", "/no/such/route"):
        with connect(limited) as sock:
            sock.sendall(request(path, "Content-Length: 10000000").replace(b"GET", b"POST", 1))
            status, body = answer(sock)
        assert status == 413, path
        assert body is not None
        assert body["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("path", ["/balance/1%00", "/tasks/a%00b/history", "/tasks/a%0Ab/run"])
def test_control_characters_in_a_path_are_422(limited: Server, path: str) -> None:
    with connect(limited) as sock:
        sock.sendall(request(path))
        status, body = answer(sock)
    assert status == 422
    assert body is not None
    assert body["error"]["code"] == "validation_error"


def test_idle_and_slow_clients_are_closed(limited: Server) -> None:
    """A socket that sends nothing, one that sends its headers a byte at a time, and one
    whose body never comes are all closed by the server (header and body deadlines of 1 s
    here), the first two with a 408."""
    idle, slow, bodiless = connect(limited), connect(limited), connect(limited)
    try:
        bodiless.sendall(request("/users", "Content-Length: 100").replace(b"GET", b"POST", 1))
        started = time.monotonic()
        for byte in b"GET /health/live HTTP/1.1\r\nHost: t\r\n":
            slow.send(bytes([byte]))
            if time.monotonic() - started > 1.5:
                break
            time.sleep(0.05)
        for sock in (idle, slow):
            status, body = answer(sock)
            assert status == 408
            assert body is not None
            assert body["error"]["code"] == "request_timeout"
        bodiless.settimeout(10)
        leftover = b""
        while chunk := bodiless.recv(65536):  # returns b"" once the server has closed it
            leftover += chunk
        assert b" 201 " not in leftover
    finally:
        for sock in (idle, slow, bodiless):
            sock.close()


def test_past_the_connection_cap_the_answer_is_503_at_once(limited: Server) -> None:
    held = [connect(limited) for _ in range(45)]
    try:
        time.sleep(0.2)
        with connect(limited) as sock:
            sock.sendall(request("/health/live"))
            status, body = answer(sock)
        assert status == 503
        assert body is not None
        assert body["error"]["code"] == "service_unavailable"
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert http_get(f"{limited.url}/health/live").status_code == 200


def test_normal_keep_alive_traffic_is_never_refused(limited: Server) -> None:
    """On one kept-alive connection: a 40 KB body in the same packet as its headers is the
    app's to judge (413 from the wallet's 4 KiB reader, not 431), a request answered before
    its body arrived (401) leaves the connection usable, and a connection idle past the body
    and header deadlines after a response gets no unasked 408."""
    with connect(limited) as sock:
        body = b'{"balance": 0, "pad": "' + b"x" * 40_000 + b'"}'
        sock.sendall(
            request(
                "/users", "Content-Type: application/json", f"Content-Length: {len(body)}"
            ).replace(b"GET", b"POST", 1)
            + body
        )
        first = one_response(sock)
        assert first.startswith(b"HTTP/1.1 413 "), first[:100]
        time.sleep(1.5)  # past both deadlines (1 s each here)
        sock.sendall(request("/health/live"))
        second = one_response(sock)
        assert second.startswith(b"HTTP/1.1 200 "), second[:100]


def one_response(sock: socket.socket) -> bytes:
    """Exactly one response from a kept-alive connection (head, then Content-Length bytes)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    declared = re.search(rb"(?i)content-length: *(\d+)", head)
    assert declared is not None, head
    length = int(declared.group(1))
    while len(body) < length:
        chunk = sock.recv(65536)
        assert chunk, "closed mid-body"
        body += chunk
    return head + b"\r\n\r\n" + body


def test_answers_do_not_name_the_server(limited: Server) -> None:
    """No `Server` header: an answer does not say which server (and version) made it."""
    response = http_get(f"{limited.url}/health/live")
    assert response.status_code == 200
    assert "server" not in response.headers, response.headers


def _answers(server: Server, route: str) -> dict[str, float]:
    """Status -> requests answered on ``route``, as the instance counts them."""
    metrics = http_get(f"{server.url}/metrics").text
    return {
        status: sum(samples(metrics, "tandem_http_requests_total", route=route, status=status))
        for status in {"400", "500"}
    }


@pytest.mark.parametrize("route", ["/transfers", "/users"])
def test_a_client_leaving_mid_body_is_not_a_server_error(limited: Server, route: str) -> None:
    """A client that closes its connection halfway through a body: counted as the client's
    doing (400 client_disconnected, never delivered), no 500 and no traceback in the log."""
    before, tracebacks = _answers(limited, route), limited.log_path.read_text().count("Traceback")
    head = (
        f"POST {route} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
    )
    with connect(limited) as sock:
        sock.sendall(head.encode() + b'{"fromUs')  # 8 of the 100 bytes announced
    wait_for(
        lambda: _answers(limited, route)["400"] == before["400"] + 1, 10, "the request counted"
    )
    assert _answers(limited, route)["500"] == before["500"]
    assert limited.log_path.read_text().count("Traceback") == tracebacks
