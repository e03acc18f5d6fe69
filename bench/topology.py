"""What does the deployment topology cost or buy on this machine?

    python bench/topology.py [--runs 3] [--variants abcd] [--database-url URL]

The same burst as bench/wallet.py's, against each topology: 10000 withdrawals of 2 from a fresh
user holding 10000, sent at once from this process, one connection each (``withdraw_burst``).
Every burst must end exactly 5000 succeeded / 5000 refused / 0 other, balance 0.

- (a) one ``tandem serve``, reached directly: the baseline.
- (b) five instances on one port with SO_REUSEPORT (``tandem serve --reuse-port``, as
  ``tandem cluster`` runs them): the kernel spreads the connections over the five, no proxy.
- (c) the same five, each also on a port of its own (``--direct-port``), behind
  deploy/nginx/nginx.conf run by the system nginx. As in tests/deploy/test_nginx.py, only two
  things differ from the shipped files: servers.conf lists the direct ports (the container's
  finds the replicas by DNS), and nginx listens on a free port instead of 8080. Its access log
  (10000 lines a burst, buffered) goes to a file: the shipped config's cost includes it.
- (d) (a)'s instance behind the same nginx config: nginx's own cost, with one upstream.
Without ``nginx`` on PATH, (c) and (d) are skipped with a note.

All instances run with the scheduler off, each with the settings' database pool (so (b) and
(c) hold five times the connections of (a), all queueing on the same row lock). Each topology
first gets a warm-up burst that is not counted. With ``--runs N`` the topologies run N times,
interleaved, the order rotated each run; a ratio x/a is taken within a run (a slow spell of a
shared box weighs on both sides) and the table shows each run and the median.

How to read it: a ratio below 1 means the topology finishes the burst sooner than one
instance; above 1, it costs. The work is serialised on one row, so more instances cannot buy
database throughput, only HTTP parsing, JSON and connection handling spread over processes —
which helps only where there are idle cores: PostgreSQL, the instances, nginx and this client
share this machine's CPUs. "served" shows how evenly the kernel's hash (b) or nginx's round
robin (c) spread the burst; the CPU table shows where the CPU went in each topology (CPU
seconds of each group during the burst, median over the runs; "machine busy" is the share of
all CPUs busy with anything). "accept queue overflows" counts the connections the kernel
dropped during the burst because a listening socket's queue was full (the app asks for a
backlog of 16384; the kernel caps it at net.core.somaxconn, printed at the start). The
connecting side's TCP tries again after 1 s, then 3 s: this client waits for that (its timeout
is 60 s), nginx's proxy_connect_timeout (2 s) does not, and then answers 503 — an outcome the
burst counts as wrong. Figures are for comparing on one box, not absolutes.
Prints figures; exits 1 only when a burst's outcome was wrong or something failed to start.
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from common import (  # bench/common.py: bench/ is first on sys.path when this runs as a script
    AMOUNT,
    READY_TIMEOUT,
    CpuMeter,
    ServeProcess,
    add_burst_arguments,
    bench_database,
    burst,
    check,
    console,
    divide,
    free_port,
    milliseconds,
    postgres_description,
    postgres_server,
    query,
    ratios,
    run_main,
    seconds,
    start_servers,
)
from rich.console import Console
from rich.table import Table

from tandem.cli import raise_fd_limit
from tandem.core.settings import Settings
from tandem.loadtest import BurstReport
from tandem.loadtest.client import build_request, fetch, run
from tests.deploy.edge import SERVE_PLAIN  # on sys.path through common
from tests.deploy.edge import prepare as prepare_nginx
from tests.support.metrics import sample_sum

# "2024/05/01 12:00:00 [alert] 1234#1234: *56 " before an error log message.
NGINX_LOG_PREFIX = re.compile(r"^\S+ \S+ (\[\w+\]) \d+#\d+: (?:\*\d+ )?")
INSTANCES = 5
WARMUP_REQUESTS = 1000
# The instances serve the wallet only: the cron's polls would take CPU from the burst.
INSTANCE_ENV = {"TANDEM_SCHEDULER_ENABLED": "false"}
UPDATES_METRIC = "tandem_wallet_balance_updates_total"


# --- nginx -----------------------------------------------------------------------------------


def child_pids(parent: int) -> list[int]:
    """The processes whose parent is ``parent`` (nginx's workers, of its master)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == parent:
            found.append(int(entry.name))
    return found


class Nginx:
    """deploy/nginx copied to ``folder`` and run there by the system nginx in front of the
    given ports: servers.conf lists them, the listeners are on free ports instead of 8080 and
    8443, and the plain one serves Tandem (tandem.conf, limits included) instead of redirecting
    to HTTPS (SERVE_PLAIN: the load client speaks no TLS); the rest is the files as shipped.
    The copy is the deployment tests' own (tests/deploy/edge.prepare), so the two cannot drift
    apart when the shipped config changes."""

    def __init__(self, binary: str, upstream_ports: Sequence[int], folder: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        servers = [f"127.0.0.1:{port}" for port in upstream_ports]
        conf = prepare_nginx(folder, servers, self.port, SERVE_PLAIN)
        self.error_log = folder / "error.log"
        command = [binary, "-p", str(folder), "-c", str(conf)]
        command += ["-g", f"pid {folder / 'nginx.pid'}; daemon off;"]
        with (folder / "access.log").open("wb") as out, self.error_log.open("wb") as err:
            self.process = subprocess.Popen(command, stdout=out, stderr=err, start_new_session=True)
        self.workers: list[int] = []

    def wait_ready(self, deadline: float) -> None:
        request = build_request("GET", "/nginx/health", f"127.0.0.1:{self.port}")
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"nginx exited:\n{self.error_log.read_text()}")
            if run(fetch("127.0.0.1", self.port, request, 2.0)).status == 200:
                self.workers = child_pids(self.process.pid)
                return
            time.sleep(0.05)
        raise RuntimeError(f"nginx not ready in time:\n{self.error_log.read_text()}")

    def messages(self) -> Counter[str]:
        """What nginx wrote to its error log, without the time and process: each message with
        how often it came."""
        lines = self.error_log.read_text(errors="replace").splitlines()
        return Counter(NGINX_LOG_PREFIX.sub(r"\1 ", line) for line in lines)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)  # graceful: flushes the access log
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)  # the workers too
                self.process.wait()


# --- topologies ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CpuSeconds:
    client: float
    instances: float
    nginx: float
    postgres: float  # NaN when PostgreSQL's processes are not on this machine
    machine: float  # share of all CPUs busy

    @property
    def total(self) -> float:
        parts = (self.client, self.instances, self.nginx, self.postgres)
        return sum(part for part in parts if part == part)  # NaN != NaN


@dataclass(slots=True)
class Topology:
    key: str
    label: str
    url: str
    instances: list[ServeProcess]
    nginx: Nginx | None = None
    reports: list[BurstReport] = field(default_factory=list)
    cpu: list[CpuSeconds] = field(default_factory=list)
    served: list[list[int]] = field(default_factory=list)  # per run, per instance, ascending
    overflows: list[float] = field(default_factory=list)  # per run

    def times(self) -> list[float]:
        return [report.wall_time for report in self.reports]

    def latency(self, q: float) -> list[float]:
        return [report.latency_quantile(q) for report in self.reports]


def updates_served(instance: ServeProcess) -> int:
    """Balance updates this instance has answered so far, any outcome (from its /metrics)."""
    return round(sample_sum(instance.get("/metrics").decode(), UPDATES_METRIC))


def listen_overflows() -> int:
    """Connections this machine's TCP dropped so far because a listening socket's accept queue
    was full (the kernel caps it at net.core.somaxconn); the client retries them (SYN again
    after 1 s, 3 s, ...), which a connect timeout may not wait for."""
    lines = Path("/proc/net/netstat").read_text().splitlines()
    for names, values in itertools.pairwise(lines):
        if names.startswith("TcpExt:") and values.startswith("TcpExt:"):
            return int(dict(zip(names.split(), values.split(), strict=True))["ListenOverflows"])
    return 0


def postgres_pids(url: str) -> list[int]:
    """Every process of the server that pg_stat_activity lists (backends, WAL writer, ...)."""
    return [row["pid"] for row in query(url, "SELECT pid FROM pg_stat_activity")]


def measure(topology: Topology, requests: int, database_url: str) -> BurstReport:
    """One burst, with the CPU each group used and the updates each instance served."""
    groups = {
        "client": [os.getpid()],
        "instances": [instance.pid for instance in topology.instances],
        "nginx": topology.nginx.workers if topology.nginx else [],
        "postgres": postgres_pids(database_url),
    }
    watched = [pid for pids in groups.values() for pid in pids]
    before = [updates_served(instance) for instance in topology.instances]
    overflows = listen_overflows()
    meter = CpuMeter(watched)
    report = burst(topology.url, requests)
    topology.overflows.append(listen_overflows() - overflows)
    # A backend started during the burst counts from 0. (The backends that list them are
    # gone by the time they are read, so they count for nothing.)
    late = [pid for pid in postgres_pids(database_url) if pid not in watched]
    _, machine, used = meter.stop(late_pids=late)
    after = [updates_served(instance) for instance in topology.instances]

    def group(pids: Sequence[int]) -> float:
        known = [seconds for pid in pids if (seconds := used.get(pid)) is not None]
        return sum(known) if known else float("nan")

    topology.cpu.append(
        CpuSeconds(
            client=group(groups["client"]),
            instances=group(groups["instances"]),
            nginx=group(groups["nginx"]) if groups["nginx"] else 0.0,
            postgres=group([*groups["postgres"], *late]),
            machine=machine,
        )
    )
    topology.served.append(sorted(b - a for a, b in zip(before, after, strict=True)))
    topology.reports.append(report)
    return report


def rotated(items: Sequence[Topology], by: int) -> Iterator[Topology]:
    for index in range(len(items)):
        yield items[(index + by) % len(items)]


# --- the run ---------------------------------------------------------------------------------


def start_topologies(
    args: argparse.Namespace, url: str, workdir: Path, stack: ExitStack
) -> list[Topology]:
    nginx_binary = shutil.which("nginx")
    wanted = set(args.variants)
    if nginx_binary is None and wanted & {"c", "d"}:
        console.print("note: `nginx` is not on PATH: (c) and (d) are skipped", style="yellow")
        wanted -= {"c", "d"}

    def start_single(_: int) -> ServeProcess:
        return ServeProcess(url, workdir, label="single instance", env=INSTANCE_ENV, migrate=False)

    shared_port = free_port()

    def start_member(index: int) -> ServeProcess:
        return ServeProcess(
            url,
            workdir,
            label=f"instance {index + 1} of {INSTANCES}",
            env=INSTANCE_ENV,
            port=shared_port,
            reuse_port=True,
            direct_port=free_port(),
            migrate=False,
        )

    single = start_servers(stack, 1, start_single, ready_path="/health/ready")
    members = (
        start_servers(stack, INSTANCES, start_member, ready_path="/health/ready")
        if wanted & {"b", "c"}
        else []
    )

    def start_nginx(upstreams: Sequence[ServeProcess], name: str) -> Nginx:
        assert nginx_binary is not None
        proxy = Nginx(nginx_binary, [s.own_port for s in upstreams], workdir / name)
        stack.callback(proxy.stop)
        proxy.wait_ready(time.monotonic() + READY_TIMEOUT)
        return proxy

    topologies = [Topology("a", "one instance, direct", single[0].base_url, single)]
    if "b" in wanted:
        topologies.append(
            Topology("b", f"{INSTANCES} instances, SO_REUSEPORT", members[0].base_url, members)
        )
    if "c" in wanted:
        proxy = start_nginx(members, "nginx-5")
        label = f"nginx -> {INSTANCES} instances"
        topologies.append(Topology("c", label, proxy.base_url, members, proxy))
    if "d" in wanted:
        proxy = start_nginx(single, "nginx-1")
        topologies.append(Topology("d", "nginx -> 1 instance", proxy.base_url, single, proxy))
    return topologies


def run_bench(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> int:
    server_url, where = postgres_server(args.database_url, workdir)
    url = stack.enter_context(bench_database(server_url, "topology"))
    console.print(
        f"{postgres_description(url)} ({where}); {os.cpu_count()} CPUs; "
        f"service pool {Settings().db_pool_size} connections per instance; "
        f"somaxconn {Path('/proc/sys/net/core/somaxconn').read_text().strip()}",
        soft_wrap=True,
    )
    topologies = start_topologies(args, url, workdir, stack)
    for topology in topologies:
        if topology.nginx is not None:
            workers = len(topology.nginx.workers)
            console.print(f"({topology.key}) nginx: {workers} workers", soft_wrap=True)
    console.print(f"all started; warm-up: {WARMUP_REQUESTS} withdrawals each (not counted)")
    failures: list[str] = []
    for topology in topologies:
        check(burst(topology.url, WARMUP_REQUESTS), f"warm-up ({topology.key})", failures)

    for index in range(args.runs):
        for topology in rotated(topologies, index):
            time.sleep(1)  # let the previous burst's sockets and backends wind down
            report = measure(topology, args.requests, url)
            check(report, f"run {index + 1} ({topology.key}) {topology.label}", failures)
        console.print(
            f"run {index + 1}/{args.runs}: "
            + ", ".join(f"({t.key}) {t.reports[-1].wall_time:.2f} s" for t in topologies)
        )

    for topology in topologies:
        if topology.nginx is None:
            continue
        # nginx's master runs as root here; a worker that cannot take the config's
        # worker_rlimit_nofile keeps the lower limit: worth knowing, not a failure.
        for message, count in topology.nginx.messages().most_common(5):
            console.print(
                f"nginx ({topology.key}) said ({count}x): {message}",
                style="yellow",
                markup=False,
                soft_wrap=True,
            )
    show(figures(args, topologies))
    show(cpu_table(topologies))
    baseline = topologies[0].times()
    for topology in topologies[1:]:
        ratio = statistics.median(divide(topology.times(), baseline))
        console.print(f"ratio {topology.key}/a ({topology.label}): {ratio:.2f}")
    for failure in failures:
        console.print(f"WRONG OUTCOME: {failure}", style="bold red", soft_wrap=True)
    return 1 if failures else 0


Render = Callable[[Sequence[float]], list[str]]


def counts(values: Sequence[float]) -> list[str]:
    return [f"{value:.0f}" for value in values]


def show(table: Table) -> None:
    """On a terminal, within its width; into a pipe or a file (where rich assumes 80 columns)
    as wide as the table wants, so that no cell is folded."""
    if console.is_terminal:
        console.print(table)
        return
    wanted = console.measure(table, options=console.options.update_width(1000)).maximum
    Console(width=max(wanted, console.width)).print(table)


def figures(args: argparse.Namespace, topologies: Sequence[Topology]) -> Table:
    median = statistics.median
    table = Table(
        title=f"Topology: {args.requests} withdrawals of {AMOUNT} from {args.requests}, all at once"
    )
    table.add_column("")
    for index in range(args.runs):
        table.add_column(f"run {index + 1}", justify="right")
    table.add_column("median", justify="right", style="bold")

    def add(label: str, values: Sequence[float], render: Render) -> None:
        table.add_row(label, *render(values), *render([median(values)]))

    baseline = topologies[0].times()
    for topology in topologies:
        add(f"({topology.key}) {topology.label}", topology.times(), seconds)
    table.add_section()
    for topology in topologies[1:]:
        add(f"    ratio {topology.key}/a", divide(topology.times(), baseline), ratios)
    table.add_section()
    for q, name in ((0.5, "p50"), (0.99, "p99")):
        for topology in topologies:
            add(f"    {name} latency ({topology.key})", topology.latency(q), milliseconds)
    for topology in topologies:
        add(f"    accept queue overflows ({topology.key})", topology.overflows, counts)
    spread = [t for t in topologies if len(t.instances) > 1]
    if spread:
        table.add_section()
    for topology in spread:
        lows = [served[0] for served in topology.served]
        highs = [served[-1] for served in topology.served]
        table.add_row(
            f"    served per instance ({topology.key}), min..max",
            *(f"{low}..{high}" for low, high in zip(lows, highs, strict=True)),
            f"{median(lows):.0f}..{median(highs):.0f}",
        )
    return table


def cpu_table(topologies: Sequence[Topology]) -> Table:
    table = Table(title="CPU seconds during a burst (median of the runs)")
    proxied = any(topology.nginx for topology in topologies)
    columns = ["", "wall", "client", "instances", *(["nginx"] if proxied else [])]
    for column in [*columns, "PostgreSQL", "all", "machine busy"]:
        table.add_column(column, justify="right" if column else "left")

    def cell(values: Sequence[float]) -> str:
        middle = statistics.median(values)
        return "-" if middle != middle else f"{middle:.2f}"  # NaN: not on this machine

    for topology in topologies:
        cpu = topology.cpu
        table.add_row(
            f"({topology.key})",
            f"{statistics.median(topology.times()):.2f} s",
            cell([c.client for c in cpu]),
            cell([c.instances for c in cpu]),
            *([cell([c.nginx for c in cpu]) if topology.nginx else ""] if proxied else []),
            cell([c.postgres for c in cpu]),
            cell([c.total for c in cpu]),
            f"{statistics.median([c.machine for c in cpu]):.0%}",
        )
    return table


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_burst_arguments(parser, runs=3, runs_help="repeat the bursts N times")
    parser.add_argument(
        "--variants", default="abcd", help="which topologies: a (always), b, c, d; default abcd"
    )
    args = parser.parse_args(argv)
    if not set(args.variants) <= set("abcd") or "a" not in args.variants:
        parser.error("--variants takes letters of abcd, a included (the ratios' baseline)")
    raise_fd_limit()
    return run_main("tandem-bench-topology-", partial(run_bench, args))


if __name__ == "__main__":
    sys.exit(main())
