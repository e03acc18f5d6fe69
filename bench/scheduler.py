"""How the cluster cron behaves with real instances on one PostgreSQL, in compressed time.

    python bench/scheduler.py [--instances 5] [--tasks 100] [--kills 5] [--cuts 3]
                              [--fault-timings both|compressed|defaults] [--database-url URL]

One run, three phases, each on a fresh database (migrated to head, dropped at the end):

- spread: N ``tandem serve`` processes run ``--tasks`` equal tasks (due every 2 s, busy 0.5 s;
  bench/scheduler_tasks.py) with the compressed timings of tests/scheduler/test_cluster.py.
  Once every instance has joined, a steady window gives the start lag of each run
  (``started_at - scheduled_for`` in task_history, both from the database clock) and the runs
  per instance.
- failover: SIGKILL the instance holding the most running tasks; from the database's clock
  right after the kill, when each of its runs is recorded ``lost`` as having ended (its
  owner's last heartbeat, so at most a heartbeat before the kill) and the time until the task
  runs again elsewhere (the history row with the next fence); beside it, the start
  lag of the other tasks meanwhile.
- faults, at the settings' defaults (lease 10 s, self-fence 7 s, heartbeat 2 s, poll 1 s) and
  with the compressed timings: ``--kills`` times SIGKILL the owner of a long run among three
  instances (kill -> recorded lost, kill -> running elsewhere: median and max), and
  ``--cuts`` times cut the owner of a run that makes an outside effect every 0.2 s off the
  database with a silent partition (effects of the cut-off run after its successor's first,
  and when each stopped and started), on a PostgreSQL of the phase's own (TCP, for the
  proxy). The trials are tests/faults/cron.py's, which the fault tests assert on.
- idle: N fresh instances with one task due once a day. Database work per idle instance over
  a window: statements from ``pg_stat_statements`` when the server has it loaded, else
  transactions (``xact_commit + xact_rollback`` of ``pg_stat_database``); the table says which.
  Also each instance's RSS at the start and end of the window, and its connections by
  ``application_name`` (matched to processes through ``ss -p`` where it can see them). By
  default the idle phase runs twice: with the compressed timings and with the settings'
  defaults, since the poll and heartbeat intervals set the idle cost.

Everything shares one machine; the figures are for comparing changes on the same box, not
absolutes. Prints figures; exits 1 only when something failed to run (an instance died, a
failed-over task never ran again, a phase timed out).
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
from common import (  # bench/common.py: bench/ is first on sys.path when this runs as a script
    READY_TIMEOUT,
    CpuMeter,
    ServeProcess,
    add_database_argument,
    bench_database,
    console,
    postgres_server,
    quantile,
    query,
    run_main,
    start_servers,
    value,
    with_database,
)
from rich.table import Table
from scheduler_tasks import (  # bench/, first on sys.path, as on the instances' PYTHONPATH
    EQUAL_BUSY_SECONDS,
    EQUAL_INTERVAL,
)
from sqlalchemy.engine import make_url

from tandem.core.settings import Settings

# The fault trials are the fault tests' own (tests/faults/cron.py): one harness, two readers.
# (common put the repository's root on sys.path.)
from tests.faults.cron import (
    COMPRESSED_ENV,
    DEFAULT_ENV,
    Timing,
    describe_cuts,
    kill_trials,
    partition_trials,
)
from tests.faults.postgres import throwaway_postgres
from tests.scheduler.registries import PROBE_TABLE
from tests.support import fresh_database

BENCH_DIR = Path(__file__).resolve().parent
EQUAL_INTERVAL_SECONDS = EQUAL_INTERVAL.total_seconds()
# Lines of an instance's log that say the scheduler had trouble (its log level is warning).
TROUBLE = {
    "self-fenced": "self-fencing",
    "lease lost": "lease lost to another instance",
    "fenced out": "fenced out",
    "poll failed": "scheduler poll failed",
    "heartbeat failed": "heartbeat failed",
    "tracebacks": "Traceback",
}


# --- timings ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Timings:
    label: str
    poll: float
    heartbeat: float
    lease: float
    self_fence: float
    steal: float
    claims_per_poll: int

    def env(self) -> dict[str, str]:
        """Set every timing explicitly, so none leaks in from this process's environment."""
        return {
            "TANDEM_SCHEDULER_POLL_INTERVAL": str(self.poll),
            "TANDEM_SCHEDULER_HEARTBEAT_INTERVAL": str(self.heartbeat),
            "TANDEM_SCHEDULER_LEASE": str(self.lease),
            "TANDEM_SCHEDULER_SELF_FENCE_AFTER": str(self.self_fence),
            "TANDEM_SCHEDULER_STEAL_AFTER": str(self.steal),
            "TANDEM_SCHEDULER_CLAIMS_PER_POLL": str(self.claims_per_poll),
            "TANDEM_SCHEDULER_TIME_SCALE": "1.0",
        }

    def describe(self) -> str:
        return (
            f"poll {self.poll:g} s, heartbeat {self.heartbeat:g} s, lease {self.lease:g} s, "
            f"self-fence {self.self_fence:g} s, steal {self.steal:g} s, "
            f"{self.claims_per_poll} claims/poll"
        )


# As tests/scheduler/test_cluster.py: compressed, with room for five Python processes and
# PostgreSQL on two shared cores.
COMPRESSED = Timings("compressed", 0.2, 0.5, 3.0, 2.0, 1.0, 50)


def default_timings() -> Timings:
    """The settings' declared defaults (not this process's environment or .env)."""

    def default(name: str) -> Any:
        return Settings.model_fields[name].default

    return Timings(
        "defaults",
        default("scheduler_poll_interval"),
        default("scheduler_heartbeat_interval"),
        default("scheduler_lease"),
        default("scheduler_self_fence_after"),
        default("scheduler_steal_after"),
        default("scheduler_claims_per_poll"),
    )


# --- PostgreSQL ------------------------------------------------------------------------------


def database_now(url: str) -> datetime:
    now: datetime = value(url, "SELECT clock_timestamp()")
    return now


# --- instances -------------------------------------------------------------------------------


class Instance(ServeProcess):
    """One ``tandem serve`` process with bench/ on its PYTHONPATH (for the task registries)."""

    def __init__(self, database_url: str, env: dict[str, str], log_dir: Path) -> None:
        python_path = os.pathsep.join(
            p for p in (str(BENCH_DIR), os.environ.get("PYTHONPATH")) if p
        )
        super().__init__(
            database_url,
            log_dir,
            label="instance",
            env={"PYTHONPATH": python_path, **env},
            migrate=False,
            # Not the caller's folder: a stray .env there must not change the settings.
            cwd=log_dir,
        )

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


def start_instances(
    url: str, count: int, env: dict[str, str], log_dir: Path, stack: ExitStack
) -> list[Instance]:
    """``count`` instances started together, live; stopped when ``stack`` closes."""
    return start_servers(stack, count, lambda _: Instance(url, env, log_dir))


def wait_joined(url: str, instances: Sequence[Instance], timings: Timings) -> dict[int, str]:
    """Wait until every instance is an active member; process id -> scheduler instance id."""
    deadline = time.monotonic() + READY_TIMEOUT
    pids = {instance.pid for instance in instances}
    while time.monotonic() < deadline:
        rows = query(
            url,
            "SELECT pid, id FROM instances WHERE status = 'active' "
            "AND heartbeat_at > clock_timestamp() - make_interval(secs => $1)",
            timings.lease,
        )
        members = {row["pid"]: row["id"] for row in rows if row["pid"] in pids}
        if len(members) == len(pids):
            return members
        for instance in instances:
            if not instance.alive:
                raise RuntimeError(f"instance {instance.pid} exited:\n{instance.log_tail()}")
        time.sleep(0.2)
    raise RuntimeError("not every instance joined the scheduler in time")


def check_alive(instances: Sequence[Instance], phase: str, failures: list[str]) -> None:
    for instance in instances:
        if not instance.killed and not instance.alive:
            failures.append(f"{phase}: instance {instance.pid} died:\n{instance.log_tail()}")


def count_trouble(instances: Sequence[Instance]) -> Counter[str]:
    found: Counter[str] = Counter()
    for instance in instances:
        text = instance.log()
        for label, needle in TROUBLE.items():
            found[label] += text.count(needle)
    return found


# --- measurements ---------------------------------------------------------------------------


@dataclass(slots=True)
class CpuUse:
    machine: float  # share of all CPUs busy (anything on the box)
    instances: list[float]  # cores used by each instance
    backends: float  # cores used by the bench database's backends together


def measure_cpu(meter: CpuMeter, instance_pids: Sequence[int], backends: Sequence[int]) -> CpuUse:
    elapsed, machine, used = meter.stop()

    def cores(pid: int) -> float:
        seconds = used[pid]
        return 0.0 if seconds is None else seconds / elapsed

    return CpuUse(
        machine=machine,
        instances=[cores(pid) for pid in instance_pids],
        backends=sum(cores(pid) for pid in backends),
    )


def backend_pids(url: str) -> list[int]:
    rows = query(
        url,
        "SELECT pid FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    return [row["pid"] for row in rows]


@dataclass(slots=True)
class Spread:
    seconds: float
    lags: list[float]
    runs_by_instance: list[int]  # ascending
    # Of each instance's runs (same order), those started at least the steal delay late.
    late_by_instance: list[int]
    statuses: Counter[str]
    cpu: CpuUse
    # How far apart the tasks' slots lie on their grid: near 0 means all are due at once.
    phase_spread: float


def measure_spread(
    url: str,
    instances: Sequence[Instance],
    members: dict[int, str],
    seconds: float,
    steal_after: float,
) -> Spread:
    """Start lag and runs per instance for the runs started within a window of ``seconds``,
    and the CPU it took."""
    instance_pids = [instance.pid for instance in instances]
    backends = backend_pids(url)
    meter = CpuMeter([*instance_pids, *backends])
    since = database_now(url)
    time.sleep(seconds)
    until = database_now(url)
    cpu = measure_cpu(meter, instance_pids, backends)
    rows = query(
        url,
        "SELECT instance_id, status, "
        "extract(epoch FROM started_at - scheduled_for)::float8 AS lag, "
        "extract(epoch FROM scheduled_for)::float8 AS slot "
        "FROM task_history WHERE started_at >= $1 AND started_at < $2",
        since,
        until,
    )
    per_instance = Counter(row["instance_id"] for row in rows)
    late = Counter(row["instance_id"] for row in rows if row["lag"] >= steal_after)
    order = sorted(members.values(), key=lambda member: per_instance[member])
    return Spread(
        seconds=(until - since).total_seconds(),
        lags=[row["lag"] for row in rows],
        runs_by_instance=[per_instance[member] for member in order],
        late_by_instance=[late[member] for member in order],
        statuses=Counter(row["status"] for row in rows),
        cpu=cpu,
        phase_spread=circular_spread([row["slot"] for row in rows], EQUAL_INTERVAL_SECONDS),
    )


def circular_spread(values: Sequence[float], period: float) -> float:
    """The shortest arc of a circle of length ``period`` that holds every value (mod period)."""
    phases = sorted(v % period for v in values)
    if len(phases) < 2:
        return 0.0
    gaps = [b - a for a, b in itertools.pairwise(phases)] + [phases[0] + period - phases[-1]]
    return period - max(gaps)


@dataclass(slots=True)
class Failover:
    held: int  # runs the victim held when it was killed
    lost: int  # of those, recorded lost by a sweep
    swept: list[float]  # each one's recorded end (the owner's last heartbeat) minus the kill
    recovered: list[float]  # seconds from the kill until each task ran again elsewhere
    other_lags: list[float]  # start lag of the other tasks' runs meanwhile


VICTIM_RUNS = """
SELECT l.task_id, l.status,
       extract(epoch FROM l.finished_at - $2)::float8 AS swept,
       extract(epoch FROM n.started_at - $2)::float8 AS recovered
FROM task_history l
LEFT JOIN task_history n ON n.task_id = l.task_id AND n.fence = l.fence + 1
WHERE l.instance_id = $1 AND l.status IN ('running', 'lost')
"""


def measure_failover(
    url: str, instances: Sequence[Instance], members: dict[int, str], timings: Timings
) -> Failover:
    """SIGKILL the instance holding the most running tasks and follow its runs' recovery."""
    victim_id: str | None = None
    deadline = time.monotonic() + 10
    while victim_id is None and time.monotonic() < deadline:
        held = query(
            url,
            "SELECT running_instance FROM tasks WHERE is_running "
            "GROUP BY running_instance ORDER BY count(*) DESC LIMIT 1",
        )
        if held:
            victim_id = held[0]["running_instance"]
        else:
            time.sleep(0.05)
    if victim_id is None:
        raise RuntimeError("no instance held a running task to kill")
    victim = next(i for i in instances if members[i.pid] == victim_id)
    # Read before the kill: the database notices a killed session within milliseconds, so
    # its runs can be swept before a reading taken after the kill.
    killed_at = database_now(url)
    victim.kill()

    # Its runs: running until a sweep records them lost (its session ended; the victim lost
    # none before), ended at its last heartbeat; then each task runs again under the next
    # fence on another instance.
    rows: list[asyncpg.Record] = []
    deadline = time.monotonic() + 5 * timings.lease + 5
    while time.monotonic() < deadline:
        rows = query(url, VICTIM_RUNS, victim_id, killed_at)
        if rows and all(r["status"] == "lost" and r["recovered"] is not None for r in rows):
            break
        time.sleep(0.1)
    recovered_until = database_now(url)
    victim_tasks = [r["task_id"] for r in rows]
    others = query(
        url,
        "SELECT extract(epoch FROM started_at - scheduled_for)::float8 AS lag FROM task_history "
        "WHERE started_at >= $1 AND started_at < $2 AND NOT task_id = ANY($3::bigint[])",
        killed_at,
        recovered_until,
        victim_tasks,
    )
    return Failover(
        held=len(rows),
        lost=sum(1 for r in rows if r["status"] == "lost"),
        swept=[r["swept"] for r in rows if r["swept"] is not None],
        recovered=[r["recovered"] for r in rows if r["recovered"] is not None],
        other_lags=[r["lag"] for r in others],
    )


@dataclass(slots=True)
class Idle:
    timings: Timings
    unit: str  # what was counted: statements or transactions
    source: str
    per_instance_per_second: float
    rss_start: list[float]
    rss_end: list[float]
    connections: Counter[str]  # all instances, by application_name
    per_instance: list[Counter[str]] | None  # each instance's, when the sockets could be matched


def has_pg_stat_statements(url: str) -> bool:
    row = query(
        url,
        "SELECT EXISTS (SELECT FROM pg_available_extensions WHERE name = 'pg_stat_statements') "
        "AND 'pg_stat_statements' = ANY (string_to_array("
        "replace(current_setting('shared_preload_libraries'), ' ', ''), ','))",
    )[0]
    if not row[0]:
        return False
    try:
        query(url, "CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    except asyncpg.PostgresError:
        return False  # loaded, but not ours to install (no privilege)
    return True


def database_work(url: str, admin_url: str, name: str, statements: bool) -> int:
    if statements:
        # The view also lists this query (and its kind): leave them out.
        return int(
            value(
                url,
                "SELECT coalesce(sum(calls), 0) FROM pg_stat_statements "
                "WHERE dbid = (SELECT oid FROM pg_database WHERE datname = $1) "
                "AND query NOT ILIKE '%pg_stat_statements%'",
                name,
            )
        )
    # Read from another database, so these reads are not counted.
    return int(
        value(
            admin_url,
            "SELECT xact_commit + xact_rollback FROM pg_stat_database WHERE datname = $1",
            name,
        )
    )


_SS_LINE = re.compile(r"^(?P<netid>\S+)\s+\S+\s+\d+\s+\d+\s+(?P<rest>.*)$")


def connections_by_instance(
    instances: Sequence[Instance], backends: dict[int, str]
) -> list[Counter[str]] | None:
    """Each instance's connections to the bench database by application_name, matched through
    the kernel's socket table (``ss -p``): an instance's socket whose other end belongs to one
    of the database's backends. None when ``ss`` is missing or cannot see the backends."""
    ss = shutil.which("ss")
    if ss is None:
        return None
    listing = subprocess.run([ss, "-xtpnH"], capture_output=True, text=True, check=False).stdout
    # (local end, peer end, owning pids) per socket; ends are "inode" (Unix) or "addr:port".
    sockets: list[tuple[str, str, set[int]]] = []
    for line in listing.splitlines():
        match = _SS_LINE.match(line)
        if match is None:
            continue
        fields = match["rest"].split()
        pids = {int(pid) for pid in re.findall(r"pid=(\d+)", match["rest"])}
        if match["netid"] == "u_str" and len(fields) >= 4:
            sockets.append((fields[1], fields[3], pids))
        elif match["netid"] == "tcp" and len(fields) >= 2:
            sockets.append((fields[0], fields[1], pids))
    owners: dict[str, set[int]] = {}
    for local, _, pids in sockets:
        owners.setdefault(local, set()).update(pids)
    result: list[Counter[str]] = []
    for instance in instances:
        found: Counter[str] = Counter()
        for _, peer, pids in sockets:
            if instance.pid in pids:
                for backend in owners.get(peer, set()) & backends.keys():
                    found[backends[backend]] += 1
        result.append(found)
    if sum(sum(found.values()) for found in result) == 0:
        return None
    return result


def measure_idle(
    server_url: str,
    timings: Timings,
    count: int,
    seconds: float,
    log_dir: Path,
    failures: list[str],
) -> Idle:
    """``count`` fresh instances with nothing due: their database work, memory, connections."""
    admin_url = with_database(server_url, "postgres")
    with ExitStack() as stack:
        url = stack.enter_context(bench_database(server_url, "idle"))
        name = make_url(url).database or ""
        statements = has_pg_stat_statements(url)
        env = {
            "TANDEM_SCHEDULER_ENABLED": "true",
            "TANDEM_MAINTENANCE_ENABLED": "false",  # only the bench's own tasks
            "TANDEM_SCHEDULER_TASKS": "scheduler_tasks:idle",
            **timings.env(),
        }
        instances = start_instances(url, count, env, log_dir, stack)
        wait_joined(url, instances, timings)
        # Past each instance's first claim (the daily task runs once, at once) and the
        # connections it opens on the way.
        time.sleep(timings.heartbeat + 2 * timings.poll + 1)
        rss_start = [instance.rss_mib() for instance in instances]
        work_start = database_work(url, admin_url, name, statements)
        started = time.monotonic()
        time.sleep(seconds)
        work_end = database_work(url, admin_url, name, statements)
        elapsed = time.monotonic() - started
        rss_end = [instance.rss_mib() for instance in instances]
        activity = query(
            admin_url,
            "SELECT pid, application_name FROM pg_stat_activity WHERE datname = $1",
            name,
        )
        backends = {row["pid"]: row["application_name"] for row in activity}
        per_instance = connections_by_instance(instances, backends)
        check_alive(instances, f"idle ({timings.label})", failures)
        trouble = count_trouble(instances)
        if trouble["tracebacks"]:
            failures.append(f"idle ({timings.label}): tracebacks in the instance logs")
    return Idle(
        timings=timings,
        unit="statements" if statements else "transactions",
        source="pg_stat_statements" if statements else "pg_stat_database xact_commit+rollback",
        per_instance_per_second=(work_end - work_start) / elapsed / count,
        rss_start=rss_start,
        rss_end=rss_end,
        connections=Counter(backends.values()),
        per_instance=per_instance,
    )


# --- figures --------------------------------------------------------------------------------


def lag_summary(values: Sequence[float]) -> str:
    if not values:
        return "no runs"
    return (
        f"p50 {quantile(values, 0.5):.2f} p90 {quantile(values, 0.9):.2f} "
        f"p99 {quantile(values, 0.99):.2f} max {max(values):.2f} s (n={len(values)})"
    )


def mib_range(values: Sequence[float]) -> str:
    low, high = min(values), max(values)
    return f"{low:.0f} MiB" if round(low) == round(high) else f"{low:.0f}..{high:.0f} MiB"


def seconds_summary(values: Sequence[float]) -> str:
    if not values:
        return "none"
    return f"p50 {quantile(values, 0.5):.2f} max {max(values):.2f} s"


def figures(
    args: argparse.Namespace,
    spread: Spread,
    failover: Failover,
    cron_trouble: Counter[str],
    idles: Sequence[Idle],
) -> Table:
    timings = COMPRESSED
    table = Table(title=f"Cluster cron: {args.instances} instances, {args.tasks} equal tasks")
    table.add_column("figure")
    table.add_column("value", justify="right")
    table.add_column("for comparison")

    runs = sum(spread.runs_by_instance)
    other = {s: n for s, n in spread.statuses.items() if s not in ("succeeded", "running")}
    table.add_row(
        f"steady: runs in {spread.seconds:.1f} s",
        f"{runs} ({runs / spread.seconds:.1f}/s)",
        f"{args.tasks / EQUAL_INTERVAL_SECONDS:g}/s due; not succeeded: {other or 'none'}",
    )
    table.add_row("  start lag", lag_summary(spread.lags), "started_at - scheduled_for")
    late = sum(1 for lag in spread.lags if lag >= timings.steal)
    table.add_row(
        f"  started >= {timings.steal:g} s late",
        f"{late} ({late / max(len(spread.lags), 1):.0%})",
        "steal delay: past it any instance claims, fair share or not",
    )
    table.add_row(
        "  slot phases of all tasks",
        f"within {spread.phase_spread * 1000:.0f} ms",
        f"of each {EQUAL_INTERVAL_SECONDS:g} s: near 0 = all due at once",
    )
    low, high = min(spread.runs_by_instance), max(spread.runs_by_instance)
    table.add_row(
        "  runs per instance",
        " ".join(str(n) for n in spread.runs_by_instance),
        f"max/min {high / low:.2f}" if low else "an instance ran nothing",
    )
    table.add_row(
        f"  of which >= {timings.steal:g} s late",
        " ".join(str(n) for n in spread.late_by_instance),
        "",
    )
    cpu = spread.cpu
    table.add_row(
        "  CPU, cores",
        f"instance {statistics.fmean(cpu.instances):.2f} (max {max(cpu.instances):.2f}), "
        f"backends {cpu.backends:.2f}",
        f"machine {cpu.machine:.0%} busy of {os.cpu_count()} CPUs",
    )

    table.add_section()
    table.add_row("failover: runs held / lost", f"{failover.held} / {failover.lost}", "")
    table.add_row(
        "  recorded end - kill",
        seconds_summary(failover.swept),
        f"its last heartbeat: within {timings.heartbeat:g} s before the kill",
    )
    table.add_row(
        "  kill -> running elsewhere",
        seconds_summary(failover.recovered),
        f"a poll once the session ends; lease + poll = {timings.lease + timings.poll:g} s",
    )
    table.add_row("  other tasks' start lag", lag_summary(failover.other_lags), "meanwhile")
    trouble = ", ".join(f"{label} {n}" for label, n in cron_trouble.items() if n) or "none"
    table.add_row("  warnings in instance logs", trouble, "steady + failover")

    for idle in idles:
        growth = [end - start for start, end in zip(idle.rss_start, idle.rss_end, strict=True)]
        table.add_section()
        table.add_row(
            f"idle ({idle.timings.label}): {idle.unit}/s",
            f"{idle.per_instance_per_second:.1f} per instance",
            f"{idle.source}; poll {idle.timings.poll:g} s, heartbeat {idle.timings.heartbeat:g} s",
        )
        table.add_row(
            "  RSS start -> end",
            f"{mib_range(idle.rss_start)} -> {mib_range(idle.rss_end)}",
            f"largest change {max(growth, key=abs):+.1f} MiB",
        )
        if idle.per_instance is not None:
            shapes = Counter(
                ", ".join(f"{app} {n}" for app, n in sorted(found.items()))
                for found in idle.per_instance
            )
            each = "; ".join(f"{shape} (x{n})" for shape, n in shapes.items())
        else:
            each = "not matched to processes (no ss, or no permission)"
        totals = ", ".join(f"{app or '(none)'} {n}" for app, n in sorted(idle.connections.items()))
        table.add_row("  connections per instance", each, f"all: {totals}")
    return table


# --- the run --------------------------------------------------------------------------------


def run_faults(args: argparse.Namespace, workdir: Path, failures: list[str]) -> list[str]:
    """SIGKILL failover and silent partitions, at the timings ``--fault-timings`` names: the
    default settings (what a deployment runs), the compressed ones, or both (partitions)."""
    lines: list[str] = []
    defaults = default_timings()
    every = {
        "defaults": Timing(DEFAULT_ENV, defaults.lease, defaults.heartbeat, args.cuts),
        "compressed": Timing(COMPRESSED_ENV, COMPRESSED.lease, COMPRESSED.heartbeat, args.cuts),
    }
    timings = [
        (label, timing) for label, timing in every.items() if args.fault_timings in ("both", label)
    ]
    # The kills run at one timing: the default settings unless only the compressed are asked.
    kill_label = "compressed" if args.fault_timings == "compressed" else "defaults"
    kill_timing = every[kill_label]
    kill_words = "default settings" if kill_label == "defaults" else "compressed timings"
    # A PostgreSQL of the phase's own, on TCP (the partition proxy forwards TCP), as the
    # fault tests do.
    with throwaway_postgres() as pg, fresh_database(pg.url) as url:
        port = pg.port
        query(url, PROBE_TABLE)
        if args.kills:
            console.print(f"faults: {args.kills} SIGKILLs of the owner, {kill_words} ...")
            kills = kill_trials(url, workdir, kill_timing.env, kill_timing.lease, args.kills)
            swept, recovered = [k.swept for k in kills], [k.recovered for k in kills]
            lines.append(
                f"SIGKILL of the owner, {kill_words} (lease {kill_timing.lease:g} s), "
                f"{len(kills)} kills: recorded as lost at median {statistics.median(swept):.2f} "
                f"max {max(swept):.2f} s from the kill (its last heartbeat); "
                "running elsewhere after median "
                f"{statistics.median(recovered):.2f} max {max(recovered):.2f} s "
                f"({sum(k.error.startswith('session ended') for k in kills)} noticed by the "
                "ended session, the rest by the lease)"
            )
        for label, timing in timings if args.cuts else []:
            console.print(f"faults: {args.cuts} silent partitions of the owner, {label} ...")
            cuts = partition_trials(url, port, workdir, timing)
            lines.append(describe_cuts(f"silent partition, {label}", cuts))
            if any(c.overlap for c in cuts):
                failures.append(f"partition ({label}): the cut-off run overlapped its successor")
    return lines


def run_bench(args: argparse.Namespace, workdir: Path) -> int:
    began = time.monotonic()
    server_url, where = postgres_server(args.database_url, workdir)
    failures: list[str] = []
    timings = COMPRESSED
    admin_url = with_database(server_url, "postgres")
    version = value(admin_url, "SELECT current_setting('server_version')")
    console.print(
        f"PostgreSQL {version} ({where}); {os.cpu_count()} CPUs; {args.instances} instances; "
        f"{args.tasks} tasks every {EQUAL_INTERVAL_SECONDS:g} s, busy {EQUAL_BUSY_SECONDS:g} s; "
        f"{timings.describe()}",
        soft_wrap=True,
    )

    # --- spread and failover, on one cluster -------------------------------------------------
    with ExitStack() as phase:
        url = phase.enter_context(bench_database(server_url, "cron"))
        env = {
            "TANDEM_SCHEDULER_ENABLED": "true",
            "TANDEM_MAINTENANCE_ENABLED": "false",  # only the bench's own tasks
            "TANDEM_SCHEDULER_TASKS": "scheduler_tasks:equal",
            "TANDEM_BENCH_TASKS": str(args.tasks),
            **timings.env(),
        }
        instances = start_instances(url, args.instances, env, workdir, phase)
        members = wait_joined(url, instances, timings)
        # Each instance waits a heartbeat before its first claim; then the tasks due at start
        # (all of them) are worked off. Count from after that.
        time.sleep(timings.heartbeat + args.settle)
        console.print(f"{args.instances} instances joined; steady window {args.steady:g} s ...")
        spread = measure_spread(url, instances, members, args.steady, timings.steal)
        check_alive(instances, "spread", failures)
        console.print("failover: SIGKILL the instance holding the most running tasks ...")
        failover = measure_failover(url, instances, members, timings)
        if failover.held == 0 or len(failover.recovered) < failover.held:
            failures.append(
                f"failover: {failover.held - len(failover.recovered)} of {failover.held} "
                "killed runs did not run again in time"
            )
        check_alive(instances, "failover", failures)
        cron_trouble = count_trouble(instances)
        if cron_trouble["tracebacks"]:
            failures.append("spread/failover: tracebacks in the instance logs")

    # --- faults ------------------------------------------------------------------------------
    fault_lines = run_faults(args, workdir, failures)

    # --- idle ----------------------------------------------------------------------------------
    idle_timings = {
        "both": [COMPRESSED, default_timings()],
        "compressed": [COMPRESSED],
        "defaults": [default_timings()],
    }[args.idle_timings]
    idles: list[Idle] = []
    for idle_timing in idle_timings:
        console.print(f"idle ({idle_timing.label} timings): {args.idle:g} s window ...")
        idles.append(
            measure_idle(server_url, idle_timing, args.instances, args.idle, workdir, failures)
        )

    console.print(figures(args, spread, failover, cron_trouble, idles))
    for line in fault_lines:
        console.print(line, soft_wrap=True)
    console.print(f"total run time {time.monotonic() - began:.0f} s")
    for failure in failures:
        console.print(f"FAILED: {failure}", style="bold red")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--instances", type=int, default=5)
    parser.add_argument("--tasks", type=int, default=100)
    add_database_argument(parser)
    parser.add_argument("--steady", type=float, default=20.0, help="steady window, seconds")
    parser.add_argument(
        "--settle", type=float, default=3.0, help="seconds after joining before the window"
    )
    parser.add_argument("--idle", type=float, default=20.0, help="idle window, seconds")
    parser.add_argument("--kills", type=int, default=5, help="SIGKILL trials (0: none)")
    parser.add_argument("--cuts", type=int, default=3, help="partitions per timing (0: none)")
    parser.add_argument(
        "--idle-timings", choices=("both", "compressed", "defaults"), default="both"
    )
    parser.add_argument(
        "--fault-timings", choices=("both", "compressed", "defaults"), default="both"
    )
    args = parser.parse_args(argv)
    if args.instances < 2 or args.tasks < 1:
        parser.error("--instances must be at least 2 (one is killed) and --tasks positive")

    # Each phase has an ExitStack of its own (its instances stop before the next phase).
    return run_main("tandem-bench-scheduler-", lambda workdir, _: run_bench(args, workdir))


if __name__ == "__main__":
    sys.exit(main())
