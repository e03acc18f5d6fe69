"""How close does the HTTP service come to what PostgreSQL alone and HTTP alone can do?

    python bench/wallet.py [--runs 3] [--transfers 5000] [--holds 10000] [--hold-pairs 5000]
                           [--history-entries 1000000] [--lone-requests 2000]
                           [--database-url URL]

The work: 10000 withdrawals of 2 from one user holding 10000, so 5000 succeed and 5000 are
refused, every one of them serialised on the same row lock, and journaled.

- (a) database floor: ``pgbench`` runs the service's own journaled statement (``APPLY_DELTA``:
  the owner function doing the conditional UPDATE and its journal entry in one statement)
  10000 times over as many connections as the service's pool, prepared, with no HTTP at all.
  Its wall time is measured here around the pgbench process (so it includes pgbench's start
  and its connections, as the burst includes its TCP connections); pgbench's own tps is shown
  too.
- (a') batched database floor: ``pgbench`` runs the group commit's statement
  (``APPLY_DELTAS``) with batches of ``TANDEM_WALLET_BATCH_MAX`` withdrawals, as many batches
  as make the same withdrawals, over the same connections: what the database can do on one
  hot row when each commit carries a batch.
- (b) HTTP floor: the same burst, from the same client, against ``bench/http_floor.py``: a
  server on Tandem's stack (uvicorn, uvloop, httptools) whose app only answers a constant.
- (c) burst: ``tandem serve`` in a subprocess takes 10000 withdrawals sent at once, one
  connection each, from this process (``withdraw_burst``); wall time from the first connect
  to the last response, and the outcome must be exactly 5000/5000/0.
- (c') the same burst against the same server with group commit off
  (``TANDEM_WALLET_GROUP_COMMIT=false``: every change its own statement, as before it), and
  the sizes of the batches the burst formed (the server's ``tandem_wallet_batch_size``).
- ratio_floors = c / (a + b): what Tandem costs beyond the two floors it stands on; ratio =
  c / a as before; ratio_http = c / b, the burst against the HTTP floor alone;
  group_commit = c' / c, what group commit gains on the burst.
- reads: 20000 GET /balance/{id} over 200 keep-alive connections.
- lone updates: ``--lone-requests`` withdrawals one after another on one keep-alive
  connection, against both Tandem servers: a request's latency with nothing else in flight.
- (g) keyed burst: ``--keyed`` withdrawals of 2 from one user holding as many, each with an
  Idempotency-Key of its own, all at once (exactly half succeed), against both Tandem
  servers; keyed_group_commit = the one off / the one on.
- transfers: ``--transfers`` between random pairs of 1000 users, 200 in flight (both
  directions at once, so deadlocks would show): transfers/s and the outcomes; then as many
  from random ones of 1000 users into one payee (a fee account: one hot row).
- holds: ``--holds`` holds of 2 on one user holding enough for all of them, sent at once,
  one connection each (every one serialised on that user's row lock, like the burst):
  holds created/s, and every one must be created.
- hold → capture: ``--hold-pairs`` pairs over 1000 users, 200 in flight: a hold of 1..50
  from a random user to another (the payee), then its capture (a transfer to the payee):
  pairs/s, and every hold created and captured.
- history: one user with ``--history-entries`` journal entries; latency of the newest page
  and of a page deep in the middle (limit 100, keep-alive).

Everything (PostgreSQL, pgbench, the servers, this client) shares one machine, as it would on
a developer's laptop; the figures are for comparing changes on the same box, not absolutes.
Each server first gets a warm-up burst that is not counted. With ``--runs N`` the floors and
the bursts run N times back to back, interleaved, and the table shows each run and the median.
Prints figures; exits 1 only when a burst's outcome was wrong or something failed to run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from common import (  # bench/common.py: bench/ is first on sys.path when this runs as a script
    AMOUNT,
    AUTH,
    ServeProcess,
    add_burst_arguments,
    bench_database,
    burst,
    check,
    console,
    divide,
    postgres_description,
    postgres_server,
    quantile,
    query,
    ratios,
    run_main,
    seconds,
    start_servers,
    value,
)
from prometheus_client.parser import text_string_to_metric_families
from rich.table import Table

from tandem.cli import raise_fd_limit
from tandem.core.database import asyncpg_dsn
from tandem.core.embedded import pgbench_path
from tandem.core.settings import Settings
from tandem.loadtest import BurstReport
from tandem.loadtest.client import (
    Result,
    build_request,
    fetch,
    run,
    send_burst,
    send_keepalive,
)
from tandem.wallet.repository import APPLY_DELTA, APPLY_DELTAS
from tests.support.metrics import sample_sum

WARMUP_REQUESTS = 1000
BENCH_DIR = Path(__file__).resolve().parent


# --- PostgreSQL ------------------------------------------------------------------------------


def create_user(url: str, balance: int) -> int:
    return int(value(url, "INSERT INTO users (balance) VALUES ($1) RETURNING id", balance))


def read_balance(url: str, user_id: int) -> int:
    return int(value(url, "SELECT balance FROM users WHERE id = $1", user_id))


@dataclass(frozen=True, slots=True)
class PgbenchResult:
    wall_time: float  # measured here, around the process
    tps: float  # pgbench's own figure, without its connection time
    final_balance_ok: bool


def pgbench_script(path: Path) -> Path:
    """The service's statement, with pgbench's variable for the user and the amount inlined
    (no reference, no idempotency key: as the burst sends them)."""
    statement = APPLY_DELTA.replace("$1", ":uid").replace("$2", f"-{AMOUNT}")
    statement = statement.replace("$3", "NULL::text").replace("$4", "NULL::text")
    statement = statement.replace("$5", "NULL::bigint").strip()
    path.write_text(statement + ";\n")
    return path


def batched_pgbench_script(path: Path, batch: int) -> Path:
    """The group commit's statement with ``batch`` withdrawals of AMOUNT (no references, no
    keys, no API key: as the burst's are sent)."""
    arrays = [f"array_fill(-{AMOUNT}::bigint, ARRAY[{batch}])"] + [
        f"array_fill(NULL::{kind}, ARRAY[{batch}])" for kind in ("text", "text", "bigint")
    ]
    statement = APPLY_DELTAS.replace("$1", ":uid")
    for index, array in enumerate(arrays, start=2):
        statement = statement.replace(f"${index}", array)
    path.write_text(statement.strip() + ";\n")
    return path


def run_pgbench(
    url: str, script: Path, transactions: int, clients: int, per_transaction: int = 1
) -> PgbenchResult:
    """``transactions`` runs of ``script`` over ``clients`` connections, each withdrawing
    AMOUNT ``per_transaction`` times, on a new user holding as much as half of them take."""
    changes = transactions * per_transaction
    balance = changes  # half the withdrawals succeed, as in the burst
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
    done = (transactions // clients) * clients * per_transaction
    expected = balance - min(done, balance // AMOUNT) * AMOUNT
    return PgbenchResult(
        wall_time=wall_time,
        tps=float(match.group(1)) if match else float("nan"),
        final_balance_ok=read_balance(url, user_id) == expected,
    )


# --- measurements ----------------------------------------------------------------------------


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


def lone_updates(server: ServeProcess, user_id: int, total: int) -> ReadResult:
    """``total`` withdrawals of 1, one after another on one keep-alive connection: a lone
    request's latency (nothing else in flight for its user)."""
    body = {"userId": user_id, "amount": -1}
    host = f"127.0.0.1:{server.port}"
    request = build_request("POST", "/balance/update", host, body, keep_alive=True, headers=AUTH)
    return _keepalive(server, request, total, 1)


def read_throughput(server: ServeProcess, user_id: int, total: int, connections: int) -> ReadResult:
    request = build_request(
        "GET", f"/balance/{user_id}", f"127.0.0.1:{server.port}", keep_alive=True, headers=AUTH
    )
    return _keepalive(server, request, total, connections)


def _keepalive(server: ServeProcess, request: bytes, total: int, connections: int) -> ReadResult:
    started = time.perf_counter()
    results: list[Result] = run(
        send_keepalive("127.0.0.1", server.port, request, total, connections)
    )
    wall_time = time.perf_counter() - started
    latencies = [result.latency for result in results]
    return ReadResult(
        requests=total,
        wall_time=wall_time,
        errors=sum(1 for result in results if result.status != 200),
        p50=quantile(latencies, 0.5),
        p99=quantile(latencies, 0.99),
    )


# --- the run ---------------------------------------------------------------------------------


def run_bench(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> int:
    server_url, where = postgres_server(args.database_url, workdir)
    url = stack.enter_context(bench_database(server_url, "wallet"))
    pool_size = Settings().db_pool_size
    batch_max = Settings().wallet_batch_max
    console.print(
        f"{postgres_description(url)} ({where}); {os.cpu_count()} CPUs; "
        f"service pool {pool_size} connections",
        soft_wrap=True,
    )

    def start(index: int) -> ServeProcess:
        if index == 1:
            floor = [sys.executable, str(BENCH_DIR / "http_floor.py")]
            return ServeProcess(url, workdir, label="HTTP floor", command=floor)
        if index == 2:
            # The baseline of group commit: the same server, every change its own statement.
            alone = {"TANDEM_WALLET_GROUP_COMMIT": "false"}
            return ServeProcess(url, workdir, label="Tandem, group commit off", env=alone)
        return ServeProcess(url, workdir, label="Tandem")

    fast, http_floor, unbatched = start_servers(stack, 3, start, ready_path="/health/ready")
    servers = [fast, unbatched]
    console.print(f"servers ready; warm-up: {WARMUP_REQUESTS} withdrawals each (not counted)")
    for server in (fast, http_floor, unbatched):
        burst(server.base_url, WARMUP_REQUESTS)

    script = pgbench_script(workdir / "apply_delta.sql")
    batched_script = batched_pgbench_script(workdir / "apply_deltas.sql", batch_max)
    batches = max(pool_size, args.requests // batch_max)
    floors: list[PgbenchResult] = []
    batched_floors: list[PgbenchResult] = []
    http_floors: list[BurstReport] = []
    fast_bursts: list[BurstReport] = []
    unbatched_bursts: list[BurstReport] = []
    batch_sizes: list[BatchSizes] = []
    failures: list[str] = []
    for index in range(args.runs):
        floors.append(run_pgbench(url, script, args.requests, pool_size))
        if not floors[-1].final_balance_ok:
            failures.append(f"run {index + 1}: pgbench left an unexpected balance")
        time.sleep(1)  # let the previous step's sockets and backends wind down
        batched_floors.append(
            run_pgbench(url, batched_script, batches, pool_size, per_transaction=batch_max)
        )
        if not batched_floors[-1].final_balance_ok:
            failures.append(f"run {index + 1}: batched pgbench left an unexpected balance")
        time.sleep(1)
        http_floors.append(burst(http_floor.base_url, args.requests))
        if http_floors[-1].outcomes != {"200": args.requests}:
            failures.append(f"run {index + 1}: the HTTP floor did not answer every request")
        time.sleep(1)
        before = BatchSizes.read(fast)
        fast_bursts.append(burst(fast.base_url, args.requests))
        batch_sizes.append(BatchSizes.read(fast) - before)
        check(fast_bursts[-1], f"run {index + 1} Tandem", failures)
        time.sleep(1)
        unbatched_bursts.append(burst(unbatched.base_url, args.requests))
        check(unbatched_bursts[-1], f"run {index + 1} Tandem, group commit off", failures)
        console.print(
            f"run {index + 1}/{args.runs}: pgbench {floors[-1].wall_time:.2f} s, "
            f"batched {batched_floors[-1].wall_time:.2f} s, "
            f"HTTP floor {http_floors[-1].wall_time:.2f} s, "
            f"Tandem {fast_bursts[-1].wall_time:.2f} s, "
            f"group commit off {unbatched_bursts[-1].wall_time:.2f} s"
        )
        time.sleep(1)

    read_user = create_user(url, 1)
    reads = [
        read_throughput(server, read_user, args.read_requests, args.read_connections)
        for server in servers
    ]
    lone = [
        lone_updates(server, create_user(url, args.lone_requests), args.lone_requests)
        for server in servers
    ]

    floor_times = [result.wall_time for result in floors]
    http_times = [report.wall_time for report in http_floors]
    batched_times = [result.wall_time for result in batched_floors]
    fast_times = [report.wall_time for report in fast_bursts]
    unbatched_times = [report.wall_time for report in unbatched_bursts]
    median: Callable[[Sequence[float]], float] = statistics.median

    table = Table(title=f"Wallet: {args.requests} withdrawals of {AMOUNT} from {args.requests}")
    table.add_column("")
    for index in range(args.runs):
        table.add_column(f"run {index + 1}", justify="right")
    table.add_column("median", justify="right", style="bold")
    # Ratios are taken within each run (its steps ran back to back, so a slow spell of a shared
    # box weighs on both sides), and their median is the figure quoted.
    ratio = divide(fast_times, floor_times)
    both_floors = [a + b for a, b in zip(floor_times, http_times, strict=True)]
    ratio_floors = divide(fast_times, both_floors)
    rows: list[tuple[str, list[float], Callable[[Sequence[float]], list[str]]]] = [
        (f"(a) database floor: pgbench (-c {pool_size}, prepared)", floor_times, seconds),
        ("    pgbench's own tps", [result.tps for result in floors], _tps),
        (f"(a') batched database floor: {batch_max} per statement", batched_times, seconds),
        ("(b) HTTP floor: constant answers, same stack", http_times, seconds),
        ("(c) burst, Tandem", fast_times, seconds),
        ("(d) ratio_floors c/(a+b)", ratio_floors, ratios),
        ("    ratio c/a", ratio, ratios),
        ("    ratio_http c/b", divide(fast_times, http_times), ratios),
        ("    burst p99 latency", _p99(fast_bursts), seconds),
        ("(c') burst, Tandem with group commit off", unbatched_times, seconds),
        ("    group commit's gain c'/c", divide(unbatched_times, fast_times), ratios),
    ]
    for label, values, render in rows:
        table.add_row(label, *render(values), *render([median(values)]))
    console.print(table)
    for index, sizes in enumerate(batch_sizes):
        console.print(f"run {index + 1}: {sizes.describe()}")

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
    for server, result in zip(servers, lone, strict=True):
        console.print(
            f"(f) {server.label}: {args.lone_requests} withdrawals one after another on one "
            f"keep-alive connection: p50 {result.p50 * 1000:.2f} ms, "
            f"p99 {result.p99 * 1000:.2f} ms, errors {result.errors}"
        )

    if args.keyed:
        keyed = [keyed_burst(server, url, args.keyed, failures) for server in servers]
        for server, took in zip(servers, keyed, strict=True):
            console.print(
                f"(g) {server.label}: {args.keyed} withdrawals of {AMOUNT} from {args.keyed}, "
                f"each with its own Idempotency-Key, all at once: {took:.2f} s "
                f"({args.keyed / took:,.0f}/s)"
            )
        console.print(f"keyed_group_commit: {keyed[1] / keyed[0]:.2f}")
    if args.transfers:
        console.print(transfer_figures(fast, url, args.transfers))
        console.print(transfer_figures(fast, url, args.transfers, hot_payee=True))
    if args.holds:
        console.print(hot_hold_figures(fast, url, args.holds, failures))
    if args.hold_pairs:
        console.print(hold_capture_figures(fast, url, args.hold_pairs, failures))
    if args.history_entries:
        console.print(history_figures(fast, url, args.history_entries))
    console.print(
        f"floors: database {median(floor_times):.2f} s, HTTP {median(http_times):.2f} s; "
        f"Tandem {median(fast_times):.2f} s"
    )
    console.print(f"ratio_floors: {median(ratio_floors):.2f}")
    console.print(f"ratio: {median(ratio):.2f}")
    console.print(f"group_commit: {median(divide(unbatched_times, fast_times)):.2f}")
    console.print(f"ratio_http: {median(divide(fast_times, http_times)):.2f}")
    console.print(f"reads: {reads[0].requests_per_second:,.0f} requests/s")
    for failure in failures:
        console.print(f"WRONG OUTCOME: {failure}", style="bold red")
    return 1 if failures else 0


def create_users(url: str, count: int, balance: int) -> list[int]:
    """``count`` users holding ``balance`` each, with their opening entries."""
    users = [
        row["id"]
        for row in query(
            url,
            "INSERT INTO users (balance) SELECT $1 FROM generate_series(1, $2) RETURNING id",
            balance,
            count,
        )
    ]
    query(
        url,
        "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
        "SELECT id, balance, balance, 'opening' FROM users WHERE id = ANY($1)",
        users,
    )
    return users


def transfer_figures(server: ServeProcess, url: str, total: int, *, hot_payee: bool = False) -> str:
    """``total`` transfers of 1..50 between random pairs of 1000 users, 200 in flight; with
    ``hot_payee``, from random ones of 1000 payers into one payee (a platform's fee account:
    every transfer serialised on its row)."""
    users = create_users(url, 1000, 10000)
    (payee,) = create_users(url, 1, 0) if hot_payee else (None,)
    rng = random.Random(7)
    host = f"127.0.0.1:{server.port}"
    requests = []
    for _ in range(total):
        src, dst = rng.sample(users, 2)
        dst = dst if payee is None else payee
        body = {"fromUserId": src, "toUserId": dst, "amount": rng.randrange(1, 51)}
        requests.append(build_request("POST", "/transfers", host, body, headers=AUTH))
    started = time.perf_counter()
    results = run(send_burst("127.0.0.1", server.port, requests, concurrency=200))
    elapsed = time.perf_counter() - started
    outcomes = Counter(str(result.status or result.error) for result in results)
    shape = "from 1000 users into one" if hot_payee else "over 1000 users"
    return (
        f"transfers: {total} {shape}, 200 in flight: {total / elapsed:,.0f}/s "
        f"({elapsed:.2f} s); outcomes {dict(outcomes)}"
    )


def keyed_burst(server: ServeProcess, url: str, total: int, failures: list[str]) -> float:
    """Seconds for ``total`` withdrawals of AMOUNT from one user holding ``total``, each with
    an Idempotency-Key of its own, all sent at once: the burst as a client that retries
    safely sends it (exactly half succeed)."""
    (user,) = create_users(url, 1, total)
    host = f"127.0.0.1:{server.port}"
    body = {"userId": user, "amount": -AMOUNT}
    run_id = random.randrange(1 << 30)
    requests = [
        build_request(
            "POST",
            "/balance/update",
            host,
            body,
            headers={**AUTH, "Idempotency-Key": f"bench-{run_id}-{index}"},
        )
        for index in range(total)
    ]
    started = time.perf_counter()
    results = run(send_burst("127.0.0.1", server.port, requests))
    elapsed = time.perf_counter() - started
    outcomes = Counter(result.describe() for result in results)
    made = total // AMOUNT  # AMOUNT each from a balance of total
    if outcomes != {"200": made, "409": total - made}:
        failures.append(f"keyed burst ({server.label}): outcomes {dict(outcomes)}")
    return elapsed


def hot_hold_figures(server: ServeProcess, url: str, total: int, failures: list[str]) -> str:
    """``total`` holds of AMOUNT on one user holding enough for all, sent at once."""
    (user,) = create_users(url, 1, total * AMOUNT)
    host = f"127.0.0.1:{server.port}"
    request = build_request(
        "POST", "/holds", host, {"userId": user, "amount": AMOUNT}, headers=AUTH
    )
    started = time.perf_counter()
    results = run(send_burst("127.0.0.1", server.port, [request] * total))
    elapsed = time.perf_counter() - started
    outcomes = Counter(result.describe() for result in results)
    if outcomes != {"201": total}:
        failures.append(f"holds on one user: outcomes {dict(outcomes)}")
    return (
        f"holds: {total} on one user, all at once: {total / elapsed:,.0f} created/s "
        f"({elapsed:.2f} s); outcomes {dict(outcomes)}"
    )


def hold_capture_figures(server: ServeProcess, url: str, total: int, failures: list[str]) -> str:
    """``total`` hold → capture pairs over 1000 users, 200 pairs in flight: a hold of 1..50
    from a random user to another, then its capture (a transfer to that payee)."""
    users = create_users(url, 1000, 10000)
    rng = random.Random(11)
    plan = [(*rng.sample(users, 2), rng.randrange(1, 51)) for _ in range(total)]
    host = f"127.0.0.1:{server.port}"
    outcomes: Counter[str] = Counter()

    async def pairs() -> None:
        pending = iter(plan)

        async def worker() -> None:
            for payer, payee, amount in pending:
                body = {"userId": payer, "toUserId": payee, "amount": amount}
                hold = await fetch(
                    "127.0.0.1",
                    server.port,
                    build_request("POST", "/holds", host, body, headers=AUTH),
                )
                if hold.status != 201:
                    outcomes[f"hold {hold.describe()}"] += 1
                    continue
                path = f"/holds/{hold.json()['holdId']}/capture"
                capture = await fetch(
                    "127.0.0.1",
                    server.port,
                    build_request("POST", path, host, {}, headers=AUTH),
                )
                outcomes[f"capture {capture.describe()}"] += 1

        await asyncio.gather(*(worker() for _ in range(min(200, total))))

    started = time.perf_counter()
    run(pairs())
    elapsed = time.perf_counter() - started
    if set(outcomes) != {"capture 200"}:
        failures.append(f"hold → capture: outcomes {dict(outcomes)}")
    return (
        f"hold → capture: {total} pairs over 1000 users, 200 in flight: "
        f"{total / elapsed:,.0f} pairs/s ({elapsed:.2f} s); outcomes {dict(outcomes)}"
    )


def history_figures(server: ServeProcess, url: str, entries: int) -> str:
    """Latency of history pages of one user with ``entries`` journal entries."""
    user = create_user(url, 0)
    query(
        url,
        "INSERT INTO ledger_entries (user_id, amount, balance, kind) VALUES ($1, 0, 0, 'opening')",
        user,
    )
    # In slices: each statement must finish within the database's statement deadline.
    for first in range(1, entries, 100_000):
        query(
            url,
            "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
            "SELECT $1::bigint, 1, g, 'deposit' FROM generate_series($2::int, $3::int) g",
            user,
            first,
            min(first + 99_999, entries - 1),
        )
    query(url, "ANALYZE ledger_entries")
    middle = int(
        value(
            url,
            "SELECT id FROM ledger_entries WHERE user_id = $1 ORDER BY id OFFSET $2 LIMIT 1",
            user,
            entries // 2,
        )
    )
    lines = [f"history: one user with {entries:,} entries, limit 100, 2000 requests each"]
    for label, path in [
        ("newest page", f"/balance/{user}/history?limit=100"),
        ("middle page", f"/balance/{user}/history?limit=100&before={middle}"),
    ]:
        request = build_request(
            "GET", path, f"127.0.0.1:{server.port}", keep_alive=True, headers=AUTH
        )
        results = run(send_keepalive("127.0.0.1", server.port, request, 2000, 20))
        latencies = [result.latency for result in results]
        errors = sum(1 for result in results if result.status != 200)
        lines.append(
            f"  {label}: p50 {quantile(latencies, 0.5) * 1000:.1f} ms, "
            f"p99 {quantile(latencies, 0.99) * 1000:.1f} ms, errors {errors}"
        )
    return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class BatchSizes:
    """A server's tandem_wallet_batch_size histogram (cumulative counts by upper bound) and
    its balance updates: read before and after a burst, subtracted."""

    buckets: dict[str, float]
    batched: float  # changes sent in batches
    updates: float

    @classmethod
    def read(cls, server: ServeProcess) -> BatchSizes:
        text = server.get("/metrics").decode()
        buckets = {
            sample.labels["le"]: sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.name == "tandem_wallet_batch_size_bucket"
            and sample.labels.get("kind") == "change"
        }
        return cls(
            buckets,
            sample_sum(text, "tandem_wallet_batch_size_sum", kind="change"),
            sample_sum(text, "tandem_wallet_balance_updates_total"),
        )

    def __sub__(self, before: BatchSizes) -> BatchSizes:
        return BatchSizes(
            {le: n - before.buckets.get(le, 0.0) for le, n in self.buckets.items()},
            self.batched - before.batched,
            self.updates - before.updates,
        )

    def describe(self) -> str:
        """The batches by size range, and the changes sent alone (nothing in flight)."""
        counts, previous, low = [], 0.0, 1.0
        for le, cumulative in self.buckets.items():
            if cumulative > previous:
                high = le if le == "+Inf" else str(int(float(le)))
                span = high if str(int(low)) == high else f"{int(low)}-{high}"
                counts.append(f"{span}: {cumulative - previous:.0f}")
            previous = cumulative
            low = float(le) + 1 if le != "+Inf" else low
        total = self.buckets.get("+Inf", 0.0)
        return (
            f"batches by size {{{', '.join(counts)}}} ({total:.0f} batches, "
            f"{self.batched:.0f} changes); {self.updates - self.batched:.0f} changes sent alone"
        )


def _tps(values: Sequence[float]) -> list[str]:
    return [f"{value:,.0f}" for value in values]


def _p99(reports: Sequence[BurstReport]) -> list[float]:
    return [report.latency_quantile(0.99) for report in reports]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_burst_arguments(parser, runs=1, runs_help="repeat floor and bursts N times")
    parser.add_argument("--read-requests", type=int, default=20_000)
    parser.add_argument("--read-connections", type=int, default=200)
    parser.add_argument(
        "--lone-requests", type=int, default=2000, help="sequential withdrawals, one connection"
    )
    parser.add_argument(
        "--keyed", type=int, default=10_000, help="the keyed burst's withdrawals; 0: skip"
    )
    parser.add_argument("--transfers", type=int, default=5000, help="0: skip transfers")
    parser.add_argument(
        "--holds", type=int, default=10_000, help="holds on one user at once; 0: skip"
    )
    parser.add_argument(
        "--hold-pairs", type=int, default=5000, help="hold → capture pairs; 0: skip"
    )
    parser.add_argument(
        "--history-entries", type=int, default=1_000_000, help="0: skip history pages"
    )
    args = parser.parse_args(argv)
    raise_fd_limit()
    return run_main("tandem-bench-", partial(run_bench, args))


if __name__ == "__main__":
    sys.exit(main())
