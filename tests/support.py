"""Real PostgreSQL databases and real server processes for the tests.

The suite uses TANDEM_TEST_DATABASE_URL when set; otherwise it starts an embedded PostgreSQL in
a temporary folder and deletes it at the end. Each test module that needs isolation gets a
fresh database, migrated to head, and dropped afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import asyncpg
import httpx
import pytest
from sqlalchemy.engine import make_url

from tandem.access.keys import new_token
from tandem.core.database import asyncpg_dsn
from tandem.core.migrations import upgrade_to_head

REPO = Path(__file__).resolve().parent.parent

# The suite's API key (scope all). conftest.py puts it in the environment, so every server
# the suite starts, in process or not, registers it at start; every test request sends it
# (the refusals of other keys, and of none, are tests/access/'s).
API_KEY = new_token()
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _authed(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, "headers": {**AUTH, **(kwargs.get("headers") or {})}}


def http_get(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.get`` with the suite's key."""
    return httpx.get(url, **_authed(kwargs))


def http_post(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.post`` with the suite's key."""
    return httpx.post(url, **_authed(kwargs))


@contextmanager
def signed_in(url: str) -> Iterator[str]:
    """A local proxy to ``url`` that adds the suite's key to every request: a browser that is
    signed in, for Chromium, which cannot be given a header (the login and its cookie are
    tests/access/test_browser.py's). Yields the proxy's URL."""
    import threading

    import uvicorn

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.request(
                scope["method"],
                scope["path"]
                + ("?" + scope["query_string"].decode() if scope["query_string"] else ""),
                headers=[*headers, *AUTH.items()],
                content=body,
            )
        drop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [
                    (k.encode(), v.encode()) for k, v in answer.headers.items() if k not in drop
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def http_request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.request`` with the suite's key."""
    return httpx.request(method, url, **_authed(kwargs))


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


def _admin(url: str, statement: str) -> None:
    async def run() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(with_database(url, "postgres")))
        try:
            await conn.execute(statement)
        finally:
            await conn.close()

    asyncio.run(run())


@contextmanager
def empty_database(server_url: str) -> Iterator[str]:
    """A new, empty database on the server; dropped (with its connections) afterwards."""
    name = f"tandem_test_{uuid.uuid4().hex[:12]}"
    _admin(server_url, f'CREATE DATABASE "{name}"')
    try:
        yield with_database(server_url, name)
    finally:
        _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(server_url: str) -> Iterator[str]:
    """A new database migrated to head; dropped afterwards."""
    with empty_database(server_url) as url:
        upgrade_to_head(url)
        yield url


async def fetch(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """One statement on a connection of its own."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


def query(url: str, sql: str, *args: object) -> list[asyncpg.Record]:
    """``fetch`` from synchronous test code."""
    return asyncio.run(fetch(url, sql, *args))


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.1) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"condition not met within {timeout} s")


async def eventually(predicate: Callable[[], object], within: float) -> None:
    """``wait_for`` for async tests: poll without blocking the event loop."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110  (state changes announce nothing to wait on)
            await asyncio.sleep(0.02)


# The cluster cron's timings for the tests: compressed, but with room for five Python
# processes and PostgreSQL on two shared cores: a heartbeat can be late by a second without a
# run being self-fenced.
POLL, LEASE = 0.2, 3.0
CRON_TIMINGS = {
    "TANDEM_SCHEDULER_ENABLED": "true",
    "TANDEM_MAINTENANCE_ENABLED": "false",
    "TANDEM_SCHEDULER_POLL_INTERVAL": str(POLL),
    "TANDEM_SCHEDULER_HEARTBEAT_INTERVAL": "0.5",
    "TANDEM_SCHEDULER_LEASE": str(LEASE),
    "TANDEM_SCHEDULER_SELF_FENCE_AFTER": "2.0",
    "TANDEM_SCHEDULER_STEAL_AFTER": "1.0",
    # Forty tasks due every two seconds need more than one claim per poll.
    "TANDEM_SCHEDULER_CLAIMS_PER_POLL": "50",
    "TANDEM_LOG_LEVEL": "warning",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def free_port_block(count: int) -> int:
    """A port p such that p .. p + count - 1 are all free now (for `tandem cluster`, which
    uses the entry port and the ones after it)."""
    for _ in range(100):
        first = free_port()
        sockets = []
        try:
            for port in range(first, first + count):
                sock = socket.socket()
                sockets.append(sock)
                sock.bind(("127.0.0.1", port))
            return first
        except OSError:
            continue
        finally:
            for sock in sockets:
                sock.close()
    raise RuntimeError(f"no {count} free ports in a row")


@dataclass
class Server:
    """A real `tandem serve` process."""

    url: str
    port: int
    process: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.reap(timeout)

    def reap(self, timeout: float = 15.0) -> int:
        """Its exit code once it has ended; killed if that takes over ``timeout`` seconds."""
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        return self.process.returncode

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_server(
    database_url: str,
    log_dir: Path,
    *,
    extra_env: dict[str, str] | None = None,
) -> Server:
    (server,) = start_servers(database_url, log_dir, 1, extra_env=extra_env)
    return server


def start_servers(
    database_url: str,
    log_dir: Path,
    count: int,
    *,
    extra_env: dict[str, str] | None = None,
) -> list[Server]:
    """``count`` `tandem serve` processes, started at once (their start-ups overlap), then
    each waited for until live; all killed if one does not come up."""
    env = {
        **os.environ,
        "TANDEM_DATABASE_URL": database_url,
        "TANDEM_LOG_LEVEL": "warning",
        # Off unless a test asks for it: the wallet's tests should not share the CPU with it.
        "TANDEM_SCHEDULER_ENABLED": "false",
        # Housekeeping tasks would join every scheduler test's task set: on when asked for.
        "TANDEM_MAINTENANCE_ENABLED": "false",
        **(extra_env or {}),
    }
    servers: list[Server] = []
    try:
        ports: set[int] = set()
        while len(ports) < count:  # none is bound yet: the kernel may offer one twice
            ports.add(free_port())
        for port in sorted(ports):
            log_path = log_dir / f"server-{port}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "tandem", "serve", "--port", str(port), "--no-migrate"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=REPO,
                )
            servers.append(Server(f"http://127.0.0.1:{port}", port, process, log_path))
        for server in servers:
            wait_live(server.url, 30, lambda s=server: s.process.poll() is not None, server.log)
    except BaseException:
        for server in servers:
            server.stop(signal.SIGKILL)
        raise
    return servers


def wait_live(
    url: str,
    timeout: float,
    exited: Callable[[], bool],
    log: Callable[[], str],
    step: float = 0.1,
) -> None:
    """Until ``url``/health/live answers 200 (live, not ready: a test may start an instance
    on an unmigrated database); RuntimeError with the server's ``log()`` once it has
    ``exited()``, or after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if exited():
            raise RuntimeError(f"server exited early:\n{log()}")
        try:
            if httpx.get(f"{url}/health/live", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(step)
    raise RuntimeError(f"server at {url} not live in {timeout:g} s:\n{log()}")


# How to get a tool on Debian or Ubuntu, for the skip message (`.ci/run` installs them all).
INSTALL_HINTS = {
    "promtool": "apt-get install prometheus",
    "prometheus": "apt-get install prometheus",
    "amtool": "apt-get install prometheus-alertmanager",
    "prometheus-alertmanager": "apt-get install prometheus-alertmanager",
    "nginx": "apt-get install nginx-light",
    "docker-compose": "apt-get install docker-compose",
    "chromium": "apt-get install chromium",
    "faketime": "apt-get install faketime",
    "pgbouncer": "apt-get install pgbouncer",
    "podman": "apt-get install podman runc",
    "debootstrap": "apt-get install debootstrap",
}


def require_tool(name: str) -> str:
    """The path of a command-line tool. Missing, the test is skipped, except on CI (the CI
    variable set to anything but "", "0" or "false"), which installs the tools: there a
    missing tool must fail the run instead of passing it quietly."""
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin")
    if path is not None:
        return path
    message = f"`{name}` is not on PATH"
    if name in INSTALL_HINTS:
        message += f" (Debian/Ubuntu: {INSTALL_HINTS[name]})"
    return cannot_run(message)


def cannot_run(message: str) -> NoReturn:
    """Skip the test for ``message``, or fail it when CI is set (CI prepares what the checks
    need: there a check that cannot run must not pass quietly)."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false"):
        pytest.fail(f"{message}; CI is set, so the check must run", pytrace=False)
    pytest.skip(message)


def faketime_library() -> str:
    """libfaketime, which shifts a process's wall clock (Debian's faketime package)."""
    require_tool("faketime")
    found = sorted(Path("/usr/lib").glob("*/faketime/libfaketime.so.1"))
    found += sorted(Path("/usr/lib/faketime").glob("libfaketime.so.1"))
    assert found, "the faketime command is installed but not libfaketime.so.1"
    return str(found[0])


class FakeClock:
    """A wall clock for the processes given ``env``: libfaketime reads an offset from the
    real clock from a file at every clock call (no cache), so the test moves the clock of
    running processes (all of them at once: an offset, not a start time). The monotonic
    clock stays real."""

    def __init__(self) -> None:
        self._dir = Path(tempfile.mkdtemp(prefix="tandem-clock-"))
        self._dir.chmod(0o755)  # a server running as another user reads the file
        self.path = self._dir / "offset"
        self.env = {
            "LD_PRELOAD": faketime_library(),
            "FAKETIME_TIMESTAMP_FILE": str(self.path),
            "FAKETIME_NO_CACHE": "1",
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
        }
        self.set(datetime.now(UTC))

    def set(self, instant: datetime) -> None:
        """From now on the faked clock reads ``instant`` (to the second), and runs on."""
        staged = self.path.with_suffix(".new")
        staged.write_text(f"{round(instant.timestamp() - time.time()):+d}\n")
        staged.chmod(0o644)
        staged.replace(self.path)  # atomically: a reader never sees an empty file

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)
