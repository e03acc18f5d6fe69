"""The real nginx config (deploy/nginx/) with Debian's nginx in front of real instances.

Three things differ from the container, and only these: servers.conf lists the native
instances' addresses (the container's finds the replicas by DNS with `resolve`, which needs
nginx 1.27.3+; Debian ships 1.22), the two listen ports are free ones instead of 8080 and 8443,
and the certificate is signed by a CA the test makes (tests/deploy/edge.py), which the clients
here trust and nothing else (a real TLS client: httpx, verifying). Everything else — TLS,
redirect, timeouts, retries, keepalive, limits, logs, error pages — is the files as shipped,
but where a test says it swaps something (a limit's size scaled down to be reached; for the
10000-connection burst, the plain listener serving Tandem: SERVE_PLAIN)."""

from __future__ import annotations

import json
import re
import signal
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tandem.cli import raise_fd_limit
from tandem.core.database import asyncpg_dsn
from tandem.core.settings import Settings
from tandem.loadtest import withdraw_burst
from tests.deploy.edge import (
    BURST_HEADER_DEADLINE,
    NGINX_DIR,
    SERVE_PLAIN,
    Nginx,
    balance_updates,
    make_certificates,
    nginx_version,
    prepare,
    run_nginx,
    setup_tls,
)
from tests.support import (
    API_KEY,
    AUTH,
    Server,
    free_port,
    http_get,
    http_post,
    require_tool,
    start_server,
    start_servers,
    wait_for,
)


def test_config_passes_nginx_t(tmp_path: Path) -> None:
    """`nginx -t` accepts deploy/nginx/nginx.conf with the container's servers.conf — verbatim
    on nginx 1.27.3+; on older nginx with `resolve` dropped and `app` (a Docker DNS name)
    replaced by an address, as those versions can do neither."""
    binary = require_tool("nginx")
    conf = prepare(tmp_path / "conf", None, free_port())
    servers = conf.parent / "servers.conf"
    if nginx_version(binary) < (1, 27, 3):
        text, n = re.subn(
            r"server app:8000 resolve ", "server 127.0.0.1:8000 ", servers.read_text()
        )
        assert n == 1
        servers.write_text(text)
    result = run_nginx(binary, conf, "-t")
    assert result.returncode == 0, result.stderr
    assert "test is successful" in result.stderr


def test_proxy_closes_idle_connections_before_the_app() -> None:
    """nginx's idle upstream connections expire before the app's keep-alive does: otherwise
    nginx can send a POST on a connection the app is closing, and a POST is not retried."""
    upstream = re.search(r"upstream tandem \{(.*?)\}", (NGINX_DIR / "nginx.conf").read_text(), re.S)
    assert upstream
    timeout = re.search(r"^\s*keepalive_timeout (\d+)s;", upstream.group(1), re.M)
    assert timeout
    assert int(timeout.group(1)) < Settings().keep_alive_timeout


@pytest.fixture(scope="module")
def instances(database_url: str, log_dir: Path) -> Iterator[list[Server]]:
    """Five real instances on one database (the deployment's default)."""
    servers = start_servers(database_url, log_dir, 5)
    yield servers
    for server in servers:
        server.stop()


def address(server: Server) -> str:
    return f"127.0.0.1:{server.port}"


def instance_id(server: Server) -> str:
    return http_get(f"{server.url}/health/live").headers["x-instance-id"]


def read_request(conn: socket.socket) -> bytes:
    """Reads one whole request (its body by Content-Length) off ``conn``: its head, without
    the blank line (empty if the peer closed first)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = re.search(rb"(?i)content-length:\s*(\d+)", head)
    while length and len(body) < int(length.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head


class DyingUpstream:
    """Stands for an instance that crashes mid-request: it reads the whole request, then
    closes the connection without answering. Counts the requests it swallowed, by method."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.swallowed: Counter[str] = Counter()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                head = read_request(conn)
                if head:
                    self.swallowed[head.split(b" ", 1)[0].decode()] += 1

    def close(self) -> None:
        self.sock.close()


def test_requests_spread_over_every_instance(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """Round robin: 100 requests through nginx reach all five instances about evenly, and the
    access log names the request id (also returned to the client) and the instance."""
    proxy = nginx([address(s) for s in instances])
    ids = {instance_id(s) for s in instances}
    answered: Counter[str] = Counter()
    request_ids = set()
    with proxy.client(headers=AUTH) as client:
        for _ in range(100):
            response = client.get("/health/live")
            assert response.status_code == 200
            answered[response.headers["x-instance-id"]] += 1
            request_ids.add(response.headers["x-request-id"])
    assert set(answered) == ids
    assert min(answered.values()) >= 10, answered
    assert len(request_ids) == 100

    def logged() -> list[str]:
        return [line for line in proxy.log_lines() if '"GET /health/live' in line]

    deadline = time.monotonic() + 10  # the access log is buffered (flushed every second)
    while len(logged()) < 100 and time.monotonic() < deadline:
        time.sleep(0.2)
    lines = logged()
    assert len(lines) == 100
    for line in lines:
        fields = dict(re.findall(r"(\w+)=(\S+)", line))
        assert fields["request_id"] in request_ids
        assert fields["instance"] in ids


def test_reads_survive_a_dead_instance(
    nginx: Callable[..., Nginx],
    instances: list[Server],
    database_url: str,
    log_dir: Path,
) -> None:
    """With one instance killed (SIGKILL) and one dying mid-request, every GET still succeeds:
    nginx tries the next instance."""
    doomed = start_server(database_url, log_dir)
    dying = DyingUpstream()
    try:
        proxy = nginx([address(s) for s in [*instances[:2], doomed]] + [dying.address])
        user = http_post(f"{instances[0].url}/users", json={"balance": 5}).json()["userId"]
        doomed.stop(signal.SIGKILL)
        with proxy.client(headers=AUTH) as client:
            for _ in range(40):
                response = client.get(f"/balance/{user}")
                assert response.status_code == 200, response.text
                assert response.json()["balance"] == 5
        assert dying.swallowed["GET"] >= 1  # it was tried, and the GET went on elsewhere
    finally:
        doomed.stop()
        dying.close()


def test_post_is_never_replayed(
    nginx: Callable[..., Nginx], instances: list[Server], database_url: str
) -> None:
    """A balance update sent to an instance that dies before answering is NOT retried on
    another one: the client gets a JSON 503 and can decide (with an Idempotency-Key, safely).
    Every 200 is applied exactly once; every request the dying instance took is a 503."""
    dying = DyingUpstream()
    try:
        proxy = nginx([dying.address, address(instances[0]), address(instances[1])])
        user = http_post(f"{instances[0].url}/users", json={"balance": 100}).json()["userId"]
        statuses: Counter[int] = Counter()
        with proxy.client(headers=AUTH) as client:
            for _ in range(12):
                response = client.post("/balance/update", json={"userId": user, "amount": -1})
                statuses[response.status_code] += 1
                if response.status_code == 503:
                    assert response.json()["error"]["code"] == "service_unavailable"
        balance = http_get(f"{instances[0].url}/balance/{user}").json()["balance"]
    finally:
        dying.close()
    assert dying.swallowed["POST"] >= 1
    assert statuses[503] == dying.swallowed["POST"], (statuses, dying.swallowed)
    assert statuses[200] == 12 - statuses[503]
    assert balance == 100 - statuses[200]


async def test_ten_thousand_withdrawals_through_nginx(
    nginx: Callable[..., Nginx], instances: list[Server], database_url: str
) -> None:
    """10000 concurrent withdrawals of 2 from 10000 through nginx over five instances: exactly
    5000 succeed and 5000 are refused, the balance ends at 0, and every instance took part:
    the per-address limits (reads, writes, connections) let a burst of 10000 from one address
    through. Over the plain listener serving Tandem's part of the config (SERVE_PLAIN): the
    load client speaks no TLS, and 10000 handshakes would measure it, not the limits; with
    the burst's header deadline (BURST_HEADER_DEADLINE: the client is starved, not slow)."""
    raise_fd_limit()
    proxy = nginx([address(s) for s in instances], swaps=SERVE_PLAIN | BURST_HEADER_DEADLINE)

    before = [balance_updates(s.url) for s in instances]
    report = await withdraw_burst(proxy.plain_url, requests=10_000, amount=2, api_key=API_KEY)
    after = [balance_updates(s.url) for s in instances]
    assert report.problems() == [], (report.outcomes, report.error_samples)
    assert (report.ok, report.refused, report.other) == (5000, 5000, 0)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        balance = await conn.fetchval("SELECT balance FROM users WHERE id = $1", report.user_id)
    finally:
        await conn.close()
    assert balance == 0
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == 10_000
    assert all(n > 0 for n in served), served


def test_unknown_host_is_refused_at_the_edge(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    proxy = nginx([address(s) for s in instances])
    with proxy.client(headers=AUTH) as client:
        forged = client.get("/balance/1", headers={"Host": "evil.example"})
        assert forged.status_code == 421
        assert forged.json()["error"]["code"] == "unknown_host"
        assert "x-instance-id" not in forged.headers, "it reached a replica"
        assert client.get("/balance/1").status_code == 200
    plain = http_get(f"{proxy.plain_url}/balance/1", headers={"Host": "evil.example"})
    assert plain.status_code == 421


def test_state_changing_requests_are_rate_limited_per_client(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """The shipped limit, scaled down (1 per second, burst 5) so a test can reach it: past it
    a POST gets 429 in the JSON envelope from nginx itself; reads have a budget of their own."""
    slow = {
        "zone=tandem_writes:10m rate=1000r/s": "zone=tandem_writes:10m rate=1r/s",
        "zone=tandem_writes burst=10000 nodelay": "zone=tandem_writes burst=5 nodelay",
    }
    proxy = nginx([address(s) for s in instances], swaps=slow)
    statuses = []
    with proxy.client(headers=AUTH) as client:
        for _ in range(12):
            answer = client.post("/users", json={"balance": 0})
            statuses.append(answer.status_code)
            if answer.status_code == 429:
                assert answer.json()["error"]["code"] == "rate_limited"
                assert answer.headers["retry-after"] == "1"
                assert "x-instance-id" not in answer.headers
        assert statuses.count(201) <= 7, statuses
        assert 429 in statuses
        reads = [client.get("/balance/1").status_code for _ in range(20)]
    assert reads == [200] * 20


def test_nginx_own_errors_are_json(nginx: Callable[..., Nginx], instances: list[Server]) -> None:
    """Every status nginx itself produces is answered in the app's envelope, not HTML."""
    proxy = nginx([address(s) for s in instances])
    host, port = proxy.url.removeprefix("https://").split(":")

    def raw(data: bytes) -> tuple[int, dict[str, Any]]:
        with (
            socket.create_connection((host, int(port)), timeout=10) as plain,
            proxy.verify.wrap_socket(plain, server_hostname=host) as sock,
        ):
            sock.sendall(data)
            received = b""
            while chunk := sock.recv(65536):
                received += chunk
                if b"\r\n\r\n" in received and received.rstrip().endswith(b"}"):
                    break
        head, _, body = received.partition(b"\r\n\r\n")
        assert b"content-type: application/json" in head.lower(), head
        return int(head.split(b" ", 2)[1]), json.loads(body)

    request = "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{extra}Connection: close\r\n\r\n"
    cases = {
        "malformed": (b"GARBAGE\r\n\r\n", 400, "bad_request"),
        "header too large": (
            request.format(path="/", extra="X-Big: " + "a" * 9000 + "\r\n").encode(),
            431,
            "request_header_too_large",
        ),
        "URI too long": (
            request.format(path="/" + "a" * 9000, extra="").encode(),
            414,
            "uri_too_long",
        ),
        "body too large": (
            request.format(path="/users", extra="Content-Length: 100000\r\n")
            .replace("GET", "POST", 1)
            .encode(),
            413,
            "payload_too_large",
        ),
    }
    for case, (data, status, code) in cases.items():
        got_status, body = raw(data)
        assert (got_status, body["error"]["code"]) == (status, code), case


def test_a_browser_login_works_through_nginx(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """nginx passes the Host with its port, so the app sees the browser's Origin as its own:
    the login and a cookie's POST work through the edge over HTTPS, a foreign Origin still
    does not; the login cookie is `Secure` (nginx told the app the browser spoke HTTPS)."""
    proxy = nginx([address(s) for s in instances])
    with proxy.client() as browser:
        login = browser.post("/login", data={"key": API_KEY}, headers={"Origin": proxy.url})
        assert login.status_code == 303, login.text
        set_cookie = login.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in set_cookie.split(";")}
        assert {"secure", "httponly"} <= attributes, set_cookie
        session = set_cookie.partition("tandem_session=")[2].partition(";")[0]
        assert session.startswith("tds_")
        cookie = {"Cookie": f"tandem_session={session}"}
        created = browser.post("/users", json={}, headers={**cookie, "Origin": proxy.url})
        assert created.status_code == 201, created.text
        foreign = browser.post("/users", json={}, headers={**cookie, "Origin": "http://evil"})
        assert foreign.status_code == 403


HSTS = "max-age=63072000"


def test_https_works_end_to_end_with_hsts(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """A verifying TLS client (only the test's CA trusted) reaches the app with its key over
    TLS 1.2 or newer; every HTTPS answer, the app's and nginx's own, carries HSTS."""
    proxy = nginx([address(s) for s in instances])
    with proxy.client(headers=AUTH) as client:
        answer = client.get("/balance/1")
        assert answer.status_code == 200, answer.text
        assert "x-instance-id" in answer.headers
        stream = answer.extensions["network_stream"]
        assert stream.get_extra_info("ssl_object").version() in ("TLSv1.2", "TLSv1.3")
        for response in (
            answer,
            client.get("/balance/1", headers={"Authorization": ""}),  # the app's 401
            client.get("/metrics"),  # nginx's own 404
            client.get("/balance/1", headers={"Host": "evil.example"}),  # the default server
        ):
            assert response.headers["strict-transport-security"] == HSTS, response.url
    with pytest.raises(httpx.ConnectError):  # a client that trusts only the public CAs
        httpx.get(f"{proxy.url}/balance/1", headers=AUTH)


def test_weak_tls_is_refused(nginx: Callable[..., Nginx], instances: list[Server]) -> None:
    """TLS 1.2 with a CBC cipher (which nginx's default list allows) gets no handshake; TLS
    1.2 with an AEAD cipher and TLS 1.3 do. (TLS 1.1 and older: refused by OpenSSL 3's own
    defaults on either side, so not a test of this config.)"""
    proxy = nginx([address(s) for s in instances])
    host, port = proxy.url.removeprefix("https://").split(":")

    def handshake(version: ssl.TLSVersion, ciphers: str | None = None) -> str | None:
        context = ssl.create_default_context(cafile=None)
        context.load_verify_locations(cadata=_ca_pem(proxy))
        context.minimum_version = context.maximum_version = version
        if ciphers:
            context.set_ciphers(ciphers)
        try:
            with (
                socket.create_connection((host, int(port)), timeout=10) as raw,
                context.wrap_socket(raw, server_hostname=host) as sock,
            ):
                return sock.cipher()[0]  # type: ignore[index]  # connected: never None
        except (ssl.SSLError, ConnectionResetError):
            return None

    assert handshake(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-SHA") is None
    assert handshake(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES256-SHA384") is None
    assert handshake(ssl.TLSVersion.TLSv1_2, "ECDHE-ECDSA-AES128-GCM-SHA256") == (
        "ECDHE-ECDSA-AES128-GCM-SHA256"
    )
    assert handshake(ssl.TLSVersion.TLSv1_3) is not None


def _ca_pem(proxy: Nginx) -> str:
    """The test CA's certificate, which ``proxy.verify`` trusts."""
    (ca,) = proxy.verify.get_ca_certs(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(ca)


def test_plain_http_redirects_to_https_and_refuses_credentials(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """On plain HTTP nothing reaches a replica: a browser's GET or form POST is redirected to
    the same place on HTTPS (308, the published HTTPS port named), without HSTS (which means
    nothing in clear); a request carrying a key is refused (403 https_required), not
    redirected, so a client set up with an http:// URL fails instead of leaking at every call."""
    proxy = nginx([address(s) for s in instances])
    tls_port = proxy.url.rsplit(":", 1)[1]
    with httpx.Client(base_url=proxy.plain_url) as plain:
        for method, path in (("GET", "/balance/1?x=1"), ("POST", "/login")):
            moved = plain.request(method, path)
            assert moved.status_code == 308, (method, moved.text)
            assert moved.headers["location"] == f"https://127.0.0.1:{tls_port}{path}"
            assert "strict-transport-security" not in moved.headers
            assert "x-instance-id" not in moved.headers
        keyed = plain.get("/balance/1", headers=AUTH)
        assert keyed.status_code == 403
        assert keyed.json()["error"]["code"] == "https_required"
        assert "x-instance-id" not in keyed.headers
    with proxy.client() as client:  # where the redirect points, the app answers
        assert client.get("/health/live").status_code == 200


class RecordingUpstream:
    """Stands for an instance and shows what nginx sends it: records each request's headers
    (lower-cased names, every value) and answers 200 ``{}``; while ``hold`` is clear, a
    request is held unanswered (a slow request in progress)."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"
        self.requests: list[dict[str, list[str]]] = []
        self.hold = threading.Event()
        self.hold.set()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            head = read_request(conn)
            if not head:
                return
            headers: dict[str, list[str]] = {}
            for line in head.decode().split("\r\n")[1:]:
                name, _, value = line.partition(":")
                headers.setdefault(name.strip().lower(), []).append(value.strip())
            self.requests.append(headers)
            self.hold.wait(30)
            conn.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 2\r\nConnection: close\r\n\r\n{}"
            )

    def close(self) -> None:
        self.hold.set()
        self.sock.close()


@pytest.fixture
def recorder() -> Iterator[RecordingUpstream]:
    upstream = RecordingUpstream()
    yield upstream
    upstream.close()


def test_forwarding_headers_are_nginx_own(
    nginx: Callable[..., Nginx], recorder: RecordingUpstream
) -> None:
    """The app is told `X-Forwarded-Proto: https` by nginx alone: a client's own
    X-Forwarded-Proto, X-Forwarded-For or Forwarded over HTTPS is replaced, not passed on or
    added to; one sent over plain HTTP reaches nothing (redirected)."""
    proxy = nginx([recorder.address])
    forged = {
        "X-Forwarded-Proto": "http",
        "X-Forwarded-For": "203.0.113.9",
        "Forwarded": "proto=http",
    }
    with proxy.client() as client:
        assert client.get("/balance/1", headers=forged).status_code == 200
    (seen,) = recorder.requests
    assert seen["x-forwarded-proto"] == ["https"]
    assert seen["x-forwarded-for"] == ["127.0.0.1"]
    assert "forwarded" not in seen
    plain = http_get(
        f"{proxy.plain_url}/login", headers={"X-Forwarded-Proto": "https", "Authorization": ""}
    )
    assert plain.status_code == 308
    assert len(recorder.requests) == 1


def test_readiness_is_not_published(nginx: Callable[..., Nginx], instances: list[Server]) -> None:
    """`GET /health/ready` is the orchestrator's, which asks each instance directly: through
    nginx it is 404 from nginx itself (no replica asked), while liveness still passes."""
    proxy = nginx([address(s) for s in instances])
    with proxy.client() as client:
        ready = client.get("/health/ready")
        assert ready.status_code == 404
        assert ready.json()["error"]["code"] == "not_found"
        assert "x-instance-id" not in ready.headers
        assert client.get("/health/live").status_code == 200
    assert http_get(f"{instances[0].url}/health/ready").status_code == 200


def test_reads_are_rate_limited_per_client(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """The shipped read limit, scaled down (1 per second, burst 5): past it a GET gets 429
    in the JSON envelope from nginx itself, with Retry-After and HSTS; writes have their own
    budget and still pass."""
    slow = {
        "zone=tandem_reads:10m rate=1000r/s": "zone=tandem_reads:10m rate=1r/s",
        "zone=tandem_reads burst=10000 nodelay": "zone=tandem_reads burst=5 nodelay",
    }
    proxy = nginx([address(s) for s in instances], swaps=slow)
    with proxy.client(headers=AUTH) as client:
        answers = [client.get("/balance/1") for _ in range(12)]
        statuses = [a.status_code for a in answers]
        assert statuses.count(200) <= 7, statuses
        refused = [a for a in answers if a.status_code == 429]
        assert refused, statuses
        for answer in refused:
            assert answer.json()["error"]["code"] == "rate_limited"
            assert answer.headers["retry-after"] == "1"
            assert answer.headers["strict-transport-security"] == HSTS
            assert "x-instance-id" not in answer.headers
        writes = [client.post("/users", json={}).status_code for _ in range(10)]
    assert writes == [201] * 10


def test_requests_in_progress_are_limited_per_client(
    nginx: Callable[..., Nginx], recorder: RecordingUpstream
) -> None:
    """The shipped limit on requests in progress from one address, scaled down to 2: with two
    held by a slow replica, a third is refused at once (429, JSON), and once they are
    answered, requests pass again."""
    proxy = nginx([recorder.address], swaps={"tandem_connections 10240;": "tandem_connections 2;"})
    recorder.hold.clear()
    held: list[int] = []

    def slow_read() -> None:
        with proxy.client(timeout=30) as client:
            held.append(client.get("/balance/1").status_code)

    readers = [threading.Thread(target=slow_read) for _ in range(2)]
    for reader in readers:
        reader.start()
    wait_for(lambda: len(recorder.requests) == 2, 10)
    with proxy.client() as client:
        third = client.get("/balance/1")
        assert third.status_code == 429
        assert third.json()["error"]["code"] == "rate_limited"
        recorder.hold.set()
        for reader in readers:
            reader.join(30)
        assert held == [200, 200]
        assert client.get("/balance/1").status_code == 200


def test_tls_setup_generates_a_local_certificate_with_a_warning(tmp_path: Path) -> None:
    """Without a certificate, deploy/nginx/tls-setup.sh makes a self-signed one for
    localhost and warns, at every start, keeping it while it is valid; the port file names
    the published HTTPS port (none for 443)."""
    out = tmp_path / "tls"
    first = setup_tls(tmp_path / "none", out, 443)
    assert first.returncode == 0, first.stderr
    assert "WARNING" in first.stderr
    assert "self-signed" in first.stderr
    made = (out / "cert.pem").read_bytes()
    again = setup_tls(tmp_path / "none", out, 8443)
    assert "WARNING" in again.stderr
    assert (out / "cert.pem").read_bytes() == made
    assert '":8443"' in (out / "https-port.conf").read_text()
    assert (out / "key.pem").stat().st_mode & 0o077 == 0


def test_tls_setup_serves_the_provided_certificate(tmp_path: Path) -> None:
    """With the operator's cert.pem and key.pem, tls-setup.sh copies them, without a warning,
    replacing a generated one; a key that is not the certificate's, or one file alone, is
    refused (nginx would not start)."""
    out = tmp_path / "tls"
    setup_tls(tmp_path / "none", out, 443)
    provided = make_certificates(tmp_path / "pki").folder
    done = setup_tls(provided, out, 443)
    assert done.returncode == 0, done.stderr
    assert "WARNING" not in done.stderr
    assert (out / "cert.pem").read_bytes() == (provided / "cert.pem").read_bytes()
    assert (out / "key.pem").read_bytes() == (provided / "key.pem").read_bytes()
    other = make_certificates(tmp_path / "other").folder
    (provided / "key.pem").write_bytes((other / "key.pem").read_bytes())
    mismatch = setup_tls(provided, tmp_path / "mismatch", 443)
    assert mismatch.returncode != 0
    assert "is not the private key" in mismatch.stderr
    (provided / "key.pem").unlink()
    alone = setup_tls(provided, tmp_path / "alone", 443)
    assert alone.returncode != 0
    assert "key.pem is missing" in alone.stderr
