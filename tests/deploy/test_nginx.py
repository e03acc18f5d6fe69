"""The real nginx config (deploy/nginx/) with Debian's nginx in front of real instances.

Two things differ from the container, and only these: servers.conf lists the native
instances' addresses (the container's finds the replicas by DNS with `resolve`, which needs
nginx 1.27.3+; Debian ships 1.22), and the listen port is a free one instead of 8080.
Everything else — timeouts, retries, keepalive, limits, logs, error pages — is the file as
shipped."""

from __future__ import annotations

import json
import re
import signal
import socket
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
    NGINX_DIR,
    Nginx,
    balance_updates,
    nginx_version,
    prepare,
    run_nginx,
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
    with httpx.Client(base_url=proxy.url, headers=AUTH) as client:
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
        with httpx.Client(base_url=proxy.url, headers=AUTH) as client:
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
        with httpx.Client(base_url=proxy.url, headers=AUTH) as client:
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
    5000 succeed and 5000 are refused, the balance ends at 0, and every instance took part."""
    raise_fd_limit()
    proxy = nginx([address(s) for s in instances])

    before = [balance_updates(s.url) for s in instances]
    report = await withdraw_burst(proxy.url, requests=10_000, amount=2, api_key=API_KEY)
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
    forged = http_get(f"{proxy.url}/balance/1", headers={"Host": "evil.example"})
    assert forged.status_code == 421
    assert forged.json()["error"]["code"] == "unknown_host"
    assert "x-instance-id" not in forged.headers, "it reached a replica"
    assert http_get(f"{proxy.url}/balance/1").status_code == 200


def test_state_changing_requests_are_rate_limited_per_client(
    nginx: Callable[..., Nginx], instances: list[Server]
) -> None:
    """The shipped limit, scaled down (1 per second, burst 5) so a test can reach it: past it
    a POST gets 429 in the JSON envelope from nginx itself; reads are not limited."""
    slow = {"rate=1000r/s": "rate=1r/s", "burst=10000 nodelay": "burst=5 nodelay"}
    proxy = nginx([address(s) for s in instances], swaps=slow)
    statuses = []
    with httpx.Client(base_url=proxy.url, headers=AUTH) as client:
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
    host, port = proxy.url.removeprefix("http://").split(":")

    def raw(data: bytes) -> tuple[int, dict[str, Any]]:
        with socket.create_connection((host, int(port)), timeout=10) as sock:
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
    the login and a cookie's POST work through the edge, a foreign Origin still does not."""
    proxy = nginx([address(s) for s in instances])
    with httpx.Client(base_url=proxy.url) as browser:
        login = browser.post("/login", data={"key": API_KEY}, headers={"Origin": proxy.url})
        assert login.status_code == 303, login.text
        session = login.headers["set-cookie"].partition("tandem_session=")[2].partition(";")[0]
        assert session.startswith("tds_")
        cookie = {"Cookie": f"tandem_session={session}"}
        created = browser.post("/users", json={}, headers={**cookie, "Origin": proxy.url})
        assert created.status_code == 201, created.text
        foreign = browser.post("/users", json={}, headers={**cookie, "Origin": "http://evil"})
        assert foreign.status_code == 403
