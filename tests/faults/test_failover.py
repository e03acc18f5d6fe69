"""A primary failover for real: Patroni over etcd, two PostgreSQL nodes with synchronous
replication, Tandem on the multi-host URL with target_session_attrs=read-write. The leader
is killed during a stream of keyed withdrawals and a running cron."""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from tandem.core.migrations import upgrade_to_head
from tandem.loadtest.client import fetch
from tests.faults.common import (
    CRON_ENV,
    assert_honest,
    code_of,
    ran_since,
    stale_running,
    withdrawal,
)
from tests.faults.patroni import patroni_cluster
from tests.support import LEASE, Server, query, start_servers, wait_for

WORKERS = 16


@dataclass
class Attempt:
    key: str
    sent_at: float
    status: int
    code: str | None


async def stream_withdrawals(
    servers: list[Server], user: int, until: asyncio.Event
) -> list[Attempt]:
    """Keyed withdrawals of 1, WORKERS at a time, round robin over the instances, until told
    to stop; one new key per request."""
    attempts: list[Attempt] = []

    async def worker(index: int) -> None:
        n = index
        while not until.is_set():
            server = servers[n % len(servers)]
            n += 1
            key = f"f-{uuid.uuid4().hex}"
            request = withdrawal(server, user, key, amount=1)
            sent = time.monotonic()
            result = await fetch("127.0.0.1", server.port, request, 60)
            assert_honest([result])
            attempts.append(Attempt(key, sent, result.status, code_of(result)))
            if result.status != 200:
                await asyncio.sleep(0.05)

    await asyncio.gather(*(worker(i) for i in range(WORKERS)))
    return attempts


async def retry_until_settled(servers: list[Server], user: int, keys: list[str]) -> list[int]:
    """The final status of each key, retrying 503s with the same key."""
    statuses = []
    for i, key in enumerate(keys):
        server = servers[i % len(servers)]
        request = withdrawal(server, user, key, amount=1)
        for _ in range(60):
            result = await fetch("127.0.0.1", server.port, request, 60)
            assert_honest([result])
            if result.status != 503:
                break
            await asyncio.sleep(0.5)
        statuses.append(result.status)
    return statuses


def test_leader_killed_during_withdrawals_and_cron(log_dir: Path) -> None:
    """Every acknowledged withdrawal is on the new primary, every 503 settles by a keyed retry
    (each withdrawal applied exactly once), the wallet answers 2xx again soon after the new
    leader, and no cron run is lost silently or overlaps another."""
    with patroni_cluster(nodes=2) as cluster:
        url = cluster.url
        upgrade_to_head(url)  # through the multi-host URL, as a deployment would
        query(url, "CREATE TABLE IF NOT EXISTS probe (x int)")
        servers = start_servers(url, log_dir, 2, extra_env=CRON_ENV)
        try:
            initial = 1_000_000
            user: int = query(url, "INSERT INTO users (balance) VALUES ($1) RETURNING id", initial)[
                0
            ]["id"]
            wait_for(lambda: ran_since(url, None) >= 4, 30)
            old_leader = cluster.leader()
            assert old_leader is not None

            async def scenario() -> tuple[list[Attempt], float, float]:
                stop = asyncio.Event()
                stream = asyncio.create_task(stream_withdrawals(servers, user, stop))
                await asyncio.sleep(3)
                cluster.kill_node(old_leader)
                killed = time.monotonic()
                await asyncio.to_thread(cluster.wait_for_leader, 90, old_leader)
                elected = time.monotonic()
                await asyncio.sleep(4)  # the stream goes on against the new primary
                stop.set()
                return await stream, killed, elected

            attempts, killed, elected = asyncio.run(scenario())
            after = sorted(a.sent_at for a in attempts if a.status == 200 and a.sent_at > killed)
            assert after, "no withdrawal succeeded after the failover"
            pause = after[0] - killed
            print(
                f"failover: new leader {elected - killed:.1f} s after the kill; first 2xx "
                f"{pause:.1f} s after the kill ({after[0] - elected:+.1f} s from the new leader)"
            )
            codes = [a.code for a in attempts if a.status == 503]
            print(
                f"{len(attempts)} withdrawals: {sum(a.status == 200 for a in attempts)} ok, "
                f"{codes.count('database_unavailable')} unavailable, "
                f"{codes.count('outcome_unknown')} unknown"
            )
            acknowledged = [a.key for a in attempts if a.status == 200]
            final = asyncio.run(retry_until_settled(servers, user, [a.key for a in attempts]))
            assert set(final) == {200}, {s: final.count(s) for s in set(final)}
            # Each key applied exactly once, every acknowledged one among them.
            balance = query(url, "SELECT balance FROM users WHERE id = $1", user)[0]["balance"]
            assert balance == initial - len(final)
            applied = {r["key"] for r in query(url, "SELECT key FROM idempotency_keys")}
            assert set(acknowledged) <= applied

            # The cron: running again, nothing stuck as running, no two runs of a task at once.
            since = query(url, "SELECT clock_timestamp() AS t")[0]["t"]
            wait_for(lambda: ran_since(url, since) >= 3, 30)
            wait_for(lambda: not stale_running(url), 3 * LEASE + 10)
            overlaps = query(
                url,
                "SELECT count(*) AS n FROM task_history a JOIN task_history b "
                "ON a.task_id = b.task_id AND a.id < b.id AND tstzrange(a.started_at, "
                "coalesce(a.finished_at, 'infinity')) && tstzrange(b.started_at, "
                "coalesce(b.finished_at, 'infinity'))",
            )[0]["n"]
            assert overlaps == 0
            statuses = {r["status"] for r in query(url, "SELECT DISTINCT status FROM task_history")}
            print(f"cron run statuses across the failover: {sorted(statuses)}")
        finally:
            for server in servers:
                server.stop()
