"""What the benchmarks in bench/ share: a PostgreSQL server and a fresh database on it, ``tandem
serve`` processes, a withdrawal burst with its check, CPU readings and the small formatting
helpers of their tables.

The benchmarks are scripts (``python bench/wallet.py``), so Python puts bench/ first on
``sys.path`` and they import this module as ``common``; bench/ is not a package, on purpose:
nothing outside it imports from here. What the tests have too (databases, queries, free
ports, nginx's config) is the tests' own helpers (tests/support), imported from here: this
module puts the repository's root on ``sys.path`` for that.
"""

from __future__ import annotations

import argparse
import atexit
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from types import FrameType
from typing import TypeVar

from rich.console import Console

from tandem.core.embedded import start_embedded_postgres
from tandem.loadtest import BurstReport, LoadtestError, withdraw_burst
from tandem.loadtest.client import auth_headers, build_request, fetch, run

sys.path.insert(1, str(Path(__file__).resolve().parent.parent))
from tests.support.api import API_KEY
from tests.support.database import fresh_database, query, value, with_database
from tests.support.processes import free_port

__all__ = ["free_port", "query", "value", "with_database"]  # the tests' own, for the benches

# Each withdrawal of a burst takes this much; the user starts with as many units as there are
# requests, so exactly half of them succeed.
AMOUNT = 2
READY_TIMEOUT = 60.0
# Every server a bench starts registers this key (scope all) at start, and every request of
# the bench sends it (TANDEM_AUTH_DISABLED servers ignore it). It is the tests' key, in the
# environment as the tests put it: the servers the tests' harnesses start for a bench (the
# cron's fault trials) inherit it.
BENCH_KEY = API_KEY
os.environ["TANDEM_API_KEY"] = BENCH_KEY
AUTH = auth_headers(BENCH_KEY)
STOP_TIMEOUT = 20.0

console = Console()


# --- PostgreSQL ------------------------------------------------------------------------------


@contextmanager
def bench_database(server_url: str, purpose: str) -> Iterator[str]:
    """A new database on the server, migrated to head; dropped (with its connections) after."""
    with fresh_database(server_url, prefix=f"tandem_bench_{purpose}") as url:
        yield url


def add_database_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server to use (default: TANDEM_DATABASE_URL, else embedded)",
    )


def positive_int(text: str) -> int:
    number = int(text)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be positive, not {number}")
    return number


def add_burst_arguments(parser: argparse.ArgumentParser, *, runs: int, runs_help: str) -> None:
    """--runs, --database-url and --requests: the options of a bench built on bursts."""
    parser.add_argument("--runs", type=positive_int, default=runs, help=runs_help)
    add_database_argument(parser)
    parser.add_argument("--requests", type=positive_int, default=10_000)


def postgres_server(database_url: str | None, workdir: Path) -> tuple[str, str]:
    """The server's URL and where it came from: ``database_url``, else TANDEM_DATABASE_URL,
    else an embedded server started under ``workdir`` and deleted at exit."""
    server_url = database_url or os.environ.get("TANDEM_DATABASE_URL")
    if server_url:
        return server_url, "given server"
    console.print("starting an embedded PostgreSQL ...")
    return start_embedded_postgres(workdir, cleanup="delete"), "embedded"


def postgres_description(url: str) -> str:
    version = value(url, "SELECT current_setting('server_version')")
    fsync = value(url, "SELECT current_setting('fsync')")
    sync_commit = value(url, "SELECT current_setting('synchronous_commit')")
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit}"


# --- servers ---------------------------------------------------------------------------------


_log_serial = itertools.count(1)


class ServeProcess:
    """``tandem serve`` in a subprocess of its own session (Ctrl-C reaches only the bench,
    which then stops it in order), its output in a log file under ``log_dir``.

    With ``reuse_port`` several processes share ``port`` (the kernel spreads connections over
    them); ``direct_port`` reaches this one alone, and is where it is checked and read.
    """

    def __init__(
        self,
        database_url: str,
        log_dir: Path,
        *,
        label: str = "server",
        env: Mapping[str, str] | None = None,
        port: int | None = None,
        reuse_port: bool = False,
        direct_port: int | None = None,
        migrate: bool = True,
        cwd: Path | None = None,
        command: Sequence[str] | None = None,
    ) -> None:
        self.port = free_port() if port is None else port
        self.direct_port = direct_port
        self.own_port = self.port if direct_port is None else direct_port
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.own_url = f"http://127.0.0.1:{self.own_port}"
        self.label = label
        self.killed = False
        self.log_path = log_dir / f"serve-{next(_log_serial)}-{self.own_port}.log"
        full_env = {
            **os.environ,
            "TANDEM_DATABASE_URL": database_url,
            "TANDEM_LOG_LEVEL": "warning",
            "TANDEM_API_KEY": BENCH_KEY,
            **(env or {}),
        }
        # ``command``: another server in Tandem's place (it is given --port).
        argv = [*(command or [sys.executable, "-m", "tandem", "serve", "--host", "127.0.0.1"])]
        argv += ["--port", str(self.port)]
        if reuse_port:
            argv.append("--reuse-port")
        if direct_port is not None:
            argv += ["--direct-port", str(direct_port)]
        if not migrate:
            argv.append("--no-migrate")
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                argv,
                env=full_env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=cwd,
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process.poll() is None

    def wait_ready(self, deadline: float, path: str = "/health/live") -> None:
        """Until ``path`` answers 200 on this process's own port; RuntimeError if it exits
        or ``deadline`` (of ``time.monotonic``) passes first."""
        request = build_request("GET", path, f"127.0.0.1:{self.own_port}")
        while time.monotonic() < deadline:
            if not self.alive:
                raise RuntimeError(f"{self.label} (pid {self.pid}) exited:\n{self.log_tail()}")
            if run(fetch("127.0.0.1", self.own_port, request, 2.0)).status == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(f"{self.label} (pid {self.pid}) not ready in time:\n{self.log_tail()}")

    def get(self, path: str) -> bytes:
        """The body of a GET on this process's own port; RuntimeError unless it answers 200."""
        request = build_request("GET", path, f"127.0.0.1:{self.own_port}")
        result = run(fetch("127.0.0.1", self.own_port, request, 10.0))
        if result.status != 200:
            raise RuntimeError(f"{self.label}: GET {path}: {result.describe()}")
        return result.body

    def stop(self, timeout: float = 15.0) -> None:
        if self.alive:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def kill(self) -> None:
        self.killed = True
        self.process.kill()
        self.process.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])


Serve = TypeVar("Serve", bound=ServeProcess)


def stop_all(servers: Sequence[ServeProcess]) -> None:
    """SIGTERM all at once (each drains its work), then wait; SIGKILL what outlives the wait."""
    for server in servers:
        if server.alive:
            server.process.terminate()
    deadline = time.monotonic() + STOP_TIMEOUT
    for server in servers:
        try:
            server.process.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            server.process.kill()
            server.process.wait()


def start_servers(
    stack: ExitStack,
    count: int,
    start: Callable[[int], Serve],
    ready_path: str = "/health/live",
) -> list[Serve]:
    """``start(0) ... start(count - 1)``, started together and waited for (``ready_path``
    answering on each one's own port); all stopped when ``stack`` closes, also when one of
    them fails to start."""
    servers: list[Serve] = []
    stack.callback(stop_all, servers)
    for index in range(count):
        servers.append(start(index))
    deadline = time.monotonic() + READY_TIMEOUT
    for server in servers:
        server.wait_ready(deadline, ready_path)
    return servers


# --- bursts ----------------------------------------------------------------------------------


def burst(base_url: str, requests: int) -> BurstReport:
    """``requests`` withdrawals of AMOUNT, all at once, from a fresh user holding ``requests``."""
    return run(
        withdraw_burst(
            base_url,
            requests=requests,
            amount=AMOUNT,
            initial_balance=requests,
            api_key=BENCH_KEY,
        )
    )


def check(report: BurstReport, label: str, failures: list[str]) -> None:
    if not report.passed:
        failures.extend(f"{label}: {problem}" for problem in report.problems())
        outcomes = ", ".join(f"{outcome} x{count}" for outcome, count in report.outcomes.items())
        failures.append(f"{label}: outcomes {outcomes}")


# --- CPU -------------------------------------------------------------------------------------


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def machine_cpu_ticks() -> tuple[int, int]:
    """(busy, total) ticks of all CPUs since boot."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    idle = ticks[3] + ticks[4]  # idle + iowait
    return sum(ticks) - idle, sum(ticks)


class CpuMeter:
    """CPU used over a window by some processes, and the share of the machine that was busy."""

    def __init__(self, pids: Sequence[int]) -> None:
        self._started = time.monotonic()
        self._machine = machine_cpu_ticks()
        self._before = {pid: process_cpu_seconds(pid) for pid in pids}

    def stop(self, late_pids: Sequence[int] = ()) -> tuple[float, float, dict[int, float | None]]:
        """(elapsed seconds, machine busy share, CPU seconds by pid). A pid in ``late_pids``
        that was not watched from the start counts from 0 (it started within the window);
        None for a process that was gone before the end or was never seen."""
        elapsed = time.monotonic() - self._started
        busy, total = machine_cpu_ticks()
        used: dict[int, float | None] = {}
        for pid in [*self._before, *late_pids]:
            before = self._before.get(pid, 0.0)
            after = process_cpu_seconds(pid)
            used[pid] = None if before is None or after is None else after - before
        machine = (busy - self._machine[0]) / max(total - self._machine[1], 1)
        return elapsed, machine, used


# --- figures ---------------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def seconds(values: Sequence[float]) -> list[str]:
    return [f"{value:.2f} s" for value in values]


def milliseconds(values: Sequence[float]) -> list[str]:
    return [f"{value * 1000:.0f} ms" for value in values]


def ratios(values: Sequence[float]) -> list[str]:
    return [f"{value:.2f}" for value in values]


def divide(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(top, bottom, strict=True)]


# --- the run ---------------------------------------------------------------------------------


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def run_main(workdir_prefix: str, body: Callable[[Path, ExitStack], int]) -> int:
    """``body(workdir, stack)`` with a scratch folder (removed at exit) and an ExitStack (closed
    when ``body`` ends, however it ends). Ctrl-C and SIGTERM unwind, so what ``body`` started
    (servers, databases) is stopped either way: 130. A RuntimeError or LoadtestError
    (something failed to start or to answer) is printed: 1."""
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix=workdir_prefix))
    # Registered before the embedded server's own exit handler, so it runs after it.
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    try:
        with ExitStack() as stack:
            return body(workdir, stack)
    except KeyboardInterrupt:
        console.print("interrupted; everything started was stopped")
        return 130
    except (RuntimeError, LoadtestError) as error:
        console.print(f"FAILED: {error}", style="bold red")
        return 1
