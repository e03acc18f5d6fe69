"""The change stream's cost and lag: how late do webhooks arrive, how fast does the delivery
worker send, and what do events cost the wallet's burst?

    python bench/events.py [--runs 3] [--requests 10000] [--rate 1000] [--seconds 10]
                           [--fan-out 10] [--fan-rate 100] [--relay-events 5000]
                           [--database-url URL]

One ``tandem serve`` with its housekeeping on (the delivery worker, ``tandem.events.relay``,
runs in it), and receivers in this process (tests/support/webhooks.py: real HTTP servers on
this machine, answering 204 at once), each an endpoint subscribed to ``balance.updated``:

- (a) steady: ``--rate`` deposits/s for ``--seconds`` seconds over keep-alive connections,
  spread over 1000 users, to one endpoint, the changes sent to an instance without the
  delivery worker (as in a cluster, where the worker runs on one instance of several), then
  to the worker's own instance (one process both serving the changes and delivering them),
  at the rate and at half of it: each event's delivery lag (its arrival at the receiver
  minus its ``createdAt``, the commit's instant by the database's clock on this same
  machine), p50 / p99 / max.
- (b) fan-out: ``--fan-out`` endpoints at ``--fan-rate`` changes/s, then at ``--rate`` (sent
  to the instance without the worker): the lag over every delivery.
- (c) throughput: ``--relay-events`` events already committed, replayed to one endpoint from
  before them: events/s from the replay to the last arrival (one delivery after another, in
  order, each its own signed POST).
- (d) burst: 10000 withdrawals of 2 from one user holding 10000, all at once, against this
  server with one endpoint subscribed (events written, stamped and delivered during the
  burst, by the same process), against a second server on the same database without a
  delivery worker of its own (as an instance of a cluster whose worker runs elsewhere: here,
  in the first server), and against the release before the change stream as far as the
  database is concerned: a third server on a second database whose event triggers are
  disabled and whose housekeeping (the delivery worker) is off. events_cost = on / off, for
  each (target: within 10 %).
  How far the relay lags during the burst: from the burst's last answer to the last event's
  arrival, and the largest lag of any of its events.

Everything shares one machine; with ``--runs N`` the bursts run N times each, interleaved,
and the table shows each run and the median. Exits 1 only when something failed to run or an
event was not delivered.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time
from collections.abc import Sequence
from contextlib import ExitStack
from datetime import datetime
from pathlib import Path

from common import (  # bench/common.py: bench/ is first on sys.path when this runs as a script
    AUTH,
    ServeProcess,
    bench_database,
    burst,
    check,
    console,
    positive_int,
    postgres_description,
    postgres_server,
    quantile,
    query,
    ratios,
    run_main,
    seconds,
    start_servers,
)
from rich.table import Table

from tandem.loadtest.client import build_request, run, send_keepalive
from tests.support.database import fetch
from tests.support.webhooks import Receiver

USERS = 1000
CONNECTIONS = 32
SERVER_ENV = {
    "TANDEM_SCHEDULER_ENABLED": "true",
    "TANDEM_MAINTENANCE_ENABLED": "true",
    "TANDEM_SCHEDULER_TASKS": "tests.support.registries:housekeeping",
    "TANDEM_WEBHOOKS_ALLOW_PRIVATE": "true",
}
BASELINE_ENV = {**SERVER_ENV, "TANDEM_MAINTENANCE_ENABLED": "false"}
# The release before the change stream, as far as the database goes: no event is written.
NO_EVENTS = [
    "ALTER TABLE ledger_entries DISABLE TRIGGER ledger_entries_events",
    "ALTER TABLE hold_events DISABLE TRIGGER hold_events_events",
    "ALTER TABLE task_history DISABLE TRIGGER task_history_events",
]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=positive_int, default=3, help="bursts of each kind")
    parser.add_argument("--requests", type=positive_int, default=10_000, help="burst size")
    parser.add_argument("--rate", type=positive_int, default=1000, help="changes/s, steady")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of a steady run")
    parser.add_argument("--fan-out", type=positive_int, default=10, help="endpoints")
    parser.add_argument("--fan-rate", type=positive_int, default=100, help="changes/s")
    parser.add_argument("--relay-events", type=positive_int, default=5000)
    parser.add_argument("--database-url", default=None)
    return parser.parse_args(argv)


def created(event: dict[str, object]) -> float:
    return datetime.fromisoformat(str(event["createdAt"]).replace("Z", "+00:00")).timestamp()


async def request(
    server: ServeProcess, method: str, path: str, body: dict[str, object] | None = None
) -> None:
    built = build_request(
        method, path, f"127.0.0.1:{server.port}", body, keep_alive=True, headers=AUTH
    )
    (result,) = await send_keepalive("127.0.0.1", server.port, built, 1, 1)
    if result.status not in (200, 201, 204):
        raise RuntimeError(f"{method} {path}: {result.describe()} {result.body[:300]!r}")


def make_users(server: ServeProcess, count: int) -> list[int]:
    request = build_request(
        "POST",
        "/users",
        f"127.0.0.1:{server.port}",
        {"balance": 0},
        keep_alive=True,
        headers=AUTH,
    )
    results = run(send_keepalive("127.0.0.1", server.port, request, count, 16))
    if any(r.status != 201 for r in results):
        raise RuntimeError("could not make the users")
    return [int(r.json()["userId"]) for r in results]


def deposits(server: ServeProcess, users: list[int], count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    host = f"127.0.0.1:{server.port}"
    return [
        build_request(
            "POST",
            "/balance/update",
            host,
            {"userId": rng.choice(users), "amount": 1},
            keep_alive=True,
            headers=AUTH,
        )
        for _ in range(count)
    ]


async def steady(
    server: ServeProcess, receivers: list[Receiver], requests: list[bytes], rate: float
) -> list[float]:
    """Sends ``requests`` at ``rate``; the lag of every delivery of their events."""
    before = [len(r.deliveries) for r in receivers]
    results = await send_keepalive(
        "127.0.0.1", server.port, requests, len(requests), CONNECTIONS, rate=rate
    )
    applied = sum(1 for r in results if r.status == 200)
    if applied != len(requests):
        raise RuntimeError(f"{len(requests) - applied} changes failed")
    if not await delivered(receivers, before, applied, 60):
        raise RuntimeError("events not delivered within 60 s of the last change")
    return [
        d.at - created(d.event)
        for r, b in zip(receivers, before, strict=True)
        for d in r.deliveries[b:]
    ]


async def delivered(
    receivers: list[Receiver], before: list[int], count: int, within: float
) -> bool:
    """Whether each receiver got ``count`` deliveries more than ``before`` within ``within``
    seconds."""
    deadline = time.monotonic() + within
    while any(len(r.deliveries) - b < count for r, b in zip(receivers, before, strict=True)):
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def lag_row(label: str, lags: list[float]) -> tuple[str, str]:
    return label, (
        f"p50 {quantile(lags, 0.5) * 1000:.0f} ms, p99 {quantile(lags, 0.99) * 1000:.0f} ms, "
        f"max {max(lags) * 1000:.0f} ms over {len(lags)} deliveries"
    )


def run_bench(args: argparse.Namespace, workdir: Path, stack: ExitStack) -> int:
    server_url, origin = postgres_server(args.database_url, workdir)
    on_url = stack.enter_context(bench_database(server_url, "events_on"))
    off_url = stack.enter_context(bench_database(server_url, "events_off"))
    for statement in NO_EVENTS:
        query(off_url, statement)
    console.print(f"{postgres_description(on_url)} ({origin})")

    def start(index: int) -> ServeProcess:
        if index == 0:
            return ServeProcess(on_url, workdir, label="Tandem, events on", env=SERVER_ENV)
        if index == 1:
            # The same database, no delivery worker of its own: as an instance of a cluster
            # whose worker runs elsewhere (here: in the first server).
            return ServeProcess(
                on_url, workdir, label="events on, worker elsewhere", env=BASELINE_ENV
            )
        return ServeProcess(off_url, workdir, label="Tandem, no events", env=BASELINE_ENV)

    on, elsewhere, off = start_servers(stack, 3, start, ready_path="/health/ready")
    rows: list[tuple[str, str]] = []

    async def receivers(count: int) -> list[Receiver]:
        """New endpoints, each with a receiver, once the delivery worker sends to them (it
        looks for new endpoints every second): a warm-up change, delivered, not counted."""
        made = [await Receiver().start() for _ in range(count)]
        for receiver in made:
            await request(
                on,
                "POST",
                "/webhook-endpoints",
                {"url": receiver.url, "types": ["balance.updated"]},
            )
        await steady(on, made, deposits(on, users, 1, 0), 1)
        return made

    users = make_users(on, min(USERS, max(10, args.rate)))

    async def measure_streams() -> None:
        one = await receivers(1)
        # The changes sent to an instance without the worker (a cluster's shape: the worker
        # runs on one instance of several), then to the worker's own instance, at the rate
        # and at half of it (one process then both serves the changes and delivers them).
        half = max(1, args.rate // 2)
        shapes = ((elsewhere, args.rate, "another"), (on, args.rate, "the worker's"))
        for server, rate, where in (*shapes, (on, half, "the worker's")):
            count = int(rate * args.seconds)
            lags = await steady(server, one, deposits(server, users, count, rate), rate)
            label = f"(a) {rate}/s for {args.seconds:g} s to {where} instance, 1 endpoint"
            rows.append(lag_row(label, lags))
        fan = await receivers(args.fan_out)
        every = [*one, *fan]
        count = int(args.fan_rate * args.seconds)
        lags = await steady(elsewhere, every, deposits(elsewhere, users, count, 2), args.fan_rate)
        rows.append(lag_row(f"(b) {args.fan_rate}/s, {len(every)} endpoints", lags))
        count = int(args.rate * args.seconds)
        lags = await steady(elsewhere, every, deposits(elsewhere, users, count, 3), args.rate)
        rows.append(lag_row(f"(b) {args.rate}/s, {len(every)} endpoints (no target)", lags))
        # The fan-out's endpoints deleted: (c) and (d) send to one.
        endpoints = await fetch(on_url, "SELECT id FROM webhook_endpoints ORDER BY id")
        for row in endpoints[1:]:
            await request(on, "DELETE", f"/webhook-endpoints/{row['id']}")
        for receiver in fan:
            await receiver.stop()
        # (c) the worker's throughput to one fast endpoint: a replay of committed events.
        replay_from = int((await fetch(on_url, "SELECT last_position FROM event_stream"))[0][0])
        await steady(on, one, deposits(on, users, args.relay_events, 4), args.rate * 4)
        endpoint = (await fetch(on_url, "SELECT min(id) FROM webhook_endpoints"))[0][0]
        arrived = len(one[0].deliveries)
        began = time.time()
        await request(
            on, "POST", f"/webhook-endpoints/{endpoint}/replay", {"from": str(replay_from)}
        )
        if not await delivered(one, [arrived], args.relay_events, 120):
            raise RuntimeError("the replay was not delivered within 120 s")
        replayed = one[0].deliveries[arrived:]
        took = replayed[-1].at - replayed[0].at
        rows.append(
            (
                "(c) delivery worker, 1 fast endpoint",
                f"{(len(replayed) - 1) / took:.0f} events/s ({len(replayed)} in {took:.2f} s, "
                f"the first {replayed[0].at - began:.2f} s after the replay was asked for)",
            )
        )
        # (d) needs the stream quiet: the other receivers' retries are few and backed off.
        burst_lags.extend(await bursts(one[0]))

    burst_lags: list[float] = []
    on_times: list[float] = []
    elsewhere_times: list[float] = []
    off_times: list[float] = []
    failures: list[str] = []
    tail: list[float] = []

    async def bursts(receiver: Receiver) -> list[float]:
        lags: list[float] = []
        for run_index in range(args.runs):
            variants = ((off, off_times), (on, on_times), (elsewhere, elsewhere_times))
            for server, times in variants:
                arrived = len(receiver.deliveries)
                report = await asyncio.to_thread(burst, server.base_url, args.requests)
                check(report, server.label, failures)
                times.append(report.wall_time)
                if server is not off:
                    ended = time.time()
                    applied = args.requests // 2
                    if not await delivered([receiver], [arrived], applied, 120):
                        failures.append("a burst's events were not delivered within 120 s")
                    mine = receiver.deliveries[arrived:]
                    if mine:
                        tail.append(mine[-1].at - ended)
                        lags.extend(d.at - created(d.event) for d in mine)
            console.print(f"burst run {run_index + 1}/{args.runs} done")
        return lags

    run(measure_streams())
    table = Table(title="the change stream", show_header=False)
    table.add_column("figure")
    table.add_column("value")
    for label, text in rows:
        table.add_row(label, text)
    table.add_row("(d) burst, no events (s)", " ".join(seconds(off_times)))
    table.add_row("(d) burst, events on, worker in this server (s)", " ".join(seconds(on_times)))
    table.add_row("(d) burst, events on, worker elsewhere (s)", " ".join(seconds(elsewhere_times)))
    for label, times in (
        ("worker in this server", on_times),
        ("worker elsewhere", elsewhere_times),
    ):
        ratio = statistics.median(times) / statistics.median(off_times)
        per_run = " ".join(ratios([a / b for a, b in zip(times, off_times, strict=True)]))
        table.add_row(f"(d) events_cost, {label}: on / off", f"{ratio:.2f}x (runs: {per_run})")
    if burst_lags:
        table.add_row(*lag_row("(d) burst events' lag", burst_lags))
        table.add_row("(d) last event after the burst's last answer", " ".join(seconds(tail)))
    console.print(table)
    for failure in failures:
        console.print(f"FAILED: {failure}", style="bold red")
    return 1 if failures else 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    return run_main("tandem-bench-events-", lambda workdir, stack: run_bench(args, workdir, stack))


if __name__ == "__main__":
    raise SystemExit(main())
