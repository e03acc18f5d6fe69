"""The cluster cron with real server processes on one database, in compressed time: spread,
exclusivity, history, crash recovery and graceful shutdown. Shared helpers: cluster.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.scheduler.cluster import (
    DRAINED,
    add_api_schedules,
    assert_history_consistent,
    database_now,
    instance_of,
    mix_runs,
    owner_and_other,
    probe_overlaps,
    start_cluster,
    stop_all,
    succeeded_per_instance,
    wait_running_on,
    window,
)
from tests.scheduler.registries import PROBE_TABLE
from tests.support import (
    CRON_TIMINGS,
    LEASE,
    POLL,
    REPO,
    Server,
    empty_database,
    faketime_library,
    free_port_block,
    http_get,
    http_post,
    query,
    sample_sum,
    sample_value,
    wait_for,
)

# Chi-square critical value, 4 degrees of freedom, p = 0.001.
CHI2_CRITICAL_DF4 = 18.467


def test_runs_spread_evenly_without_overlap(cron_db: str, tmp_path: Path) -> None:
    """Five instances, forty equal tasks: runs per instance pass a chi-square test and
    max/min < 1.25; no two runs of a task overlap (probe rows written by the task bodies);
    the history is consistent."""
    # Steals ignore fair share (they exist for a stalled claimer); with the compressed 1 s
    # delay, one instance slowed by this shared 2-core box lost its share to them (64 vs ~84
    # runs). The default steal delay is 2 s; 3 s keeps the backstop rare, as in production.
    servers = start_cluster(cron_db, tmp_path, "equal", 5, TANDEM_SCHEDULER_STEAL_AFTER="3.0")
    exit_codes: list[int] = []
    try:
        # Instances start one after another; count from when all five are in, and up to
        # the stop (stopping takes a while and the last ones standing take over). Fair share
        # bounds each instance's lead over the least-served by the slack plus the share of
        # what is due together (the forty tasks' slots coincide: 1 + 40/5), so a window's
        # counts may differ by twice that (18 runs): 30 s (about 120 runs each) keeps that
        # well inside the ratio below.
        since, until = window(cron_db, 2, 30)
    finally:
        exit_codes = stop_all(servers)
    # A server killed mid-drain would leave a run with no end (an "overlap" by artefact).
    assert exit_codes == [0] * 5, [s.log()[-2000:] for s in servers]
    unfinished = query(cron_db, "SELECT count(*) AS n FROM probe WHERE finished IS NULL")
    assert unfinished[0]["n"] == 0
    counts = list(succeeded_per_instance(cron_db, since, until).values())
    assert len(counts) == 5, counts
    mean = sum(counts) / 5
    chi2 = sum((c - mean) ** 2 / mean for c in counts)
    assert chi2 < CHI2_CRITICAL_DF4, counts
    assert max(counts) / min(counts) < 1.25, counts
    print(f"runs per instance: {sorted(counts)}, chi2 {chi2:.2f}")
    assert probe_overlaps(cron_db) == 0
    assert_history_consistent(cron_db)


@pytest.mark.parametrize("mix", [0, 1000], ids=["alone", "with-1000-api-schedules"])
def test_runs_longer_than_interval_never_overlap(cron_db: str, tmp_path: Path, mix: int) -> None:
    """Three instances, tasks whose runs last three intervals (and, the second time, a
    thousand API schedules every 20 s beside them): the probe rows the task bodies write
    never overlap for one task, every task ran several times, and the history of every
    schedule is consistent."""
    servers = start_cluster(cron_db, tmp_path, "overrun", 3)
    if mix:
        add_api_schedules(cron_db, mix)

    def ran_thrice() -> bool:
        per_task = query(cron_db, "SELECT task, count(*) AS n FROM probe GROUP BY task")
        return len(per_task) == 5 and all(r["n"] >= 3 for r in per_task)

    try:
        # However slow the machine: every task runs three times (the overlaps are counted
        # over all of them, after the stop).
        wait_for(ran_thrice, 60)
        if mix:
            wait_for(lambda: mix_runs(cron_db) >= mix // 2, 60)
    finally:
        stop_all(servers)
    assert probe_overlaps(cron_db) == 0
    assert_history_consistent(cron_db)


def test_crashed_owner_run_is_lost_and_recovered(cron_db: str, tmp_path: Path) -> None:
    """SIGKILL the owner of a long run: the run is recorded lost and the task runs on the
    other instance soon after (its ended session is noticed within a poll; the wait allows
    for leases on a loaded machine), never overlapping the dead run."""
    servers = start_cluster(cron_db, tmp_path, "long", 2)
    try:
        owner, owner_id, survivor = owner_and_other(cron_db, servers)
        killed_at = database_now(cron_db)  # before: the session's end is seen within ms
        owner.stop(signal.SIGKILL)
        survivor_id = instance_of(survivor)
        wait_running_on(cron_db, survivor_id, 5 * LEASE + 5)
        history = query(
            cron_db,
            "SELECT fence, instance_id, status, error, started_at FROM task_history ORDER BY fence",
        )
        assert [(h["instance_id"], h["status"]) for h in history[-2:]] == [
            (owner_id, "lost"),
            (survivor_id, "running"),
        ]
        assert owner_id in history[-2]["error"]
        assert history[-1]["started_at"] > killed_at
        assert _metric(survivor, "tandem_scheduler_recoveries_total") >= 1
        recovery = (history[-1]["started_at"] - killed_at).total_seconds()
        print(f"recovered {recovery:.2f} s after SIGKILL (lease {LEASE} s, poll {POLL} s)")
    finally:
        stop_all(servers)
    assert_history_consistent(cron_db)


def test_graceful_stop_releases_run(cron_db: str, tmp_path: Path) -> None:
    """SIGTERM the owner: its run is recorded cancelled (not lost) and the task is picked up
    by the other instance without waiting for a lease to expire."""
    servers = start_cluster(cron_db, tmp_path, "long", 2)
    try:
        owner, owner_id, survivor = owner_and_other(cron_db, servers)
        survivor_id = instance_of(survivor)
        assert owner.stop(signal.SIGTERM) == 0
        # Sooner than any lease could expire: it was released, not swept.
        wait_running_on(cron_db, survivor_id, LEASE)
        history = query(
            cron_db, "SELECT instance_id, status, error FROM task_history ORDER BY fence"
        )
        # The owner's run ends drained; a claim it had in flight as the drain began comes
        # back after it and is released unstarted, also cancelled (never lost).
        owners = [h for h in history if h["instance_id"] == owner_id]
        assert owners[-1]["status"] == "cancelled"
        assert owners[-1]["error"] in DRAINED
        assert history[-1]["instance_id"] == survivor_id
        assert all(h["status"] != "lost" for h in history)
    finally:
        stop_all(servers)
    assert_history_consistent(cron_db)


def test_demo_tasks_have_their_intervals() -> None:
    """The ten demo tasks have their documented intervals and run at least 120 s unscaled."""
    from datetime import timedelta

    from tandem.scheduler import demo_tasks
    from tandem.scheduler.registry import TaskContext
    from tandem.scheduler.schedules import Every

    intervals = {d.name: d.schedule for d in demo_tasks.registry.scheduled()}
    assert intervals == {
        name: Every(every)
        for name, every in {
            "TestTask1": timedelta(minutes=5),
            "TestTask2": timedelta(hours=1),
            "TestTask3": timedelta(minutes=10),
            "TestTask4": timedelta(hours=6),
            "TestTask5": timedelta(minutes=15),
            "TestTask6": timedelta(minutes=30),
            "TestTask7": timedelta(days=1),
            "TestTask8": timedelta(minutes=20),
            "TestTask9": timedelta(minutes=45),
            "TestTask10": timedelta(minutes=25),
        }.items()
    }
    slept: list[float] = []

    class Recording(TaskContext):
        async def sleep(self, seconds: float) -> None:
            slept.append(seconds)

    log = logging.LoggerAdapter(logging.getLogger("test"), {})
    ctx = Recording(name="TestTask1", instance_id="test", fence=1, time_scale=1.0, log=log)
    asyncio.run(demo_tasks.demo_task(ctx))
    assert sum(slept) >= 120


def _metric(server: Server, name: str) -> float:
    return sample_sum(http_get(f"{server.url}/metrics").text, name)


def test_paused_zombie_cancels_itself_and_changes_nothing(cron_db: str, tmp_path: Path) -> None:
    """SIGSTOP the owner past its lease, let the other instance take over, SIGCONT: the old
    run stops itself, and the record of the takeover stays as it is."""
    servers = start_cluster(cron_db, tmp_path, "long", 2)
    try:
        owner, _owner_id, survivor = owner_and_other(cron_db, servers)
        survivor_id = instance_of(survivor)
        owner.process.send_signal(signal.SIGSTOP)
        try:
            wait_running_on(cron_db, survivor_id, 5 * LEASE + 5)
            taken_over = query(
                cron_db, "SELECT fence, status, finished_at FROM task_history ORDER BY fence"
            )
        finally:
            owner.process.send_signal(signal.SIGCONT)
        # The zombie notices at its next heartbeat (or has self-fenced already).
        wait_for(lambda: _metric(owner, "tandem_scheduler_fenced_out_total") >= 1, 10)
        time.sleep(1)
        after = query(cron_db, "SELECT fence, status, finished_at FROM task_history ORDER BY fence")
        assert after == taken_over
        assert [r["status"] for r in after[-2:]] == ["lost", "running"]
        task = query(cron_db, "SELECT running_instance, fence FROM tasks")[0]
        assert (task["running_instance"], task["fence"]) == (survivor_id, after[-1]["fence"])
    finally:
        stop_all(servers)
    assert_history_consistent(cron_db)


def start_cluster_command(
    url: str, instances: int, log: Path | None = None
) -> tuple[subprocess.Popen[bytes], int]:
    """`tandem cluster` in a session of its own (so the test can reach every process it
    started), on a block of free ports, its output in ``log`` if given; returns the process
    and its entry port."""
    port = free_port_block(instances + 1)
    env = {**os.environ, **CRON_TIMINGS, "TANDEM_DATABASE_URL": url}
    env["TANDEM_SCHEDULER_TASKS"] = "tests.scheduler.registries:quick"
    if log is not None:
        env["TANDEM_LOG_LEVEL"] = "info"  # the start-up lines
    command = [sys.executable, "-m", "tandem", "cluster", "--instances", str(instances)]
    with contextlib.ExitStack() as files:
        out = files.enter_context(log.open("wb")) if log is not None else subprocess.DEVNULL
        process = subprocess.Popen(
            [*command, "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=out,
            start_new_session=True,
        )
    return process, port


def session_pids(process: subprocess.Popen[bytes]) -> list[int]:
    """The processes of the session ``process`` leads (it, and what it started)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            # Fields after the command name (which may hold spaces): state ppid pgrp session.
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[3]) == process.pid:
                pids.append(int(stat.parent.name))
    return pids


def session_alive(process: subprocess.Popen[bytes]) -> bool:
    return bool(session_pids(process))


def kill_session(process: subprocess.Popen[bytes]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def test_cluster_command_runs_instances_behind_one_port(cron_db: str, tmp_path: Path) -> None:
    """`tandem cluster --instances 3` serves three instances on one port, each also alone on
    port + i (distinct instances, the ones /instances lists), and says it is plain HTTP on
    loopback; Ctrl-C stops all."""
    log = tmp_path / "cluster.log"
    process, port = start_cluster_command(cron_db, 3, log)
    try:

        def three_live() -> bool:
            try:
                body = http_get(f"http://127.0.0.1:{port}/instances", timeout=1).json()
            except httpx.HTTPError:
                return False
            return len(body["instances"]) == 3

        wait_for(three_live, 30)
        instances = http_get(f"http://127.0.0.1:{port}/instances").json()["instances"]
        direct = {
            http_get(f"http://127.0.0.1:{port + n}/health/live").headers["x-instance-id"]
            for n in (1, 2, 3)
        }
        assert direct == {i["id"] for i in instances}
        said = f"3 instances on one database, one entry port, plain HTTP on 127.0.0.1:{port}"
        wait_for(lambda: said in log.read_text(errors="replace"), 30, "the start-up line")
        process.send_signal(signal.SIGINT)
        assert process.wait(30) == 0
        wait_for(lambda: not session_alive(process), 10)
    finally:
        kill_session(process)


def test_cluster_command_stopped_while_starting_leaves_nothing(cron_db: str) -> None:
    """SIGTERM to `tandem cluster` as soon as its three instances are spawned (still
    starting) stops every one of them."""
    process, _ = start_cluster_command(cron_db, 3)
    try:
        wait_for(lambda: len(session_pids(process)) >= 4, 30, step=0.02)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
        wait_for(lambda: not session_alive(process), 30)
    finally:
        kill_session(process)


def _gauge(server: Server, name: str, task: str) -> float | None:
    return sample_value(http_get(f"{server.url}/metrics").text, name, task=task)


def test_task_gauges_follow_the_database(cron_db: str, tmp_path: Path) -> None:
    """An instance exports each enabled task's interval and the time of its last success as
    the database has them (what the 'task not succeeding' alert reads); a task no instance
    has code for, and a paused task, have no series, so the alert cannot fire on them. A
    paused housekeeping task keeps its series and says since when it is paused."""
    query(
        cron_db,
        "INSERT INTO tasks (name, interval, function_name) VALUES ('Retired', '1 s', 'gone.f')",
    )
    (server,) = start_cluster(cron_db, tmp_path, "quick", 1, TANDEM_MAINTENANCE_ENABLED="true")
    last = "tandem_scheduler_task_last_success_timestamp_seconds"
    try:
        succeeded = "SELECT 1 FROM tasks WHERE name = 'Quick' AND last_succeeded_at IS NOT NULL"
        wait_for(lambda: query(cron_db, succeeded), 15)
        first = query(
            cron_db,
            "SELECT extract(epoch FROM last_succeeded_at) AS t FROM tasks WHERE name = 'Quick'",
        )
        wait_for(lambda: (_gauge(server, last, "Quick") or 0) >= float(first[0]["t"]), 15)
        assert _gauge(server, "tandem_scheduler_task_interval_seconds", "Quick") == 1.0
        assert _gauge(server, last, "Retired") is None
        assert http_post(f"{server.url}/tasks/Quick/pause").status_code == 200
        wait_for(lambda: _gauge(server, last, "Quick") is None, 15)
        assert _gauge(server, "tandem_scheduler_task_interval_seconds", "Quick") is None

        housekeeping, since = (
            "tandem.prune_task_history",
            "tandem_scheduler_task_paused_timestamp_seconds",
        )
        assert _gauge(server, since, housekeeping) is None
        assert http_post(f"{server.url}/tasks/{housekeeping}/pause").status_code == 200
        paused_at = query(
            cron_db, "SELECT extract(epoch FROM max(created_at)) AS t FROM task_actions"
        )
        wait_for(lambda: _gauge(server, since, housekeeping) is not None, 15)
        assert _gauge(server, since, housekeeping) == pytest.approx(float(paused_at[0]["t"]))
        assert _gauge(server, last, housekeeping) is not None
        assert _gauge(server, "tandem_scheduler_task_interval_seconds", housekeeping) is not None
        assert http_post(f"{server.url}/tasks/{housekeeping}/resume").status_code == 200
        wait_for(lambda: _gauge(server, since, housekeeping) is None, 15)
    finally:
        server.stop()


def test_a_wrong_local_clock_changes_nothing(cron_db: str, tmp_path: Path) -> None:
    """Three instances, one with its wall clock two hours ahead and one an hour behind
    (libfaketime): each still gets its share of runs, no run starts before its slot, starts
    are on time by the database clock, no two runs overlap, and the history is consistent.
    The scheduler reads no local wall clock."""
    from email.utils import parsedate_to_datetime

    library = faketime_library()
    skews = {"+2h": 7200.0, "-1h": -3600.0, "": 0.0}
    servers: list[Server] = []
    exit_codes: list[int] = []
    try:
        for skew in skews:
            faked = {"LD_PRELOAD": library, "FAKETIME": skew, "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
            servers += start_cluster(cron_db, tmp_path, "equal", 1, **(faked if skew else {}))
        # The skew is real: each server's Date header (its wall clock) is off by it.
        for server, offset in zip(servers, skews.values(), strict=True):
            date = parsedate_to_datetime(http_get(f"{server.url}/health/live").headers["date"])
            assert abs(date.timestamp() - time.time() - offset) < 60
        since, until = window(cron_db, 2, 12)
    finally:
        exit_codes = stop_all(servers)
    assert exit_codes == [0, 0, 0], [s.log()[-2000:] for s in servers]
    counts = sorted(succeeded_per_instance(cron_db, since, until).values())
    assert len(counts) == 3, counts
    assert counts[-1] / counts[0] < 1.5, counts
    runs = query(
        cron_db,
        "SELECT extract(epoch FROM started_at - scheduled_for) AS lag FROM task_history "
        "WHERE status = 'succeeded' AND started_at > $1 AND started_at < $2",
        since,
        until,
    )
    lags = sorted(float(r["lag"]) for r in runs)
    assert lags[0] >= 0, lags[0]  # no run started before its slot
    assert lags[len(lags) // 2] < 1.0, lags[len(lags) // 2]
    assert probe_overlaps(cron_db) == 0
    assert_history_consistent(cron_db)


def test_share_follows_scaling(cron_db: str, tmp_path: Path) -> None:
    """Forty equal tasks while the cluster grows 2 -> 5 -> 8 instances and shrinks to 3
    (SIGTERM): in a window after each change, every live instance runs between half and
    twice its fair share 1/N, no stopped one runs anything, and no two runs overlap."""
    steal = {
        "TANDEM_SCHEDULER_STEAL_AFTER": "3.0",  # as in the spread test
        # Eight instances must fit the test server's 100 connections: no wallet traffic here.
        "TANDEM_DB_POOL_SIZE": "1",
        "TANDEM_DB_ENGINE_POOL_SIZE": "1",
    }
    servers = start_cluster(cron_db, tmp_path, "equal", 2, **steal)
    started = list(servers)
    phases: list[tuple[set[str], datetime, datetime]] = []
    exit_codes: list[int] = []
    try:
        for size in (2, 5, 8, 3):
            if size > len(servers):
                joining = start_cluster(cron_db, tmp_path, "equal", size - len(servers), **steal)
                servers += joining
                started += joining
            else:
                leaving, servers = servers[size:], servers[:size]
                exit_codes += stop_all(leaving)
            since, until = window(cron_db, 3, 6)  # joins and leaves settle first
            phases.append(({instance_of(s) for s in servers}, since, until))
    finally:
        exit_codes += stop_all(servers)
    assert exit_codes == [0] * 8, [s.log()[-2000:] for s in started]
    shares = []
    for live, since, until in phases:
        counts = succeeded_per_instance(cron_db, since, until)
        assert set(counts) == live, (len(live), counts)
        total = sum(counts.values())
        fair = total / len(live)
        assert all(0.5 * fair <= n <= 2 * fair for n in counts.values()), (len(live), counts)
        shares.append(sorted(counts.values()))
    print(f"runs per instance by phase: {shares}")
    assert probe_overlaps(cron_db) == 0
    assert_history_consistent(cron_db)


def test_stops_promptly_when_the_database_is_gone(postgres_url: str, tmp_path: Path) -> None:
    """With its database gone mid-run (dropped, connections cut), an instance still stops by
    itself on SIGTERM within a container's stop grace (30 s in deploy/compose.yaml) instead of
    waiting out its pool's 60 s acquire timeout to say goodbye; the run it held is left to
    its lease."""
    with empty_database(postgres_url) as url:
        from tandem.core.migrations import upgrade_to_head

        upgrade_to_head(url)
        query(url, PROBE_TABLE)
        (server,) = start_cluster(url, tmp_path, "long", 1)
        try:
            wait_running_on(url, instance_of(server), 15)
            database = make_url(url).database
            query(postgres_url, f'DROP DATABASE "{database}" WITH (FORCE)')
            time.sleep(1)  # the instance notices: heartbeats fail, the pools reconnect
            assert server.stop(timeout=30) == 0, server.log()[-3000:]
        finally:
            server.stop(signal.SIGKILL)
