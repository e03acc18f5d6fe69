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
from tandem.loadtest.client import build_request, parse_base_url, send_burst
from tests.support import Server, start_server

pytestmark = pytest.mark.slow


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
    report = await withdraw_burst(lean_server.url, requests=10_000, amount=2)
    assert report.problems() == []
    assert (report.ok, report.refused, report.other) == (5000, 5000, 0)
    assert report.outcomes == {"200": 5000, "409": 5000}
    assert (await balances(database_url, [report.user_id]))[report.user_id] == 0


@pytest.mark.parametrize("seed", [1, 2, 3])
async def test_randomised_mix_is_exact_and_durable(
    lean_server: Server,
    database_url: str,
    embedded_postgres: EmbeddedPostgres | None,
    seed: int,
) -> None:
    """Random concurrent deposits and withdrawals on several users: no answer shows a negative
    balance, each final balance is its start plus the acknowledged amounts, and every
    acknowledged write survives killing the server and crashing PostgreSQL."""
    rng = random.Random(seed)
    endpoint = parse_base_url(lean_server.url)
    starts = [rng.randrange(0, 400) for _ in range(5)]
    create = [build_request("POST", "/users", endpoint.host_header, {"balance": b}) for b in starts]
    created = await send_burst(endpoint.host, endpoint.port, create)
    users = [r.json()["userId"] for r in created]
    initial = dict(zip(users, starts, strict=True))

    plan = [(rng.choice(users), rng.choice([*range(-60, 0), *range(1, 41)])) for _ in range(3000)]
    requests = [
        build_request("POST", "/balance/update", endpoint.host_header, {"userId": u, "amount": a})
        for u, a in plan
    ]
    results = await send_burst(endpoint.host, endpoint.port, requests, concurrency=500)

    acknowledged = dict.fromkeys(users, 0)
    for (user, amount), result in zip(plan, results, strict=True):
        assert result.error is None, result.error
        if result.status == 200:
            assert result.json()["balance"] >= 0
            acknowledged[user] += amount
        else:
            assert result.status == 409, result.body
            assert result.json()["error"]["code"] == "insufficient_funds"
            assert amount < 0, "a deposit is never refused for funds"
    expected = {u: initial[u] + acknowledged[u] for u in users}
    assert await balances(database_url, users) == expected

    # Crash everything: the server without a goodbye, PostgreSQL without a checkpoint.
    lean_server.stop(signal.SIGKILL)
    if embedded_postgres is not None:
        embedded_postgres.stop("immediate")
        embedded_postgres.start()
    assert await balances(database_url, users) == expected
