"""Concurrency through a real server process: the 10000-withdrawal burst, a randomised mix of
deposits and withdrawals, and durability of every acknowledged write across a crash."""

from __future__ import annotations

import random
import signal
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tandem.cli import raise_fd_limit
from tandem.core.database import asyncpg_dsn
from tandem.core.embedded import EmbeddedPostgres
from tandem.loadtest import withdraw_burst
from tandem.loadtest.client import parse_base_url, send_burst
from tests.support import API_KEY, Server, start_server
from tests.wallet.test_verify import verify as ledger_verify


@pytest.fixture
def lean_server(database_url: str, log_dir: Path) -> Iterator[Server]:
    """A server of the test's own: some tests kill it."""
    srv = start_server(database_url, log_dir)
    yield srv
    srv.stop()


async def balances(database_url: str, users: list[int]) -> dict[int, int]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        rows = await conn.fetch("SELECT id, balance FROM users WHERE id = ANY($1)", users)
    finally:
        await conn.close()
    return {r["id"]: r["balance"] for r in rows}


async def test_ten_thousand_concurrent_withdrawals(lean_server: Server, database_url: str) -> None:
    """10000 withdrawals of 2 from 10000, all in flight at once: exactly 5000 succeed, 5000
    are refused for insufficient funds, and the balance ends at 0."""
    raise_fd_limit()
    report = await withdraw_burst(lean_server.url, requests=10_000, amount=2, api_key=API_KEY)
    assert report.problems() == []
    assert (report.ok, report.refused, report.other) == (5000, 5000, 0)
    assert report.outcomes == {"200": 5000, "409": 5000}
    assert (await balances(database_url, [report.user_id]))[report.user_id] == 0


async def journal(database_url: str, users: list[int]) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return await conn.fetch(
            "SELECT id, user_id, amount, kind, transfer_id FROM ledger_entries "
            "WHERE user_id = ANY($1) ORDER BY id",
            users,
        )
    finally:
        await conn.close()


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_randomised_mix_is_exact_journaled_and_durable(
    lean_server: Server,
    database_url: str,
    embedded_postgres: EmbeddedPostgres | None,
    seed: int,
) -> None:
    """Random concurrent deposits, withdrawals and transfers in both directions between
    several users: no answer shows a negative balance or a deadlock, each final balance is its
    start plus the acknowledged amounts, every 2xx is exactly one journal change (an entry, or
    a transfer's two legs) and every refusal none; all of it survives killing the server and
    crashing PostgreSQL, after which `tandem ledger verify` finds nothing."""
    rng = random.Random(seed)
    endpoint = parse_base_url(lean_server.url, API_KEY)
    starts = [rng.randrange(0, 400) for _ in range(5)]
    create = [endpoint.request("POST", "/users", {"balance": b}) for b in starts]
    created = await send_burst(endpoint.host, endpoint.port, create)
    users = [r.json()["userId"] for r in created]
    initial = dict(zip(users, starts, strict=True))

    plan: list[tuple[int, int, int]] = []  # (from or the user, to or 0, amount)
    for _ in range(3000):
        if rng.random() < 0.3:
            src, dst = rng.sample(users, 2)
            plan.append((src, dst, rng.randrange(1, 80)))
        else:
            plan.append((rng.choice(users), 0, rng.choice([*range(-60, 0), *range(1, 41)])))
    requests = [
        endpoint.request("POST", "/balance/update", {"userId": u, "amount": a})
        if to == 0
        else endpoint.request("POST", "/transfers", {"fromUserId": u, "toUserId": to, "amount": a})
        for u, to, a in plan
    ]
    results = await send_burst(endpoint.host, endpoint.port, requests, concurrency=500)

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

    async def check() -> None:
        assert await balances(database_url, users) == expected
        entries = await journal(database_url, users)
        assert [e["kind"] for e in entries[: len(users)]] == ["opening"] * len(users)
        changes = [e for e in entries if e["kind"] in ("deposit", "withdrawal")]
        legs = [e for e in entries if e["kind"] == "transfer"]
        assert {e["id"] for e in changes} == entry_ids
        assert len(changes) == len(entry_ids)
        assert sorted(e["transfer_id"] for e in legs) == sorted([*transfer_ids, *transfer_ids])

    await check()
    # Crash everything: the server without a goodbye, PostgreSQL without a checkpoint.
    lean_server.stop(signal.SIGKILL)
    if embedded_postgres is not None:
        embedded_postgres.stop("immediate")
        embedded_postgres.start()
    await check()
    verified = ledger_verify(database_url)
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "mismatches: 0" in verified.stdout
