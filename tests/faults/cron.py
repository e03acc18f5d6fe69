"""The cluster cron's fault trials, shared by tests/faults/test_cron_faults.py (which asserts
on them) and bench/scheduler.py (which prints them): real server processes, a partition proxy
per instance, SIGKILL, and the effects a task body makes outside the database."""

from __future__ import annotations

import functools
import signal
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from tests.faults.common import FAULT_ENV
from tests.faults.proxy import partition_proxy
from tests.scheduler.cluster import (
    add_api_schedules,
    database_now,
    instances_of,
    live,
    stop_all,
)
from tests.support import CRON_TIMINGS, LEASE, query, start_server, start_servers, wait_for

# The settings' own defaults (lease 10 s, self-fence 7 s, heartbeat 2 s, poll 1 s): what a
# new user runs.
DEFAULT_ENV = {
    "TANDEM_SCHEDULER_ENABLED": "true",
    "TANDEM_MAINTENANCE_ENABLED": "false",
    "TANDEM_LOG_LEVEL": "warning",
}
COMPRESSED_ENV = {**CRON_TIMINGS, **FAULT_ENV}


@dataclass(frozen=True)
class Timing:
    env: dict[str, str]
    lease: float
    heartbeat: float
    trials: int


TIMINGS = {
    "compressed": Timing(COMPRESSED_ENV, LEASE, 0.5, 5),
    "default": Timing(DEFAULT_ENV, 10.0, 2.0, 3),
}


def owner_of(url: str, task: str) -> tuple[str, int] | None:
    rows = query(
        url, "SELECT running_instance, fence FROM tasks WHERE name = $1 AND is_running", task
    )
    return (rows[0]["running_instance"], rows[0]["fence"]) if rows else None


def claimed_again(url: str, task: str, fence: int) -> bool:
    """The task runs under a newer fence than ``fence``."""
    now = owner_of(url, task)
    return now is not None and now[1] > fence


# --- a silent partition of the owner ------------------------------------------------------


@dataclass(frozen=True)
class Effect:
    at: float
    instance: str
    fence: int


def effects(folder: Path) -> list[Effect]:
    found = []
    for path in folder.glob("*.log"):
        for line in path.read_text().splitlines():
            at, instance, fence = line.split()
            found.append(Effect(float(at), instance, int(fence)))
    return sorted(found, key=lambda e: e.at)


@dataclass(frozen=True)
class Cut:
    overlap: int  # effects of the cut-off run at or after the successor's first one
    stopped: float  # from the cut to the cut-off run's last effect
    takeover: float  # from the cut to the successor's first effect
    quiet: float  # between the two


def measure(folder: Path, fence: int, cut_at: float) -> Cut:
    made = effects(folder)
    old = [e.at for e in made if e.fence == fence]
    new = [e.at for e in made if e.fence > fence]
    assert old, "the cut-off run made effects"
    assert new, "its successor made effects"
    first_new = min(new)
    return Cut(
        overlap=sum(1 for at in old if at >= first_new),
        stopped=max(old) - cut_at,
        takeover=first_new - cut_at,
        quiet=first_new - max(old),
    )


def partition_trials(
    url: str, pg_port: int, log_dir: Path, timing: Timing, mix: int = 0
) -> list[Cut]:
    """Two instances, each behind a proxy of its own, run a never-ending task that makes an
    outside effect every 0.2 s; its owner is cut off (nothing forwarded, nothing closed) until
    the other runs the task, then healed; ``timing.trials`` times, the owners taking turns
    (the healed instance must have rejoined: it owns the task in the next trial). ``mix``: that
    many API schedules beside it (cluster.add_api_schedules)."""
    folder = log_dir / f"effects-{time.monotonic_ns()}"
    folder.mkdir()
    env = {
        **timing.env,
        "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:effects",
        "TANDEM_TEST_EFFECTS": str(folder),
    }
    fresh = 2 * timing.heartbeat
    cuts: list[Cut] = []
    with partition_proxy("127.0.0.1", pg_port) as pa, partition_proxy("127.0.0.1", pg_port) as pb:
        servers = [start_server(p.url_for(url), log_dir, extra_env=env) for p in (pa, pb)]
        try:
            proxies = dict(zip(instances_of(url, servers, fresh), (pa, pb), strict=True))
            if mix:
                add_api_schedules(url, mix)
            for _ in range(timing.trials):
                wait_for(lambda: owner_of(url, "Effect") is not None, 3 * timing.lease + 10)
                owner, fence = owner_of(url, "Effect") or ("", 0)
                proxy = proxies[owner]
                cut_at = time.time()
                proxy.partition()
                try:
                    wait_for(functools.partial(claimed_again, url, "Effect", fence), 60)
                    time.sleep(1.5)  # room for a late effect of the cut-off run to show
                finally:
                    proxy.heal()
                wait_for(functools.partial(live, url, owner, fresh), 60)
                cuts.append(measure(folder, fence, cut_at))
        finally:
            pa.heal()
            pb.heal()
            stop_all(servers)
    return cuts


def describe_cuts(label: str, cuts: list[Cut]) -> str:
    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f} s"

    return (
        f"{label}: {len(cuts)} cuts; effects of the cut-off run after its successor's first: "
        f"{[c.overlap for c in cuts]}; it stopped {span([c.stopped for c in cuts])} after the "
        f"cut; the successor started {span([c.takeover for c in cuts])} after it; quiet "
        f"between them {span([c.quiet for c in cuts])}"
    )


@dataclass(frozen=True)
class Kill:
    swept: float  # from the kill to the run recorded lost
    recovered: float  # from the kill to the task running elsewhere
    error: str  # the lost run's recorded error
    within_lease: bool  # the successor started before the lease could have expired


def kill_trials(
    url: str, log_dir: Path, env: dict[str, str], lease: float, kills: int, mix: int = 0
) -> list[Kill]:
    """Three instances run a long task (tests.scheduler.registries:long, its probe table in
    the database); SIGKILL its owner ``kills`` times, starting a replacement each time.
    ``mix``: that many API schedules beside it (cluster.add_api_schedules)."""
    env = {**env, "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:long"}
    servers = start_servers(url, log_dir, 3, extra_env=env)
    if mix:
        add_api_schedules(url, mix)
    found: list[Kill] = []
    try:
        for _ in range(kills):
            ids = instances_of(url, servers, 2 * lease)
            wait_for(lambda: owner_of(url, "Long") is not None, 30)
            owner, fence = owner_of(url, "Long") or ("", 0)
            victim = servers[ids.index(owner)]
            # Read before the kill: its session ends, and its runs are swept, within ms.
            killed = database_now(url)
            victim.stop(signal.SIGKILL)
            wait_for(functools.partial(claimed_again, url, "Long", fence), 2 * lease + 10)
            lost, successor = query(
                url,
                "SELECT h.instance_id, h.status, h.error, h.started_at, h.finished_at "
                "FROM task_history h JOIN tasks t ON t.id = h.task_id AND t.name = 'Long' "
                "WHERE h.fence IN ($1::bigint, $1::bigint + 1) ORDER BY h.fence",
                fence,
            )
            assert (lost["instance_id"], lost["status"]) == (owner, "lost")
            found.append(
                Kill(
                    swept=(lost["finished_at"] - killed).total_seconds(),
                    recovered=(successor["started_at"] - killed).total_seconds(),
                    error=lost["error"],
                    within_lease=successor["started_at"] < killed + timedelta(seconds=lease),
                )
            )
            servers.remove(victim)
            servers.append(start_server(url, log_dir, extra_env=env))
    finally:
        stop_all(servers)
    return found
