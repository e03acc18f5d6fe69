"""Every benchmark in bench/ still runs: each at its smallest size, as a developer runs it
(``python bench/NAME.py``), on the suite's PostgreSQL. A smoke run checks that it exits 0 and
prints its figures; the figures themselves are not judged here (tests never assert a
wall-clock time: bench/ and docs/performance.md are for that)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.support import REPO, require_tool

# Long enough for the scheduler bench's phases on a loaded 2-core machine; a hang still ends.
TIMEOUT = 420


def run_bench(name: str, postgres_url: str, *args: str) -> str:
    """``python bench/NAME.py ARGS --database-url URL`` to its end; its output, after checking
    it exited 0."""
    done = subprocess.run(
        [sys.executable, str(REPO / "bench" / f"{name}.py"), *args, "--database-url", postgres_url],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=REPO,
        # rich draws its tables for a wide terminal, so no figure's label is wrapped.
        env={**os.environ, "COLUMNS": "200"},
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    return output


def test_wallet_bench_prints_its_ratios(postgres_url: str) -> None:
    """bench/wallet.py (with bench/http_floor.py, its HTTP floor) prints the floors, the
    ratios and the read, transfer, hold and history figures."""
    out = run_bench(
        "wallet",
        postgres_url,
        "--runs=1",
        "--requests=200",
        "--read-requests=200",
        "--read-connections=10",
        "--lone-requests=50",
        "--keyed=100",
        "--transfers=50",
        "--holds=200",
        "--hold-pairs=50",
        "--history-entries=1000",
    )
    figures = ("floors: database", "ratio_floors:", "ratio:", "group_commit:", "ratio_http:")
    for figure in (*figures, "reads:", "batches by size"):
        assert figure in out, out[-4000:]
    assert "each with its own Idempotency-Key, all at once" in out
    assert "keyed_group_commit:" in out
    assert "transfers: 50 over" in out
    assert "transfers: 50 from 1000 users into one" in out
    assert "holds: 200 on one user" in out
    assert "hold → capture: 50 pairs" in out
    assert "middle page: p50" in out
    assert "withdrawals one after another on one keep-alive connection: p50" in out


def test_topology_bench_prints_every_topology(postgres_url: str) -> None:
    """bench/topology.py runs all four topologies, nginx's two with the shipped config (both
    of its servers moved to a free port), and prints each ratio to the single instance."""
    require_tool("nginx")
    out = run_bench("topology", postgres_url, "--runs=1", "--requests=200")
    for ratio in ("ratio b/a", "ratio c/a", "ratio d/a"):
        assert f"{ratio} (" in out, out[-4000:]
    assert "is not on PATH" not in out


def test_pooling_bench_prints_every_way_in(postgres_url: str) -> None:
    """bench/pooling.py measures the four ways to reach the server, PgBouncer's two included."""
    require_tool("pgbouncer")
    out = run_bench("pooling", postgres_url, "--runs=1", "--statements=20")
    assert out.count("ops/s") >= 1, out[-4000:]
    for way in ("direct, cache on", "direct, cache off", "session", "transaction"):
        assert way in out, out[-4000:]


@pytest.mark.timeout(TIMEOUT + 60)
def test_scheduler_bench_prints_every_phase(postgres_url: str) -> None:
    """bench/scheduler.py runs its spread, failover, fault and idle phases with two instances
    and four tasks (one kill and one cut, at the compressed timings) and prints their
    figures."""
    out = run_bench(
        "scheduler",
        postgres_url,
        "--instances=2",
        "--tasks=4",
        "--steady=2",
        "--settle=1",
        "--idle=2",
        "--kills=1",
        "--cuts=1",
        "--idle-timings=compressed",
        # The default settings' trials wait out 10 s leases; the fault tests run them.
        "--fault-timings=compressed",
    )
    assert "FAILED" not in out, out[-4000:]


def test_schedules_bench_prints_before_and_after(postgres_url: str) -> None:
    """bench/schedules.py runs its burst, steady and idle phases with both claims and prints
    every figure with its ratio."""
    out = run_bench(
        "schedules",
        postgres_url,
        "--instances=2",
        "--schedules=40",
        "--period=2",
        "--burst-window=2",
        "--idle=1",
        "--idle-settle=1",
    )
    for figure in ("burst runs/s", "lag p99 s", "steady spread", "idle xact/s per instance"):
        assert figure in out, out[-4000:]
    assert "FAILED" not in out, out[-4000:]


def test_events_bench_prints_its_lags_and_the_bursts_ratio(postgres_url: str) -> None:
    """bench/events.py prints the steady lags, the fan-out's, the worker's throughput and
    the burst with events on against none."""
    out = run_bench(
        "events",
        postgres_url,
        "--runs=1",
        "--requests=200",
        "--rate=100",
        "--seconds=1",
        "--fan-out=2",
        "--fan-rate=50",
        "--relay-events=100",
    )
    for figure in (
        "(a) 100/s",
        "(b) 50/s, 3 endpoints",
        "(c) delivery worker",
        "events_cost, worker elsewhere",
    ):
        assert figure in out, out[-4000:]
