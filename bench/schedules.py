"""Thousands of schedules made as data, claimed by real instances at the settings' defaults,
against the claim of the release before (one run per claim, one claim per poll), measured in
the same run on the same machine.

    python bench/schedules.py [--instances 5] [--schedules 10000] [--period 60]
                              [--burst-window 30] [--idle 10] [--database-url URL]

For each claim (``before``: TANDEM_SCHEDULER_CLAIM_BATCH=1 and CLAIMS_PER_POLL=1, the previous
release's one claim per poll; ``after``: the defaults), on a fresh database with N ``tandem
serve`` instances running ``bench.noop`` (bench/scheduler_tasks.py):

- burst: ``--schedules`` schedules, all due at once (made disabled, then enabled in one
  statement): runs started per second until all have started or ``--burst-window`` has
  passed, by the database clock (task_history), and the runs per instance (spread max/min).
- steady: the same schedules every ``--period`` seconds, their first slots spread evenly over
  one period: over the next period, runs started per second, the start lag of each run from
  its slot (p50, p99, max) and the spread max/min.
- idle: every schedule paused: database transactions per second per instance
  (``xact_commit + xact_rollback`` of the database, over ``--idle`` seconds, divided by N).

Housekeeping is off (TANDEM_MAINTENANCE_ENABLED=false) in both: its tasks would weigh on the
idle figure (the events' relay reads the stream several times a second), and behind a burst
at one claim per poll they would not run at all in ``before``.

The schedules are written by SQL, as POST /schedules writes them (a bench of the claim, not of
the API). Prints figures; exits 1 only when something failed to run.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from common import (  # bench/common.py: bench/ is first on sys.path when this runs as a script
    add_database_argument,
    bench_database,
    console,
    postgres_server,
    quantile,
    query,
    run_main,
    start_servers,
    value,
)
from rich.table import Table
from scheduler import Instance  # bench/scheduler.py: a serve process with bench/ on its path

from tandem.core.migrations import upgrade_to_head

# The previous release's claim: one run per statement, one statement per poll.
BEFORE = {"TANDEM_SCHEDULER_CLAIM_BATCH": "1", "TANDEM_SCHEDULER_CLAIMS_PER_POLL": "1"}
VARIANTS = {"before": BEFORE, "after": {}}

MAKE = """
INSERT INTO tasks (name, task, source, params, "interval", function_name, enabled, next_run_at)
SELECT 'bench-' || g, 'bench.noop', 'api', '{"label": "bench"}', make_interval(secs => $2),
       'scheduler_tasks.noop', false,
       clock_timestamp() + make_interval(secs => $3 + $2 * (g - 1) / $1::float8)
FROM generate_series(1, $1) g
"""

ENABLE_NOW = """
UPDATE tasks SET enabled = true, next_run_at = clock_timestamp()
WHERE source = 'api' RETURNING clock_timestamp() AS at
"""

STARTED = """
SELECT count(*) AS n, max(h.started_at) AS last FROM task_history h
JOIN tasks t ON t.id = h.task_id WHERE t.source = 'api' AND h.started_at >= $1
"""

PER_INSTANCE = """
SELECT h.instance_id, count(*) AS n FROM task_history h JOIN tasks t ON t.id = h.task_id
WHERE t.source = 'api' AND h.scheduled_for >= $1 AND h.scheduled_for < $2
GROUP BY h.instance_id
"""

LAGS = """
SELECT extract(epoch FROM h.started_at - h.scheduled_for)::float8 AS lag
FROM task_history h JOIN tasks t ON t.id = h.task_id
WHERE t.source = 'api' AND h.trigger = 'schedule' AND h.scheduled_for >= $1
  AND h.scheduled_for < $2
"""

XACTS = """
SELECT xact_commit + xact_rollback AS n FROM pg_stat_database WHERE datname = current_database()
"""


def spread(url: str, since: Any, until: Any, instances: int) -> float:
    counts = [r["n"] for r in query(url, PER_INSTANCE, since, until)]
    if len(counts) < instances:
        return float("inf")
    return max(counts) / min(counts)


def run_variant(
    args: argparse.Namespace, server_url: str, workdir: Path, name: str
) -> dict[str, float]:
    figures: dict[str, float] = {}
    with ExitStack() as stack:
        url = stack.enter_context(bench_database(server_url, f"schedules_{name}"))
        upgrade_to_head(url)
        # Housekeeping off: its tasks (the events' relay polls the stream) would weigh on the
        # idle figure, and with one claim per poll they wait behind the burst.
        env = {
            "TANDEM_SCHEDULER_TASKS": "scheduler_tasks:catalog",
            "TANDEM_MAINTENANCE_ENABLED": "false",
            **VARIANTS[name],
        }
        servers = start_servers(
            stack, args.instances, lambda _: Instance(url, env, workdir), "/health/ready"
        )
        deadline = time.monotonic() + 60
        while value(url, "SELECT count(*) FROM instance_sessions") < args.instances:
            if time.monotonic() > deadline:
                raise RuntimeError("the instances did not all join within 60 s")
            time.sleep(0.2)
        # An instance's claim loop starts a heartbeat (2 s) after its join.
        time.sleep(3.0)

        # burst: every schedule due at once
        query(url, MAKE, args.schedules, 3600.0, 3600.0)
        enabled_at = query(url, ENABLE_NOW)[0]["at"]
        ends = time.monotonic() + args.burst_window
        while time.monotonic() < ends:
            if query(url, STARTED, enabled_at)[0]["n"] >= args.schedules:
                break
            time.sleep(0.2)
        started = query(url, STARTED, enabled_at)[0]
        elapsed = (started["last"] - enabled_at).total_seconds() if started["last"] else 0.0
        figures["burst runs/s"] = started["n"] / max(elapsed, 1e-3)
        figures["burst started"] = started["n"]
        figures["burst spread"] = spread(url, enabled_at, started["last"], args.instances)

        # steady: a fresh set every period, first slots over one period
        query(url, "DELETE FROM task_history")
        query(url, "UPDATE tasks SET enabled = false WHERE source = 'api'")
        query(
            url,
            "UPDATE tasks SET name = name || '/' || id, deleted_at = clock_timestamp() "
            "WHERE source = 'api'",
        )
        # The first slots a little after the enable; the window closes a little after the
        # last slot (its run started by then).
        lead, margin = min(5.0, 1.0 + args.period / 2), min(3.0, float(args.period))
        query(url, MAKE, args.schedules, float(args.period), lead)
        window_start = value(url, f"SELECT clock_timestamp() + interval '{lead} seconds'")
        query(url, "UPDATE tasks SET enabled = true WHERE source = 'api' AND deleted_at IS NULL")
        window_end = value(
            url, f"SELECT $1::timestamptz + interval '{args.period} seconds'", window_start
        )
        time.sleep(lead + args.period + margin)
        lags = sorted(r["lag"] for r in query(url, LAGS, window_start, window_end))
        figures["steady runs/s"] = len(lags) / args.period
        figures["steady ran"] = len(lags)
        figures["lag p50 s"] = quantile(lags, 0.5) if lags else float("nan")
        figures["lag p99 s"] = quantile(lags, 0.99) if lags else float("nan")
        figures["lag max s"] = lags[-1] if lags else float("nan")
        figures["steady spread"] = spread(url, window_start, window_end, args.instances)

        # idle: every schedule paused
        query(url, "UPDATE tasks SET enabled = false WHERE source = 'api'")
        # A backend reports its transactions to the statistics up to 10 s late (PostgreSQL
        # flushes an idle connection's counters after that long): the busy phase's would land
        # in the idle window.
        time.sleep(args.idle_settle)
        before = value(url, XACTS)
        time.sleep(args.idle)
        after = value(url, XACTS)
        figures["idle xact/s per instance"] = (after - before) / args.idle / args.instances
        for server in servers:
            if not server.alive:
                raise RuntimeError(f"an instance died:\n{server.log_tail()}")
    return figures


def run_bench(args: argparse.Namespace, workdir: Path) -> int:
    server_url, origin = postgres_server(args.database_url, workdir)
    console.print(
        f"{args.schedules} schedules, {args.instances} instances, period {args.period:g} s "
        f"({origin} PostgreSQL)"
    )
    results = {name: run_variant(args, server_url, workdir, name) for name in VARIANTS}
    table = Table(title="schedules as data: the claim before (1 per poll) and after (batches)")
    table.add_column("figure")
    for name in VARIANTS:
        table.add_column(name, justify="right")
    table.add_column("after/before", justify="right")
    for figure in results["after"]:
        b, a = results["before"][figure], results["after"][figure]
        ratio = a / b if b and b == b and a == a else float("nan")
        table.add_row(figure, f"{b:.3g}", f"{a:.3g}", f"{ratio:.3g}")
    console.print(table)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--schedules", type=int, default=10_000)
    parser.add_argument("--period", type=int, default=60, help="seconds between a schedule's runs")
    parser.add_argument("--burst-window", type=float, default=30.0, help="seconds at most")
    parser.add_argument("--idle", type=float, default=10.0, help="idle window, seconds")
    parser.add_argument(
        "--idle-settle", type=float, default=11.0, help="seconds from the pause to the window"
    )
    add_database_argument(parser)
    args = parser.parse_args(argv)
    if args.instances < 1 or args.schedules < 1 or args.period < 1:
        parser.error("--instances, --schedules and --period must be positive")
    return run_main("tandem-bench-schedules-", lambda workdir, _: run_bench(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
