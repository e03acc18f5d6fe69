"""The cluster cron's promise under real faults, with real server processes: a run cut off from
the database by a silent partition stops before its successor starts (counted in effects
outside the database, at the compressed and the default timings), a cut inside a claim holds
no other instance's claims up, a killed owner is replaced within a poll, and steals stay fair
with one instance stalling. Each test module owns its PostgreSQL (tests/faults/postgres.py)."""

from __future__ import annotations

import itertools
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.scheduler import repository
from tests.faults.cron import (
    COMPRESSED_ENV,
    DEFAULT_ENV,
    TIMINGS,
    describe_cuts,
    kill_trials,
    partition_trials,
)
from tests.faults.postgres import ThrowawayPostgres, throwaway_postgres
from tests.faults.proxy import partition_proxy
from tests.scheduler.cluster import (
    assert_history_consistent,
    database_now,
    instances_of,
    probe_overlaps,
    stop_all,
)
from tests.scheduler.registries import PROBE_TABLE
from tests.support import (
    LEASE,
    Server,
    fresh_database,
    query,
    start_server,
    start_servers,
    wait_for,
)


@pytest.fixture(scope="module")
def pg() -> Iterator[ThrowawayPostgres]:
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def cron_url(pg: ThrowawayPostgres) -> Iterator[str]:
    with fresh_database(pg.url) as url:
        query(url, PROBE_TABLE)
        yield url


@pytest.mark.parametrize(
    ("timing", "mix"), [("compressed", 0), ("default", 0), ("compressed", 1000)]
)
def test_a_cut_off_owner_stops_before_its_successor_starts(
    cron_url: str, pg: ThrowawayPostgres, tmp_path: Path, timing: str, mix: int
) -> None:
    """The owner of a never-ending task that makes an outside effect every 0.2 s is cut off by
    a silent partition, many times over, the two instances taking turns (cron.partition_trials;
    once more with a thousand API schedules beside it): not one effect of the cut-off run
    comes at or after the first effect of its successor; after each heal the cut-off instance
    rejoins, and the history holds no run twice."""
    cuts = partition_trials(cron_url, pg.port, tmp_path, TIMINGS[timing], mix)
    print(describe_cuts(timing, cuts))
    assert [c.overlap for c in cuts] == [0] * TIMINGS[timing].trials
    assert all(c.quiet > 0 for c in cuts)
    assert_history_consistent(cron_url)


# --- a cut inside a claim -------------------------------------------------------------------


def waiting_for_claim_lock(url: str) -> int:
    """Scheduler sessions waiting on an advisory lock (only the claim lock is ever waited for)."""
    rows = query(
        url,
        "SELECT count(*) AS n FROM pg_stat_activity WHERE datname = current_database() "
        "AND application_name = 'tandem-scheduler' AND wait_event_type = 'Lock' "
        "AND wait_event = 'advisory'",
    )
    return int(rows[0]["n"])


def spread(url: str, cut_id: str, others: list[str]) -> bool:
    """Each of ``others`` is running a task, and ``cut_id`` at most two (its fair share of
    five tasks over three instances)."""
    running = {
        row["instance_id"]: row["count"]
        for row in query(
            url,
            "SELECT instance_id, count(*) FROM task_history WHERE status = 'running' "
            "GROUP BY instance_id",
        )
    }
    return all(running.get(other, 0) > 0 for other in others) and running.get(cut_id, 0) <= 2


def test_a_cut_inside_a_claim_stalls_no_other_claim(
    cron_url: str, pg: ThrowawayPostgres, tmp_path: Path
) -> None:
    """The cut lands inside a claim on purpose: the test holds the cluster-wide claim lock
    until all three instances' claims wait on it, cuts one instance off, then lets the lock
    go. The other two go on claiming through the cut (two leases long, no gap of a lease); the
    cut-off one rejoins after the heal, and no run of a task overlaps another in the history."""
    env = {**COMPRESSED_ENV, "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:overrun"}
    with partition_proxy("127.0.0.1", pg.port) as proxy:
        cut = start_server(proxy.url_for(cron_url), tmp_path, extra_env=env)
        others = start_servers(cron_url, tmp_path, 2, extra_env=env)
        try:
            ids = instances_of(cron_url, [cut, *others], 1.0)
            cut_id = ids[0]
            # The cut one started first and claimed every task while alone: until the others
            # run their share, it may hold them all, and a cut then leaves the others nothing
            # to claim until those runs' leases end (a gap of a lease, with no claim stalled).
            wait_for(lambda: spread(cron_url, cut_id, ids[1:]), 15, "the tasks spread")
            with psycopg.connect(asyncpg_dsn(cron_url), autocommit=True) as holder:
                holder.execute("SELECT pg_advisory_lock(%s)", (repository.CLAIM_LOCK_ID,))
                wait_for(lambda: waiting_for_claim_lock(cron_url) == 3, 10, step=0.02)
                proxy.partition()
                holder.execute("SELECT pg_advisory_unlock(%s)", (repository.CLAIM_LOCK_ID,))
            since = database_now(cron_url)
            time.sleep(2 * LEASE)
            until = database_now(cron_url)
            proxy.heal()
            claims = query(
                cron_url,
                "SELECT started_at FROM task_history WHERE instance_id <> $1 "
                "AND started_at BETWEEN $2 AND $3 ORDER BY started_at",
                cut_id,
                since,
                until,
            )
            starts = [since, *(c["started_at"] for c in claims), until]
            longest = max((b - a).total_seconds() for a, b in itertools.pairwise(starts))
            print(
                f"cut inside a claim: {len(claims)} claims elsewhere in {2 * LEASE} s, "
                f"longest gap {longest:.2f} s"
            )
            # Stalled, the claims elsewhere would stop for the whole cut.
            assert longest < LEASE, claims
            healed = database_now(cron_url)
            wait_for(
                lambda: query(
                    cron_url,
                    "SELECT 1 FROM task_history WHERE instance_id = $1 AND started_at > $2",
                    cut_id,
                    healed,
                ),
                30,
            )
        finally:
            proxy.heal()
            stop_all([cut, *others])
    # The history, not the probe rows: the cut-off instance's own probe writes were held up by
    # the cut too, and dated on arrival.
    assert_history_consistent(cron_url)


# --- a killed owner -------------------------------------------------------------------------


@pytest.mark.parametrize(("kills", "mix"), [(3, 0), (1, 1000)])
def test_a_killed_owner_is_replaced_within_a_poll(
    cron_url: str, tmp_path: Path, kills: int, mix: int
) -> None:
    """At the default settings (lease 10 s), three instances: SIGKILL the owner of a long run,
    three times over (once more, with a thousand API schedules beside it). Each time the
    database notices the killed process's session end: the run is recorded lost as such, and
    the task runs on another instance before the lease could have expired."""
    kills_done = kill_trials(cron_url, tmp_path, DEFAULT_ENV, TIMINGS["default"].lease, kills, mix)
    print(
        "SIGKILL of the owner at the default settings: recorded lost after "
        f"{[round(k.swept, 2) for k in kills_done]} s, running elsewhere after "
        f"{[round(k.recovered, 2) for k in kills_done]} s"
    )
    assert all(k.error.startswith("session ended") for k in kills_done), kills_done
    assert all(k.within_lease for k in kills_done), kills_done
    assert_history_consistent(cron_url)


# --- steals with one instance stalling ------------------------------------------------------


def stall_in_bursts(server: Server, stop: threading.Event, stopped: float, running: float) -> None:
    while not stop.is_set():
        server.process.send_signal(signal.SIGSTOP)
        time.sleep(stopped)
        server.process.send_signal(signal.SIGCONT)
        stop.wait(running)


def test_steals_go_to_the_least_served(cron_url: str, tmp_path: Path) -> None:
    """Five instances, forty equal tasks; one instance is stopped (SIGSTOP) for 1.3 s of every
    2.5 s, so its heartbeat goes stale and the tasks it would take wait past the steal delay;
    another polls four times as often as the rest (as during a change of settings). The
    steals go to the least-served fresh instance, not to the fastest poller, and the claims
    stay even: max/min over the five below 1.25."""
    env = {**COMPRESSED_ENV, "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:equal"}
    eager = {
        **env,
        "TANDEM_SCHEDULER_POLL_INTERVAL": str(float(env["TANDEM_SCHEDULER_POLL_INTERVAL"]) / 4),
    }
    servers = [
        start_server(cron_url, tmp_path, extra_env=eager if i == 1 else env) for i in range(5)
    ]
    stop = threading.Event()
    try:
        ids = instances_of(cron_url, servers, 1.0)
        time.sleep(3)
        stalling = threading.Thread(target=stall_in_bursts, args=(servers[0], stop, 1.3, 1.2))
        stalling.start()
        time.sleep(2)
        since = database_now(cron_url)
        time.sleep(10)
        until = database_now(cron_url)
        stop.set()
        stalling.join()
    finally:
        stop.set()
        servers[0].process.send_signal(signal.SIGCONT)
        stop_all(servers)
    rows = query(
        cron_url,
        "SELECT instance_id, count(*) AS n FROM task_history WHERE started_at BETWEEN $1 AND $2 "
        "GROUP BY instance_id",
        since,
        until,
    )
    claims = {r["instance_id"]: r["n"] for r in rows}
    counts = [claims.get(i, 0) for i in ids]
    print(
        f"claims per instance, the first stalling, the second eager: {counts}, "
        f"max/min {max(counts) / min(counts):.2f}"
    )
    assert min(counts) > 0
    assert max(counts) / min(counts) < 1.25, counts
    assert probe_overlaps(cron_url) == 0
    assert_history_consistent(cron_url)
