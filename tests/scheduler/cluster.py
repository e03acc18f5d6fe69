"""What the cluster cron's tests share: a database of their own, clusters of real server
processes, and the checks on history and probe rows."""

from __future__ import annotations

import itertools
import signal
import time
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from tandem.scheduler.runs import RELEASED_UNSTARTED
from tests.scheduler.registries import MIX_TASK
from tests.support import CRON_TIMINGS, Server, http_get, query, start_servers, wait_for

# How a drained instance's last run ends: stopped by the drain, or (a claim that was in
# flight as the drain began) released unstarted. Either is cancelled, never lost.
DRAINED = frozenset({"cancelled: drained", RELEASED_UNSTARTED})


def database_now(url: str) -> datetime:
    """The database clock: the only clock the scheduler (and so these tests) reads."""
    moment: datetime = query(url, "SELECT clock_timestamp() AS t")[0]["t"]
    return moment


def window(url: str, settle: float, length: float) -> tuple[datetime, datetime]:
    """Wait ``settle`` seconds (joins, leaves), then a ``length``-second window: its start
    and end by the database clock."""
    time.sleep(settle)
    since = database_now(url)
    time.sleep(length)
    return since, database_now(url)


def succeeded_per_instance(url: str, since: datetime, until: datetime) -> dict[str, int]:
    """Runs that succeeded and started within (since, until), by instance id."""
    rows = query(
        url,
        "SELECT instance_id, count(*) AS n FROM task_history WHERE status = 'succeeded' "
        "AND started_at > $1 AND started_at < $2 GROUP BY instance_id",
        since,
        until,
    )
    return {r["instance_id"]: r["n"] for r in rows}


def as_if_down_for(url: str, interval: str) -> None:
    """Move every time the scheduler and the probes recorded ``interval`` into the past: as
    the database sees it, the cluster has been down that long (and the slots of that time
    were never run)."""
    shift = f"interval '{interval}'"
    query(
        url,
        f"UPDATE tasks SET next_run_at = next_run_at - {shift}, retry_at = retry_at - {shift}, "
        f"retry_slot = retry_slot - {shift}, last_finished_at = last_finished_at - {shift}",
    )
    query(
        url,
        f"UPDATE task_history SET scheduled_for = scheduled_for - {shift}, "
        f"started_at = started_at - {shift}, finished_at = finished_at - {shift}",
    )
    query(url, f"UPDATE probe SET started = started - {shift}, finished = finished - {shift}")


def add_api_schedules(url: str, count: int = 1000, every: float = 20.0) -> None:
    """``count`` API schedules of the mix's task (registries.MIX_TASK) every ``every``
    seconds, their first slots spread over one period from now: what POST /schedules writes."""
    query(
        url,
        'INSERT INTO tasks (name, task, source, params, "interval", function_name, next_run_at) '
        "SELECT 'mix-' || g, $3, 'api', jsonb_build_object('n', g), make_interval(secs => $2), "
        "'mixed', clock_timestamp() + make_interval(secs => $2 * (g - 1) / $1::float8) "
        "FROM generate_series(1, $1) g",
        count,
        every,
        MIX_TASK,
    )


def mix_runs(url: str) -> int:
    """Runs of the mix's schedules that ended well."""
    return int(
        query(
            url,
            "SELECT count(*) AS n FROM task_history h JOIN tasks t ON t.id = h.task_id "
            "WHERE t.task = $1 AND h.status = 'succeeded'",
            MIX_TASK,
        )[0]["n"]
    )


def start_cluster(url: str, log_dir: Path, registry: str, n: int, **overrides: str) -> list[Server]:
    env = {**CRON_TIMINGS, "TANDEM_SCHEDULER_TASKS": f"tests.scheduler.registries:{registry}"}
    env.update(overrides)
    return start_servers(url, log_dir, n, extra_env=env)


def stop_all(servers: list[Server]) -> list[int]:
    """SIGTERM to all at once (they drain, to the instances that stay); their exit codes
    (negative: killed after the grace time)."""
    for server in servers:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
    return [s.reap() for s in servers]


def instance_of(server: Server) -> str:
    """The scheduler instance id of a server process (from the membership list)."""
    for row in http_get(f"{server.url}/instances").json()["instances"]:
        if row["pid"] == server.process.pid:
            return str(row["id"])
    raise AssertionError("server not in /instances")


def live(url: str, instance: str, fresh: float) -> bool:
    """The instance holds a database session and heartbeats."""
    return bool(
        query(
            url,
            "SELECT 1 FROM instances i JOIN instance_sessions s ON s.session_key = i.session_key "
            "WHERE i.id = $1 AND i.heartbeat_at > clock_timestamp() - $2::interval",
            instance,
            timedelta(seconds=fresh),
        )
    )


def instances_of(url: str, servers: list[Server], fresh: float) -> list[str]:
    """Each server's scheduler instance id, once every one of them is live."""
    ids: list[str] = []
    for server in servers:
        wait_for(lambda s=server: _instance_or_none(s) is not None, 30)
        ids.append(instance_of(server))
    wait_for(lambda: all(live(url, i, fresh) for i in ids), 30)
    return ids


def _instance_or_none(server: Server) -> str | None:
    try:
        return instance_of(server)
    except (AssertionError, OSError, ValueError):
        return None


def probe_overlaps(url: str) -> int:
    """Pairs of runs of one task whose probe rows (written by the task bodies) overlap."""
    rows = query(
        url,
        "SELECT count(*) AS n FROM probe a JOIN probe b ON a.task = b.task AND a.fence < b.fence "
        "AND tstzrange(a.started, coalesce(a.finished, 'infinity')) "
        "&& tstzrange(b.started, coalesce(b.finished, 'infinity'))",
    )
    return int(rows[0]["n"])


def owner_and_other(url: str, servers: list[Server]) -> tuple[Server, str, Server]:
    """Once the single task runs: the server running it, its instance id, and another one."""
    wait_for(lambda: query(url, "SELECT 1 FROM tasks WHERE is_running"), 15)
    owner_id = str(query(url, "SELECT running_instance FROM tasks")[0]["running_instance"])
    owner = next(s for s in servers if instance_of(s) == owner_id)
    return owner, owner_id, next(s for s in servers if s is not owner)


def wait_running_on(url: str, instance_id: str, timeout: float) -> None:
    """Wait until a task runs on ``instance_id``."""
    wait_for(
        lambda: query(
            url, "SELECT 1 FROM tasks WHERE is_running AND running_instance = $1", instance_id
        ),
        timeout,
    )


def assert_history_consistent(url: str) -> None:
    """One row per claim (fences 1..n without gaps), legal statuses, at most one running,
    and tasks agreeing with their history."""
    tasks = query(url, "SELECT id, fence, is_running, running_instance FROM tasks")
    history: dict[int, list[Any]] = {task["id"]: [] for task in tasks}
    # One read (a thousand schedules in the mix would be a thousand connections).
    for row in query(
        url,
        "SELECT task_id, fence, status, instance_id, started_at, finished_at FROM task_history "
        "ORDER BY task_id, fence",
    ):
        history[row["task_id"]].append(row)
    for task in tasks:
        rows = history[task["id"]]
        assert [r["fence"] for r in rows] == list(range(1, task["fence"] + 1))
        assert {r["status"] for r in rows} <= {
            "running",
            "succeeded",
            "failed",
            "timed_out",
            "lost",
            "cancelled",
            "skipped",
        }
        running = [r for r in rows if r["status"] == "running"]
        if task["is_running"]:
            assert [(r["fence"], r["instance_id"]) for r in running] == [
                (task["fence"], task["running_instance"])
            ]
        else:
            assert running == []
        for earlier, later in itertools.pairwise(rows):
            assert earlier["finished_at"] is not None
            assert earlier["finished_at"] <= later["started_at"]
