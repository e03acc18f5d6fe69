"""How close does the HTTP service come to what PostgreSQL alone can do for the same work?

    python bench/wallet.py [--runs 3] [--database-url URL]

The work: 10000 withdrawals of 2 from one user holding 10000, so 5000 succeed and 5000 are
refused, every one of them serialised on the same row lock.

- floor: ``pgbench`` runs the service's own conditional UPDATE (``APPLY_DELTA``) 10000 times
  over as many connections as the service's pool, prepared, with no HTTP at all. Its wall time
  is measured here around the pgbench process (so it includes pgbench's start and its
  connections, as the burst includes its TCP connections); pgbench's own tps is shown too.
- burst: ``tandem serve`` in a subprocess takes 10000 withdrawals sent at once, one connection
  each, from this process (``withdraw_burst``); wall time from the first connect to the last
  response, and the outcome must be exactly 5000/5000/0.
- ratio = burst / floor: what HTTP, Python and the event loop cost on top of the database.
- the same burst against a server with TANDEM_WALLET_FAST_PATH=false (the FastAPI routes).
- reads: 20000 GET /balance/{id} over 200 keep-alive connections.

Everything (PostgreSQL, pgbench, both servers, this client) shares one machine, as it would on
a developer's laptop; the figures are for comparing changes on the same box, not absolutes.
Each server first gets a warm-up burst that is not counted. With ``--runs N`` the floor and the
two bursts run N times back to back, interleaved, and the table shows each run and the median.
Prints figures; exits 1 only when a burst's outcome was wrong or something failed to run.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import asyncpg
from rich.console import Console
from rich.table import Table
from sqlalchemy.engine import make_url

from tandem.cli import raise_fd_limit
from tandem.core.database import asyncpg_dsn
from tandem.core.embedded import pgbench_path, start_embedded_postgres
from tandem.core.migrations import upgrade_to_head
from tandem.core.settings import Settings
from tandem.loadtest import BurstReport, withdraw_burst
from tandem.loadtest.client import Result, build_request, fetch, run, send_keepalive
from tandem.wallet.repository import APPLY_DELTA

AMOUNT = 2
WARMUP_REQUESTS = 1000
READY_TIMEOUT = 60.0

console = Console()


# --- PostgreSQL ------------------------------------------------------------------------------


def with_database(url: str, name: str) -> str:
    return make_url(url).set(database=name).render_as_string(hide_password=False)


async def _execute(url: str, statement: str, *args: object) -> object:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return await conn.fetchval(statement, *args)
    finally:
        await conn.close()


def sql(url: str, statement: str, *args: object) -> object:
    """One statement on its own connection; the first column of the first row."""
    return run(_execute(url, statement, *args))


@contextmanager
def bench_database(server_url: str) -> Iterator[str]:
    """A new database on the server, migrated to head; dropped afterwards."""
    name = f"tandem_bench_{uuid.uuid4().hex[:12]}"
    admin_url = with_database(server_url, "postgres")
    sql(admin_url, f'CREATE DATABASE "{name}"')
    try:
        url = with_database(server_url, name)
        upgrade_to_head(url)
        yield url
    finally:
        sql(admin_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def create_user(url: str, balance: int) -> int:
    return int(str(sql(url, "INSERT INTO users (balance) VALUES ($1) RETURNING id", balance)))


def read_balance(url: str, user_id: int) -> int:
    return int(str(sql(url, "SELECT balance FROM users WHERE id = $1", user_id)))


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    wall_time: float  # measured here, around the process
    tps: float  # pgbench's own figure, without its connection time
    final_balance_ok: bool


def pgbench_script(path: Path) -> Path:
    """The service's statement, with pgbench's variable for the user and the amount inlined."""
    statement = APPLY_DELTA.replace("$1", ":uid").replace("$2", f"-{AMOUNT}").strip()
    path.write_text(statement + ";\n")
    return path


def run_pgbench(url: str, script: Path, transactions: int, clients: int) -> PgbenchResult:
    balance = transactions  # half the withdrawals succeed, as in the burst
    user_id = create_user(url, balance)
    command = [
        str(pgbench_path()),
        "-n",  # no vacuum of pgbench's own tables (there are none)
        "-M",
        "prepared",
        "-c",
        str(clients),
        "-t",
        str(transactions // clients),
        "-D",
        f"uid={user_id}",
        "-f",
        str(script),
        # libpq reads a URL, ?host=/socket/dir included, as the database name argument.
        asyncpg_dsn(url),
    ]
    started = time.perf_counter()
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wall_time = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(f"pgbench failed: {completed.stderr or completed.stdout}")
    match = re.search(r"^tps = ([\d.]+)", completed.stdout, re.MULTILINE)
    done = (transactions // clients) * clients
    expected = balance - min(done, balance // AMOUNT) * AMOUNT
    return PgbenchResult(
        wall_time=wall_time,
        tps=float(match.group(1)) if match else float("nan"),
        final_balance_ok=read_balance(url, user_id) == expected,
    )


# --- servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class ServerProcess:
    """``tandem serve`` in a subprocess of its own session (Ctrl-C reaches only this script,
    which then stops the server in order)."""

    def __init__(self, database_url: str, *, fast_path: bool, log_dir: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.label = "fast path" if fast_path else "FastAPI path"
        self.log_path = log_dir / f"serve-{self.port}.log"
        env = {
            **os.environ,
            "TANDEM_DATABASE_URL": database_url,
            "TANDEM_WALLET_FAST_PATH": "true" if fast_path else "false",
            "TANDEM_LOG_LEVEL": "warning",
        }
        command = [sys.executable, "-m", "tandem", "serve", "--host", "127.0.0.1"]
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [*command, "--port", str(self.port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def wait_ready(self) -> None:
        request = build_request("GET", "/health/ready", f"127.0.0.1:{self.port}")
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.label} server exited:\n{self.log_tail()}")
            if run(fetch("127.0.0.1", self.port, request, 2.0)).status == 200:
                return
            time.sleep(0.1)
        raise RuntimeError(
            f"{self.label} server not ready in {READY_TIMEOUT} s:\n{self.log_tail()}"
        )

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # uvicorn shuts down gracefully on SIGTERM
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def log_tail(self, lines: int = 30) -> str:
        text = self.log_path.read_text(errors="replace").splitlines()
        return "\n".join(text[-lines:])


# --- measurements ----------------------------------------------------------------------------


def burst(server: ServerProcess, requests: int) -> BurstReport:
    return run(
        withdraw_burst(server.base_url, requests=requests, amount=AMOUNT, initial_balance=requests)
    )


@dataclass(frozen=True, slots=True)
class ReadResult:
    requests: int
    wall_time: float
    errors: int
    p50: float
    p99: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.wall_time


def _quantile(ordered: Sequence[float], q: float) -> float:
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))]


def read_throughput(
    server: ServerProcess, user_id: int, total: int, connections: int
) -> ReadResult:
    request = build_request(
        "GET", f"/balance/{user_id}", f"127.0.0.1:{server.port}", keep_alive=True
    )
    started = time.perf_counter()
    results: list[Result] = run(
        send_keepalive("127.0.0.1", server.port, request, total, connections)
    )
    wall_time = time.perf_counter() - started
    latencies = sorted(result.latency for result in results)
    return ReadResult(
        requests=total,
        wall_time=wall_time,
        errors=sum(1 for result in results if result.status != 200),
        p50=_quantile(latencies, 0.5),
        p99=_quantile(latencies, 0.99),
    )


# --- the run ---------------------------------------------------------------------------------


def postgres_description(url: str) -> str:
    version = sql(url, "SELECT current_setting('server_version')")
    fsync = sql(url, "SELECT current_setting('fsync')")
    sync_commit = sql(url, "SELECT current_setting('synchronous_commit')")
    return f"PostgreSQL {version}, fsync={fsync}, synchronous_commit={sync_commit}"


def check(report: BurstReport, label: str, failures: list[str]) -> None:
    if not report.passed:
        failures.extend(f"{label}: {problem}" for problem in report.problems())


def seconds(values: Sequence[float]) -> list[str]:
    return [f"{value:.2f} s" for value in values]


def ratios(values: Sequence[float]) -> list[str]:
    return [f"{value:.2f}" for value in values]


def run_bench(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> int:
    server_url = args.database_url or os.environ.get("TANDEM_DATABASE_URL")
    if server_url:
        where = "given server"
    else:
        console.print("starting an embedded PostgreSQL ...")
        server_url = start_embedded_postgres(workdir, cleanup="delete")
        where = "embedded"
    url = stack.enter_context(bench_database(server_url))
    pool_size = Settings().db_pool_size
    console.print(
        f"{postgres_description(url)} ({where}); {os.cpu_count()} CPUs; "
        f"service pool {pool_size} connections",
        soft_wrap=True,
    )

    servers: list[ServerProcess] = []
    for fast_path in (True, False):
        servers.append(ServerProcess(url, fast_path=fast_path, log_dir=workdir))
        stack.callback(servers[-1].stop)
    for server in servers:
        server.wait_ready()
    fast, slow = servers
    console.print(f"servers ready; warm-up: {WARMUP_REQUESTS} withdrawals each (not counted)")
    for server in servers:
        burst(server, WARMUP_REQUESTS)

    script = pgbench_script(workdir / "apply_delta.sql")
    floors: list[PgbenchResult] = []
    fast_bursts: list[BurstReport] = []
    slow_bursts: list[BurstReport] = []
    failures: list[str] = []
    for index in range(args.runs):
        floors.append(run_pgbench(url, script, args.requests, pool_size))
        if not floors[-1].final_balance_ok:
            failures.append(f"run {index + 1}: pgbench left an unexpected balance")
        time.sleep(1)  # let the previous step's sockets and backends wind down
        fast_bursts.append(burst(fast, args.requests))
        check(fast_bursts[-1], f"run {index + 1} fast path", failures)
        time.sleep(1)
        slow_bursts.append(burst(slow, args.requests))
        check(slow_bursts[-1], f"run {index + 1} FastAPI path", failures)
        console.print(
            f"run {index + 1}/{args.runs}: pgbench {floors[-1].wall_time:.2f} s, "
            f"fast path {fast_bursts[-1].wall_time:.2f} s, "
            f"FastAPI path {slow_bursts[-1].wall_time:.2f} s"
        )
        time.sleep(1)

    read_user = create_user(url, 1)
    reads = [
        read_throughput(server, read_user, args.read_requests, args.read_connections)
        for server in servers
    ]

    floor_times = [result.wall_time for result in floors]
    fast_times = [report.wall_time for report in fast_bursts]
    slow_times = [report.wall_time for report in slow_bursts]
    median: Callable[[Sequence[float]], float] = statistics.median

    table = Table(title=f"Wallet: {args.requests} withdrawals of {AMOUNT} from {args.requests}")
    table.add_column("")
    for index in range(args.runs):
        table.add_column(f"run {index + 1}", justify="right")
    table.add_column("median", justify="right", style="bold")
    # Ratios are taken within each run (its steps ran back to back, so a slow spell of a shared
    # box weighs on both sides), and their median is the figure quoted.
    ratio = _divide(fast_times, floor_times)
    gain = _divide(slow_times, fast_times)
    rows: list[tuple[str, list[float], Callable[[Sequence[float]], list[str]]]] = [
        (f"(b) pgbench floor (-c {pool_size}, prepared)", floor_times, seconds),
        ("    pgbench's own tps", [result.tps for result in floors], _tps),
        ("(c) burst, fast path", fast_times, seconds),
        ("(d) ratio c/b", ratio, ratios),
        ("(f) burst, FastAPI path", slow_times, seconds),
        ("    ratio f/c (fast path gain)", gain, ratios),
        ("    burst p99 latency, fast path", _p99(fast_bursts), seconds),
        ("    burst p99 latency, FastAPI path", _p99(slow_bursts), seconds),
    ]
    for label, values, render in rows:
        table.add_row(label, *render(values), *render([median(values)]))
    console.print(table)

    reads_table = Table(
        title=f"(e) GET /balance/{{id}}: {args.read_requests} over "
        f"{args.read_connections} keep-alive connections"
    )
    for column in ("server", "requests/s", "p50", "p99", "errors"):
        reads_table.add_column(column, justify="right" if column != "server" else "left")
    for server, result in zip(servers, reads, strict=True):
        reads_table.add_row(
            server.label,
            f"{result.requests_per_second:,.0f}",
            f"{result.p50 * 1000:.1f} ms",
            f"{result.p99 * 1000:.1f} ms",
            str(result.errors),
        )
    console.print(reads_table)

    console.print(f"ratio: {median(ratio):.2f}")
    console.print(f"fast path gain (FastAPI path / fast path): {median(gain):.2f}")
    console.print(f"reads: {reads[0].requests_per_second:,.0f} requests/s")
    for failure in failures:
        console.print(f"WRONG OUTCOME: {failure}", style="bold red")
    return 1 if failures else 0


def _tps(values: Sequence[float]) -> list[str]:
    return [f"{value:,.0f}" for value in values]


def _divide(top: Sequence[float], bottom: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(top, bottom, strict=True)]


def _p99(reports: Sequence[BurstReport]) -> list[float]:
    return [report.latency_quantile(0.99) for report in reports]


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1, help="repeat floor and bursts N times")
    parser.add_argument(
        "--database-url",
        default=None,
        help="a PostgreSQL server to use (default: TANDEM_DATABASE_URL, else embedded)",
    )
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--read-requests", type=int, default=20_000)
    parser.add_argument("--read-connections", type=int, default=200)
    args = parser.parse_args(argv)
    if args.runs < 1 or args.requests < 1:
        parser.error("--runs and --requests must be positive")

    raise_fd_limit()
    # SIGTERM unwinds like Ctrl-C, so the servers and the database are stopped either way.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    workdir = Path(tempfile.mkdtemp(prefix="tandem-bench-"))
    # Registered before the embedded server's own exit handler, so it runs after it.
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    try:
        with ExitStack() as stack:
            return run_bench(args, workdir, stack)
    except KeyboardInterrupt:
        console.print("interrupted; everything started was stopped")
        return 130


if __name__ == "__main__":
    sys.exit(main())
