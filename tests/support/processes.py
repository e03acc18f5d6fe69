"""Real processes for the tests: `tandem serve` instances, the `tandem` command, tools found
on PATH (skipped when missing, failed under CI), a faked wall clock; and the guard that keeps
the fast tier from starting any of them.

Starting a process makes a test ``slow``: tests/conftest.py marks every test whose code or
fixtures reach one of these helpers (or ``subprocess`` itself), and under
``TANDEM_TEST_NO_PROCESSES=1`` (``make test-fast``) any process a test starts anyway is an
error, so a test the marking missed cannot slip into the fast tier.
"""

from __future__ import annotations

import fcntl
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import NoReturn

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


# Ports for the servers the tests start are taken below the kernel's range of ephemeral ports,
# the ones it gives outgoing connections: a port from that range, found free and then handed to
# a server, could be taken in between by any connection the machine opens (the bursts open
# 10000 at once), and the server's bind failed with "Address already in use" (`tandem cluster`
# binding its fourth port while the other worker's burst ran). Below the range only a listener
# can take it, and each pick is random, so two workers rarely try the same one.
_PICK = random.SystemRandom()  # not the random module's state, which a test may have seeded
_LOWEST_PORT = 20_000


def _ephemeral_ports() -> tuple[int, int]:
    try:
        low, high = (int(n) for n in Path(EPHEMERAL_RANGE).read_text().split())
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default
    return low, high


EPHEMERAL_RANGE = "/proc/sys/net/ipv4/ip_local_port_range"


@contextmanager
def machine_lock(name: str) -> Iterator[None]:
    """An exclusive lock held by one process of this machine at a time (flock on a file in the
    temporary folder; released when the holder exits, however it exits)."""
    with (Path(tempfile.gettempdir()) / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def free_port() -> int:
    """A port free now, outside the ephemeral range (see above)."""
    return free_port_block(1)


def free_port_block(count: int) -> int:
    """A port p such that p .. p + count - 1 are all free now, outside the ephemeral range
    (for `tandem cluster`, which uses the entry port and the ones after it)."""
    low, _ = _ephemeral_ports()
    for _ in range(200):
        # Below 20000 only when the ephemeral range leaves too little room above it.
        bottom = _LOWEST_PORT if low - count > _LOWEST_PORT + 1000 else 1024
        first = _PICK.randrange(bottom, max(low - count, bottom + 1))
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


def run_tandem(
    *args: str, database_url: str | None = None, timeout: float = 60, **env: str
) -> subprocess.CompletedProcess[str]:
    """The `tandem` command run to its end (``python -m tandem``, as installed), its output
    captured; ``database_url`` becomes TANDEM_DATABASE_URL."""
    extra = {"TANDEM_DATABASE_URL": database_url} if database_url is not None else {}
    return subprocess.run(
        [sys.executable, "-m", "tandem", *args],
        env={**os.environ, **extra, **env},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        check=False,
    )


# --- the fast tier's guard ---------------------------------------------------------------------

# Set by `make test-fast`: a test that starts a process is then an error, not a slow pass.
NO_PROCESSES_ENV = "TANDEM_TEST_NO_PROCESSES"
# The audit events of every way Python starts a process (subprocess and asyncio's subprocesses
# go through "subprocess.Popen").
SPAWN_EVENTS = frozenset(
    {"subprocess.Popen", "os.fork", "os.forkpty", "os.posix_spawn", "os.spawn", "os.system"}
)


class ProcessForbiddenError(RuntimeError):
    """A test of the fast tier started a process."""


class _Guard:
    forbidden_in: str | None = None  # the test being run, while processes are forbidden
    allowed: int = 0  # depth of allow_processes()
    installed: bool = False


def _audit(event: str, args: tuple[object, ...]) -> None:
    if event in SPAWN_EVENTS and _Guard.forbidden_in is not None and not _Guard.allowed:
        raise ProcessForbiddenError(
            f"{_Guard.forbidden_in} started a process ({event} {args[:2]!r}) with "
            f"{NO_PROCESSES_ENV}=1: the fast tier starts none. If it must, the test is slow: "
            "make it reach the process through a helper of tests/support (or subprocess), "
            "which tests/conftest.py recognises and marks"
        )


def install_process_guard() -> None:
    """Refuse, from now on, processes started inside ``forbid_processes`` (an audit hook:
    it sees every spawn, whoever makes it, and cannot be bypassed by an import)."""
    if not _Guard.installed:
        sys.addaudithook(_audit)
        _Guard.installed = True


@contextmanager
def forbid_processes(test: str) -> Iterator[None]:
    """While ``test`` runs (its fixtures included), no process may start: see
    ``install_process_guard``."""
    _Guard.forbidden_in = test
    try:
        yield
    finally:
        _Guard.forbidden_in = None


@contextmanager
def allow_processes() -> Iterator[None]:
    """The one exception: the session's shared PostgreSQL, started (and stopped) once."""
    _Guard.allowed += 1
    try:
        yield
    finally:
        _Guard.allowed -= 1
