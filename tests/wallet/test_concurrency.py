"""Concurrency through a real server process: the 10000-withdrawal burst, a randomised mix of
deposits, withdrawals and transfers, durability of every acknowledged write across a crash
of the server and of PostgreSQL, and an instance killed in the middle of a keyed burst's
batches."""

from __future__ import annotations

import asyncio
import random
import signal
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from tandem.cli import raise_fd_limit
from tandem.core.database import asyncpg_dsn
from tandem.loadtest import withdraw_burst
from tandem.loadtest.client import parse_base_url, send_burst
from tests.faults.common import (
    FAULT_ENV,
    assert_honest,
    burst_across,
    create_user,
    settle_by_retry,
    withdrawal,
)
from tests.faults.postgres import ThrowawayPostgres, throwaway_postgres
from tests.support import (
    API_KEY,
    Server,
    batch_statements,
    batched,
    fresh_database,
    query,
    run_tandem,
    start_server,
    start_servers,
)


async def balances(database_url: str, users: list[int]) -> dict[int, int]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch("SELECT id, balance FROM users WHERE id = ANY($1)", users)
    finally:
        await conn.close()
    return {r["id"]: r["balance"] for r in rows}


async def test_ten_thousand_concurrent_withdrawals(server: Server, database_url: str) -> None:
    """10000 withdrawals of 2 from 10000, all in flight at once: exactly 5000 succeed, 5000
    are refused for insufficient funds, and the balance ends at 0, with 5000 journal entries
    each holding its own balance after it; most of them went in batches (group commit)."""
    raise_fd_limit()
    batched_before, statements_before = batched(server.url), batch_statements(server.url)
    report = await withdraw_burst(server.url, requests=10_000, amount=2, api_key=API_KEY)
    assert report.problems() == []
    assert (report.ok, report.refused, report.other) == (5000, 5000, 0)
    assert report.outcomes == {"200": 5000, "409": 5000}
    assert (await balances(database_url, [report.user_id]))[report.user_id] == 0
    entries = [r for r in await journal(database_url, [report.user_id]) if r["kind"] != "opening"]
    assert len(entries) == 5000
    assert sorted(r["balance"] for r in entries) == list(range(0, 10_000, 2))
    items = batched(server.url) - batched_before
    statements = batch_statements(server.url) - statements_before
    assert items > 5000  # changes sent in batch statements, of 10000
    assert items > 2 * statements  # more than two changes per statement on average


async def journal(database_url: str, users: list[int]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return await conn.fetch(
            "SELECT id, user_id, amount, balance, kind, transfer_id FROM ledger_entries "
            "WHERE user_id = ANY($1) ORDER BY id",
            users,
        )
    finally:
        await conn.close()


@dataclass
class Mix:
    """What a randomised mix acknowledged: the final balances it implies, the journal entries
    and transfers its 2xx answers name."""

    users: list[int]
    expected: dict[int, int]
    entry_ids: set[int]
    transfer_ids: set[int]


async def run_mix(server: Server, seed: int, requests: int) -> Mix:
    """Random concurrent deposits, withdrawals and transfers in both directions between five
    users, 500 in flight; every answer checked as it comes (no negative balance, no deadlock,
    a refusal only for funds)."""
    rng = random.Random(seed)
    endpoint = parse_base_url(server.url, API_KEY)
    starts = [rng.randrange(0, 400) for _ in range(5)]
    create = [endpoint.request("POST", "/users", {"balance": b}) for b in starts]
    created = await send_burst(endpoint.host, endpoint.port, create)
    assert all(r.status == 201 for r in created), [r.body for r in created]
    users = [r.json()["userId"] for r in created]
    initial = dict(zip(users, starts, strict=True))

    plan: list[tuple[int, int, int]] = []  # (from or the user, to or 0, amount)
    for _ in range(requests):
        if rng.random() < 0.3:
            src, dst = rng.sample(users, 2)
            plan.append((src, dst, rng.randrange(1, 80)))
        else:
            plan.append((rng.choice(users), 0, rng.choice([*range(-60, 0), *range(1, 41)])))
    batch = [
        endpoint.request("POST", "/balance/update", {"userId": u, "amount": a})
        if to == 0
        else endpoint.request("POST", "/transfers", {"fromUserId": u, "toUserId": to, "amount": a})
        for u, to, a in plan
    ]
    results = await send_burst(endpoint.host, endpoint.port, batch, concurrency=500)

    acknowledged = dict.fromkeys(users, 0)
    entry_ids, transfer_ids = set(), set()
    for (user, to, amount), result in zip(plan, results, strict=True):
        assert result.error is None, result.error
        if result.status in (200, 201):
            body = result.json()
            if to == 0:
                assert result.status == 200
                assert body["balance"] >= 0
                acknowledged[user] += amount
                entry_ids.add(body["entryId"])
            else:
                assert result.status == 201
                assert body["fromBalance"] >= 0
                acknowledged[user] -= amount
                acknowledged[to] += amount
                transfer_ids.add(body["transferId"])
        else:
            assert result.status == 409, result.body
            assert result.json()["error"]["code"] == "insufficient_funds"
            assert amount < 0 or to != 0, "a deposit is never refused for funds"
    expected = {u: initial[u] + acknowledged[u] for u in users}
    return Mix(users, expected, entry_ids, transfer_ids)


async def check(database_url: str, mix: Mix) -> None:
    """Each final balance is its start plus the acknowledged amounts; every 2xx is exactly one
    journal change (an entry, or a transfer's two legs) and every refusal none."""
    assert await balances(database_url, mix.users) == mix.expected
    entries = await journal(database_url, mix.users)
    assert [e["kind"] for e in entries[: len(mix.users)]] == ["opening"] * len(mix.users)
    changes = [e for e in entries if e["kind"] in ("deposit", "withdrawal")]
    legs = [e for e in entries if e["kind"] == "transfer"]
    assert {e["id"] for e in changes} == mix.entry_ids
    assert len(changes) == len(mix.entry_ids)
    assert sorted(e["transfer_id"] for e in legs) == sorted([*mix.transfer_ids] * 2)


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_randomised_mix_is_exact_and_journaled(
    server: Server, database_url: str, seed: int
) -> None:
    """Random concurrent deposits, withdrawals and transfers in both directions between
    several users: no answer shows a negative balance or a deadlock, each final balance is its
    start plus the acknowledged amounts, every 2xx is exactly one journal change and every
    refusal none."""
    mix = await run_mix(server, seed, 3000)
    await check(database_url, mix)


@pytest.fixture
def crashable() -> Iterator[tuple[ThrowawayPostgres, str]]:
    """A migrated database on a PostgreSQL of the test's own, which the test crashes (never
    the suite's shared server, which other tests are using). It runs with fsync off (nothing
    here survives an OS crash anyway) but synchronous_commit on: a crash of PostgreSQL alone
    loses no acknowledged commit, which is the property under test."""
    with throwaway_postgres() as postgres, fresh_database(postgres.url) as url:
        yield postgres, url


async def test_acknowledged_writes_survive_a_crash(
    crashable: tuple[ThrowawayPostgres, str], tmp_path: Path
) -> None:
    """After a randomised mix, the server is SIGKILLed and PostgreSQL crashed (immediate
    shutdown, no checkpoint): every acknowledged write is still there, exactly once, and
    `tandem ledger verify` finds nothing."""
    postgres, url = crashable
    server = start_server(url, tmp_path)
    try:
        mix = await run_mix(server, 4, 3000)
        await check(url, mix)
    finally:
        # The server without a goodbye, then PostgreSQL without a checkpoint.
        server.stop(signal.SIGKILL)
    postgres.restart("immediate")
    await check(url, mix)
    verified = run_tandem("ledger", "verify", database_url=url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "mismatches: 0" in verified.stdout


def test_an_instance_killed_mid_batch_loses_no_acknowledged_change(
    database_url: str, log_dir: Path
) -> None:
    """10000 keyed withdrawals of 2 from 10000 over two instances (group commit: each one's
    queue for the user full, its batches in flight), the first SIGKILLed after 2500 answers.
    Every 200 already answered is in the journal with its balance; every request left
    without an answer (or a 503), sent again to the survivor with its key, settles once: 5000
    succeed and 5000 are refused in all, the balance is 0, one entry per successful key."""
    with fresh_database(database_url) as url:
        servers = start_servers(url, log_dir, 2, extra_env=FAULT_ENV)
        try:
            user = create_user(url, 10_000)
            keys = [f"kill-{uuid.uuid4().hex}" for _ in range(10_000)]
            requests = [(i % 2, withdrawal(servers[i % 2], user, keys[i])) for i in range(10_000)]
            kill = lambda: servers[0].stop(signal.SIGKILL)  # noqa: E731  (the fault, named)
            results = asyncio.run(burst_across(servers, requests, kill, after_answers=2500))
            assert any(r.error is not None for r in results), "the kill cut no request"
            assert_honest([r for r in results if r.error is None])
            acknowledged = {keys[i]: r.json() for i, r in enumerate(results) if r.status == 200}
            entries = {
                r["idempotency_key"]: (r["id"], r["balance"])
                for r in query(
                    url,
                    "SELECT id, balance, idempotency_key FROM ledger_entries"
                    " WHERE user_id = $1 AND kind = 'withdrawal'",
                    user,
                )
            }
            assert {key: (b["entryId"], b["balance"]) for key, b in acknowledged.items()} == {
                key: entries.get(key) for key in acknowledged
            }
            survivor = [(1, withdrawal(servers[1], user, key)) for key in keys]
            final = settle_by_retry(servers, survivor, results)
            assert batched(servers[1].url, "keyed_change") > 0, "no keyed batch formed"
        finally:
            for server in servers:
                server.stop()
        assert (final.count(200), final.count(409)) == (5000, 5000)
        assert query(url, "SELECT balance FROM users WHERE id = $1", user)[0]["balance"] == 0
        keyed = query(
            url,
            "SELECT count(*), count(DISTINCT idempotency_key) FROM ledger_entries"
            " WHERE user_id = $1 AND kind = 'withdrawal'",
            user,
        )[0]
        assert tuple(keyed) == (5000, 5000)
