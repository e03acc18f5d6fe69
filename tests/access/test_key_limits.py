"""Per-key limits, off unless set on the key: a debit limit stops a key at exactly its amount
(withdrawals and transfers' paying side, a replay not counted, concurrent debits within the
stated bound), a request rate answers 429 and recovers, both counted by a metric; a key
without limits is never counted. In process, on the real database."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY

from tandem.access import keys
from tandem.core.callers import Limit
from tandem.core.database import asyncpg_dsn
from tandem.wallet import repository as wallet_repository
from tests.access.keys import bearer, make_key
from tests.support import app_settings, fetch, new_user, until

LIMITED = "tandem_access_key_limited_total"
# Day windows: a test never straddles a window's end (the windows are UTC days).
SPENDER = ("wallet:read", "wallet:write")


def limited(reason: str) -> float:
    return REGISTRY.get_sample_value(LIMITED, {"reason": reason}) or 0.0


async def withdraw(
    client: httpx.AsyncClient, token: str, user: int, amount: int, key: str | None = None
) -> httpx.Response:
    headers = bearer(token) if key is None else {**bearer(token), "Idempotency-Key": key}
    return await client.post(
        "/balance/update", json={"userId": user, "amount": -amount}, headers=headers
    )


async def state(database_url: str, user: int) -> tuple[int, int]:
    """The user's balance and number of journal entries."""
    rows = await fetch(
        database_url,
        "SELECT balance, (SELECT count(*) FROM ledger_entries WHERE user_id = $1) "
        "FROM users WHERE id = $1",
        user,
    )
    return rows[0][0], rows[0][1]


def assert_debit_refused(answer: httpx.Response) -> None:
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "debit_limit_exceeded"
    assert 1 <= int(answer.headers["retry-after"]) <= 86400


async def test_a_limited_key_is_stopped_at_exactly_its_limit(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Limit 10 a day, withdrawals of 3: three succeed, the fourth is 429 and changes
    nothing; a refused withdrawal (too low a balance) is not counted."""
    token = await make_key(database_url, "spender", *SPENDER, debit_limits=("10/day",))
    user = await new_user(client, 100)
    poor = await new_user(client, 0)
    before = limited("debit")
    for balance in (97, 94, 91):
        answer = await withdraw(client, token, user, 3)
        assert answer.status_code == 200, answer.text
        assert answer.json()["balance"] == balance
    assert (await withdraw(client, token, poor, 1)).status_code == 409
    assert_debit_refused(await withdraw(client, token, user, 3))
    assert await state(database_url, user) == (91, 4)  # the opening entry and three
    assert limited("debit") == before + 1
    # 1 more still fits (9 + 1 = 10): the limit is inclusive.
    assert (await withdraw(client, token, user, 1)).status_code == 200
    assert_debit_refused(await withdraw(client, token, user, 1))


async def test_a_transfer_counts_its_paying_side(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Transfers and withdrawals share the key's limit; a refused transfer moves nothing."""
    token = await make_key(database_url, "payer", *SPENDER, debit_limits=("10/day", "100/hour"))
    payer, payee = await new_user(client, 100), await new_user(client, 0)
    pay = {"fromUserId": payer, "toUserId": payee, "amount": 6}
    assert (await client.post("/transfers", json=pay, headers=bearer(token))).status_code == 201
    assert_debit_refused(await client.post("/transfers", json=pay, headers=bearer(token)))
    assert_debit_refused(await withdraw(client, token, payer, 5))
    assert await state(database_url, payer) == (94, 2)
    assert await state(database_url, payee) == (6, 2)
    # With an idempotency key too: refused, nothing stored, so a retry is judged anew.
    keyed = {**bearer(token), "Idempotency-Key": f"pay-{uuid.uuid4()}"}
    assert_debit_refused(await client.post("/transfers", json=pay, headers=keyed))
    assert_debit_refused(await client.post("/transfers", json=pay, headers=keyed))
    assert await state(database_url, payer) == (94, 2)


async def test_a_replay_is_not_counted_again(client: httpx.AsyncClient, database_url: str) -> None:
    """The same Idempotency-Key and body answer the first outcome without counting."""
    token = await make_key(database_url, "replayer", *SPENDER, debit_limits=("10/day",))
    user = await new_user(client, 100)
    key = f"once-{uuid.uuid4()}"
    first = await withdraw(client, token, user, 6, key)
    assert first.status_code == 200
    for _ in range(3):
        again = await withdraw(client, token, user, 6, key)
        assert again.status_code == 200
        assert again.headers["idempotent-replayed"] == "true"
    # 6 counted once: 4 more fit, then nothing.
    assert (await withdraw(client, token, user, 4, f"next-{uuid.uuid4()}")).status_code == 200
    assert_debit_refused(await withdraw(client, token, user, 1))
    assert await state(database_url, user) == (90, 3)


async def test_concurrent_debits_stay_within_the_stated_bound(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """60 withdrawals of 1 at once from 60 users (no row lock in common) against a limit of
    20: at least the limit and at most one more per other backend of the pool is debited,
    and every committed debit is counted."""
    token = await make_key(database_url, "racer", *SPENDER, debit_limits=("20/day",))
    users = await asyncio.gather(*(new_user(client, 10) for _ in range(60)))
    answers = await asyncio.gather(*(withdraw(client, token, user, 1) for user in users))
    assert sorted({answer.status_code for answer in answers}) == [200, 429]
    debited = sum(answer.status_code == 200 for answer in answers)
    backends = app_settings(database_url).db_pool_size
    assert 20 <= debited <= 20 + backends - 1
    balances = await fetch(
        database_url, "SELECT sum(10 - balance) FROM users WHERE id = ANY($1)", users
    )
    assert balances[0][0] == debited
    counted = await fetch(
        database_url,
        "SELECT sum(d.amount) FROM key_debits d JOIN api_keys k ON k.id = d.api_key_id "
        "WHERE k.name = 'racer'",
    )
    assert counted[0][0] == debited


async def test_a_key_without_limits_is_never_counted(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Keys made without limits (and the suite's configured key) withdraw and pay freely,
    and leave no counter row."""
    token = await make_key(database_url, "free", *SPENDER)
    user, other = await new_user(client, 1000), await new_user(client, 0)
    for _ in range(5):
        assert (await withdraw(client, token, user, 100)).status_code == 200
    assert (await withdraw(client, token, user, 100, f"free-{uuid.uuid4()}")).status_code == 200
    pay = {"fromUserId": user, "toUserId": other, "amount": 50}
    assert (await client.post("/transfers", json=pay, headers=bearer(token))).status_code == 201
    assert (await client.post("/transfers", json=pay)).status_code == 201  # the suite's key
    counted = await fetch(
        database_url,
        "SELECT count(*) FROM key_debits d JOIN api_keys k ON k.id = d.api_key_id "
        "WHERE k.name <> ALL($1::text[]) ",
        ["spender", "payer", "replayer", "racer"],
    )
    assert counted[0][0] == 0


async def test_a_rate_is_refused_past_then_recovers(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """--rate 2/s: of 15 requests at once (both HTTP paths: the lean path's balance read and
    withdrawal, FastAPI's history) about two pass, the rest are 429 rate_limited before their
    route runs (a refused withdrawal changes nothing), and the key is served again soon."""
    token = await make_key(database_url, "chatty", *SPENDER, rate="2/s")
    user = await new_user(client, 100)
    before = limited("rate")
    auth = bearer(token)
    answers = await asyncio.gather(
        *(client.get(f"/balance/{user}", headers=auth) for _ in range(5)),
        *(client.get(f"/balance/{user}/history", headers=auth) for _ in range(5)),
        *(withdraw(client, token, user, 1) for _ in range(5)),
    )
    refused = [answer for answer in answers if answer.status_code == 429]
    assert 10 <= len(refused) <= 13
    for answer in refused:
        assert answer.json()["error"]["code"] == "rate_limited"
        assert answer.headers["retry-after"] == "1"
    for path in (answers[:5], answers[5:10]):  # refused on each path
        assert any(answer.status_code == 429 for answer in path)
    withdrawn = sum(answer.status_code == 200 for answer in answers[10:])
    assert await state(database_url, user) == (100 - withdrawn, 1 + withdrawn)
    assert limited("rate") == before + len(refused)

    async def served() -> bool:
        return (await client.get(f"/balance/{user}", headers=auth)).status_code == 200

    await until(served, within=5)


@pytest.mark.parametrize(
    ("text", "limit"),
    [("5000/hour", Limit(5000, 3600)), ("20000/day", Limit(20000, 86400)), ("1/min", Limit(1, 60))],
)
def test_debit_limits_are_amount_per_period(text: str, limit: Limit) -> None:
    assert keys.parse_limit(text, keys.DEBIT_PERIODS) == limit
    assert keys.describe(limit) == text.replace("min", "minute")


@pytest.mark.parametrize("text", ["5000", "0/hour", "-1/day", "5/week", "5/second", "x/day"])
def test_a_bad_debit_limit_is_refused(text: str) -> None:
    with pytest.raises(ValueError, match="invalid limit"):
        keys.parse_limit(text, keys.DEBIT_PERIODS)


def test_a_period_is_limited_once() -> None:
    with pytest.raises(ValueError, match="more than one"):
        keys.check_debit_limits(["5/hour", "6/h"])


async def test_housekeeping_forgets_debit_windows_over_a_day_old(database_url: str) -> None:
    """The idempotency keys' pruning also deletes key_debits rows whose window ended over a
    day ago; the current windows stay."""
    insert = (
        "INSERT INTO key_debits (api_key_id, seconds, window_start, backend, amount) "
        "VALUES (-1, $1, $2, 1, 5)"
    )
    day = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    await fetch(database_url, insert, 86400, day - timedelta(days=3))
    await fetch(database_url, insert, 86400, day)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await wallet_repository.prune_idempotency_keys(conn, timedelta(days=1), 1000)
    finally:
        await conn.close()
    kept = await fetch(database_url, "SELECT window_start FROM key_debits WHERE api_key_id = -1")
    assert [row[0] for row in kept] == [day]
