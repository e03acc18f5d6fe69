"""Group commit in process (a real PostgreSQL): the batch statement decides each item on the
balance the ones before it left, journals each applied one with its own balance after it,
and respects held amounts, the 64-bit ceiling and the mint ceiling item by item; the
per-user queue folds concurrent changes into batches and answers each request with its own
item's outcome; a batch that rolls back is retried item by item; a change that waited too
long unsent is refused with nothing sent; a batch whose connection is lost after sending
answers outcome_unknown for each of its items. Keyed changes batch too, keeping the
idempotency rules: one key twice never in one batch (the second replays the first, or is
told 422), retries across batches replay each item's own outcome, a key pruned after it
applied replays from the journal, and the daily cap is decided per item, in order."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
import httpx
import pytest
from prometheus_client import generate_latest

from tandem.core.callers import ANONYMOUS
from tandem.core.database import Database, asyncpg_dsn
from tandem.core.errors import OutcomeUnknownError
from tandem.core.ids import INT64_MAX
from tandem.core.settings import Settings
from tandem.wallet import repository, service
from tandem.wallet.batching import GroupCommit, QueueWaitExpiredError
from tandem.wallet.errors import IdempotencyKeyReusedError, TooManyIdempotencyKeysError
from tandem.wallet.functions import APPLY_DELTAS_V1
from tandem.wallet.repository import Delta, DeltaResult, Payment
from tests.support import balance_of, eventually, fetch, holding, new_user, sample_sum, until

# Each applied change's journal entry, in journal order.
ENTRIES = "SELECT id, amount, balance FROM ledger_entries WHERE user_id = $1 ORDER BY id"


def withdrawal(amount: int) -> Delta:
    return Delta(-amount, None, None)


def deposit(amount: int) -> Delta:
    return Delta(amount, None, None)


async def entries(url: str, user: int, *, opening: bool = True) -> list[tuple[int, int]]:
    """(amount, balance after) of the user's entries after its opening one (a user made by
    the API has one; ``opening=False`` for one inserted by hand)."""
    rows = await fetch(url, ENTRIES, user)
    return [(r["amount"], r["balance"]) for r in rows[1 if opening else 0 :]]


def batches_sent(kind: str = "change") -> float:
    """Batch statements this process has sent of ``kind`` (its tandem_wallet_batch_size)."""
    return sample_sum(generate_latest().decode(), "tandem_wallet_batch_size_count", kind=kind)


def outcome(result: DeltaResult | None) -> tuple[int, bool]:
    """(balance, applied) of a change's result."""
    assert result is not None, "no such user"
    return result.balance, result.applied


async def apply_batch(database: Database, user: int, *deltas: Delta) -> list[DeltaResult]:
    found = await repository.apply_deltas(database.pool, user, deltas)
    assert found is not None
    return found


# --- the batch statement ----------------------------------------------------------------------


async def test_each_item_is_decided_on_the_balance_before_it(
    client: httpx.AsyncClient, database: Database, database_url: str
) -> None:
    """[-100, +100] on a balance of 50: the first is refused (the CHECK sees only the end,
    150, so the refusal is the function's own arithmetic), the second applied; then three
    withdrawals of 10 on 25: applied, applied, refused; each applied item is an entry of its
    own with its own balance after it, ids rising in the items' order."""
    user = await new_user(client, 50)
    first = await apply_batch(database, user, withdrawal(100), deposit(100))
    assert [(r.balance, r.applied, r.refusal) for r in first] == [
        (50, False, None),
        (150, True, None),
    ]
    assert [r.entry_id is not None for r in first] == [False, True]
    assert await entries(database_url, user) == [(100, 150)]

    other = await new_user(client, 25)
    second = await apply_batch(database, other, *[withdrawal(10)] * 3)
    assert [(r.balance, r.applied) for r in second] == [(15, True), (5, True), (5, False)]
    rows = (await fetch(database_url, ENTRIES, other))[1:]
    assert [(r["amount"], r["balance"]) for r in rows] == [(-10, 15), (-10, 5)]
    assert [r["id"] for r in rows] == [second[0].entry_id, second[1].entry_id]
    assert rows[0]["id"] < rows[1]["id"]


async def test_a_batch_never_passes_the_64_bit_ceiling(
    client: httpx.AsyncClient, database: Database, database_url: str
) -> None:
    """Deposits up to exactly 2^63-1 apply; the one past it is refused, and the one after it
    (a withdrawal) applies on the balance at the ceiling."""
    user = await new_user(client, 0)
    found = await apply_batch(
        database, user, deposit(INT64_MAX - 1), deposit(2), deposit(1), withdrawal(1)
    )
    assert [(r.balance, r.applied) for r in found] == [
        (INT64_MAX - 1, True),
        (INT64_MAX - 1, False),
        (INT64_MAX, True),
        (INT64_MAX - 1, True),
    ]
    assert await entries(database_url, user) == [
        (INT64_MAX - 1, INT64_MAX - 1),
        (1, INT64_MAX),
        (-1, INT64_MAX - 1),
    ]


async def test_a_batch_spends_only_the_available_amount(
    client: httpx.AsyncClient, database: Database, database_url: str
) -> None:
    """With 60 of 100 held, withdrawals of 30 and 20 on the batch: the first applies (40
    available), the second is refused (10 left); a hold past its expiry is released once, by
    the batch, before its items are decided."""
    user = await new_user(client, 100)
    made = await client.post("/holds", json={"userId": user, "amount": 60, "expiresIn": 600})
    assert made.status_code == 201, made.text
    found = await apply_batch(database, user, withdrawal(30), withdrawal(20))
    assert [(r.balance, r.applied) for r in found] == [(70, True), (70, False)]

    other = await new_user(client, 100)
    made = await client.post("/holds", json={"userId": other, "amount": 90, "expiresIn": 1})
    assert made.status_code == 201, made.text

    async def expired_by_the_clock() -> bool:
        rows = await fetch(
            database_url,
            "SELECT expires_at <= clock_timestamp() FROM holds WHERE id = $1",
            made.json()["holdId"],
        )
        return bool(rows[0][0])

    await until(expired_by_the_clock, 10)
    found = await apply_batch(database, other, withdrawal(50), withdrawal(50))
    assert [(r.balance, r.applied) for r in found] == [(50, True), (0, True)]
    rows = await fetch(
        database_url,
        "SELECT u.held, h.status FROM users u, holds h WHERE u.id = $1 AND h.id = $2",
        other,
        made.json()["holdId"],
    )
    assert (rows[0]["held"], rows[0]["status"]) == (0, "expired")


async def test_deposits_of_a_batch_count_against_the_mint_ceiling_together(
    own_database_url: str,
) -> None:
    """Under a daily mint ceiling of 100 (on a database of its own: nothing minted yet
    today), deposits of 60, 60 and 40: the first and the third fit, the second is refused
    'mint_ceiling' (60 + 60 > 100)."""
    url = own_database_url
    await fetch(url, "UPDATE wallet_settings SET daily_mint_ceiling = 100")
    user = (await fetch(url, "INSERT INTO users (balance) VALUES (0) RETURNING id"))[0][0]
    database = Database(Settings(database_url=url))
    await database.open()
    try:
        found = await apply_batch(database, user, deposit(60), deposit(60), deposit(40))
    finally:
        await database.close()
    assert [(r.balance, r.applied, r.refusal) for r in found] == [
        (60, True, None),
        (60, False, "mint_ceiling"),
        (100, True, None),
    ]
    assert await entries(url, user, opening=False) == [(60, 60), (40, 100)]


async def test_a_batch_for_no_user_changes_nothing(database: Database, database_url: str) -> None:
    """No such user: no rows at all (each change is told so), and nothing written."""
    journal = "SELECT count(*) FROM ledger_entries"
    before = (await fetch(database_url, journal))[0][0]
    assert await repository.apply_deltas(database.pool, 987_654_321, [deposit(1)]) is None
    assert (await fetch(database_url, journal))[0][0] == before


async def test_transfers_into_one_payee_are_decided_in_order(
    client: httpx.AsyncClient, database: Database, database_url: str
) -> None:
    """A batch into one payee: each transfer decided on the balances the ones before it left
    (a payer listed twice sees its first debit), refusals as tandem_transfer_v3 gives them,
    and the payee's legs carrying its balance after each transfer."""
    a, b, payee = await new_user(client, 100), await new_user(client, 40), await new_user(client, 5)
    found = await repository.transfer_batch(
        database.pool,
        payee,
        [
            Payment(a, 30, "one", None),
            Payment(b, 50, None, None),
            Payment(a, 80, None, None),
            Payment(987_654_321, 1, None, None),
            Payment(a, 70, None, None),
        ],
    )
    assert [(r.outcome, r.from_balance, r.to_balance) for r in found] == [
        ("ok", 70, 35),
        ("insufficient_funds", 40, 35),
        ("insufficient_funds", 70, 35),
        ("from_not_found", None, None),
        ("ok", 0, 105),
    ]
    assert await entries(database_url, payee) == [(30, 35), (70, 105)]
    assert await entries(database_url, a) == [(-30, 70), (-70, 0)]
    assert [r.transfer_id is not None for r in found] == [True, False, False, False, True]
    nobody = await repository.transfer_batch(
        database.pool,
        987_654_321,
        [Payment(a, 1, None, None), Payment(987_654_322, 1, None, None), Payment(b, 1, None, None)],
    )
    # As each alone: a missing payer is named before the missing payee.
    assert [r.outcome for r in nobody] == ["to_not_found", "from_not_found", "to_not_found"]


async def test_a_transfer_batch_never_passes_the_payees_ceiling(
    client: httpx.AsyncClient, database: Database, database_url: str
) -> None:
    a = await new_user(client, 100)
    payee = await new_user(client, INT64_MAX - 10)
    found = await repository.transfer_batch(
        database.pool,
        payee,
        [Payment(a, 5, None, None), Payment(a, 10, None, None), Payment(a, 5, None, None)],
    )
    assert [(r.outcome, r.to_balance) for r in found] == [
        ("ok", INT64_MAX - 5),
        ("balance_limit_exceeded", INT64_MAX - 5),
        ("ok", INT64_MAX),
    ]


async def test_concurrent_transfers_into_one_payee_go_in_batches(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """300 concurrent transfers of 10 from 100 payers holding 20 each into one payee through
    the API: exactly 200 made (two per payer) and 100 refused, the payee holds 2000, batches
    of transfers formed, and the ledger verifies (every leg's balance follows the one
    before it)."""
    payers = [await new_user(client, 20) for _ in range(100)]
    payee = await new_user(client, 0)
    metrics = (await client.get("/metrics")).text
    before = sample_sum(metrics, "tandem_wallet_batch_size_count", kind="transfer")
    summed = sample_sum(metrics, "tandem_wallet_batch_size_sum", kind="transfer")
    answers = await asyncio.gather(
        *(
            client.post("/transfers", json={"fromUserId": p, "toUserId": payee, "amount": 10})
            for p in payers * 3
        )
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [201] * 200 + [409] * 100, statuses
    assert (await client.get(f"/balance/{payee}")).json()["balance"] == 2000
    metrics = (await client.get("/metrics")).text
    batches = sample_sum(metrics, "tandem_wallet_batch_size_count", kind="transfer") - before
    assert batches > 0, "no batch of transfers formed"
    batched = sample_sum(metrics, "tandem_wallet_batch_size_sum", kind="transfer") - summed
    assert batched > batches  # more than one transfer in a batch
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        verified = await repository.verify_ledger(conn, 60.0)
    finally:
        await conn.close()
    assert verified is not None
    assert (verified.mismatches, verified.holds) == (0, [])


# --- the queue ------------------------------------------------------------------------------


@pytest.fixture
def batches(database: Database) -> GroupCommit:
    return GroupCommit(database, batch_max=50, batch_wait=30.0)


async def test_concurrent_changes_go_in_batches_each_answered_its_own_outcome(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """400 concurrent withdrawals of 2 from 400 through the API (the app's group commit):
    exactly 200 succeed and 200 are refused, the balance ends at 0, and batches of more than
    one change formed; each success answers its own balance after it (200 distinct
    balances, 398 down to 0) and its own entry, which the journal holds with that balance."""
    user = await new_user(client, 400)
    metrics = (await client.get("/metrics")).text
    before = sample_sum(metrics, "tandem_wallet_batch_size_count", kind="change")
    items_before = sample_sum(metrics, "tandem_wallet_batch_size_sum", kind="change")
    answers = await asyncio.gather(
        *(client.post("/balance/update", json={"userId": user, "amount": -2}) for _ in range(400))
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] * 200 + [409] * 200, statuses
    bodies = [a.json() for a in answers if a.status_code == 200]
    assert sorted(b["balance"] for b in bodies) == list(range(0, 400, 2))
    journal = {r["id"]: r["balance"] for r in await fetch(database_url, ENTRIES, user)}
    assert all(journal[b["entryId"]] == b["balance"] for b in bodies)
    assert len(journal) == 201  # the opening entry and one per success
    metrics = (await client.get("/metrics")).text
    batched = sample_sum(metrics, "tandem_wallet_batch_size_count", kind="change") - before
    assert batched > 0, "no batch formed"
    items = sample_sum(metrics, "tandem_wallet_batch_size_sum", kind="change") - items_before
    assert items > batched  # more than one change in a batch, on average


async def test_a_lone_change_goes_at_once_alone(
    client: httpx.AsyncClient, batches: GroupCommit, database_url: str
) -> None:
    """With nothing in flight for its user, a change is sent at once on its own statement
    (no batch), and the queue forgets the user after it."""
    user = await new_user(client, 10)
    sent = batches_sent()
    assert outcome(await batches.apply(user, withdrawal(3))) == (7, True)
    assert batches_sent() == sent  # no batch statement
    assert batches.rows_in_flight == 0


async def test_a_batch_that_rolls_back_is_retried_item_by_item(
    client: httpx.AsyncClient,
    batches: GroupCommit,
    database_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """One item the journal refuses (a reference past its CHECK, which the API would have
    refused first) rolls its batch of three back (the batch was sent, and logged with its
    SQLSTATE): the others are retried alone and applied, and only that one fails."""
    caplog.set_level(logging.WARNING)
    sent = batches_sent()
    user = await new_user(client, 100)
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = asyncio.ensure_future(batches.apply(user, withdrawal(1)))
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        queued = [
            asyncio.ensure_future(batches.apply(user, Delta(-1, reference, None)))
            for reference in ("a", "x" * 10_000, "b")
        ]
        await asyncio.sleep(0)
    done = await asyncio.gather(first, *queued, return_exceptions=True)
    assert batches_sent() == sent + 1
    assert "a change batch of 3 failed (23514" in caplog.text
    assert isinstance(done[2], asyncpg.CheckViolationError), done[2]
    assert [(r.balance, r.applied) for r in (done[0], done[1], done[3])] == [  # type: ignore[union-attr]
        (99, True),
        (98, True),
        (97, True),
    ]
    assert await entries(database_url, user) == [(-1, 99), (-1, 98), (-1, 97)]


async def test_a_change_waiting_too_long_unsent_is_refused_and_changes_nothing(
    client: httpx.AsyncClient, database: Database, database_url: str
) -> None:
    """While the user's statement in flight waits on a row lock, a change queued behind it
    is refused after batch_wait (database_unavailable: nothing was sent); the one in flight
    applies once the lock is gone, and the journal holds it alone."""
    short = GroupCommit(database, batch_max=50, batch_wait=0.2)
    user = await new_user(client, 100)
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = asyncio.ensure_future(short.apply(user, withdrawal(1)))
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        with pytest.raises(QueueWaitExpiredError):
            await short.apply(user, withdrawal(2))
    assert outcome(await first) == (99, True)
    await eventually(lambda: short.rows_in_flight == 0, 5)
    assert await entries(database_url, user) == [(-1, 99)]


async def test_a_batch_cut_off_after_sending_answers_outcome_unknown_for_each(
    client: httpx.AsyncClient, batches: GroupCommit, database_url: str
) -> None:
    """The batch's connection ended while its statement waits on the user's row lock: each
    of its items answers outcome_unknown (sent, the outcome not known to the instance), and
    (rolled back, in fact) nothing of it is in the journal."""
    user = await new_user(client, 100)
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = asyncio.ensure_future(batches.apply(user, withdrawal(1)))
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        queued = [asyncio.ensure_future(batches.apply(user, withdrawal(1))) for _ in range(3)]
        await asyncio.sleep(0)
        await _terminate_waiting(database_url, "tandem_apply_delta_v2")
        assert isinstance(
            (await asyncio.gather(first, return_exceptions=True))[0], OutcomeUnknownError
        )
        await _terminate_waiting(database_url, "tandem_apply_deltas_v1")
        done = await asyncio.gather(*queued, return_exceptions=True)
    assert all(isinstance(d, OutcomeUnknownError) for d in done), done
    assert len({id(d) for d in done}) == 3  # an error of its own for each request
    assert await entries(database_url, user) == []


# --- keyed changes --------------------------------------------------------------------------


async def test_concurrent_keyed_changes_batch_and_their_retries_replay_their_own_outcomes(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """200 concurrent keyed withdrawals of 2 from 200 through the API: exactly 100 succeed,
    in batches of more than one (kind keyed_change), each key once in the journal with the
    balance its answer gave; all 200 sent again at once (retries, in batches again) answer
    exactly what each answered first (its own entry and balance, or its 409) and change
    nothing."""
    user = await new_user(client, 200)

    async def send(n: int) -> httpx.Response:
        return await client.post(
            "/balance/update",
            json={"userId": user, "amount": -2},
            headers={"Idempotency-Key": f"burst-{user}-{n}"},
        )

    metrics = generate_latest().decode()
    items_before = sample_sum(metrics, "tandem_wallet_batch_size_sum", kind="keyed_change")
    batches_before = sample_sum(metrics, "tandem_wallet_batch_size_count", kind="keyed_change")
    first = await asyncio.gather(*(send(n) for n in range(200)))
    sent = batches_sent("keyed_change")
    again = await asyncio.gather(*(send(n) for n in range(200)))
    assert sorted(a.status_code for a in first) == [200] * 100 + [409] * 100
    bodies = [a.json() for a in first if a.status_code == 200]
    assert sorted(b["balance"] for b in bodies) == list(range(0, 200, 2))
    journal = await fetch(
        database_url,
        "SELECT id, balance, idempotency_key FROM ledger_entries WHERE user_id = $1 AND amount < 0",
        user,
    )
    assert {(r["id"], r["balance"]) for r in journal} == {
        (b["entryId"], b["balance"]) for b in bodies
    }
    assert len({r["idempotency_key"] for r in journal}) == 100
    assert [(a.status_code, a.json()) for a in again] == [(a.status_code, a.json()) for a in first]
    assert await balance_of(client, user) == 0
    assert len(await fetch(database_url, ENTRIES, user)) == 101
    assert batches_sent("keyed_change") > sent, "the retries formed no batch"
    metrics = generate_latest().decode()
    items = sample_sum(metrics, "tandem_wallet_batch_size_sum", kind="keyed_change") - items_before
    batches = sample_sum(metrics, "tandem_wallet_batch_size_count", kind="keyed_change")
    assert items > batches - batches_before  # more than one change in a batch


@pytest.fixture
def wallet_batches(database: Database) -> service.WalletBatches:
    return service.WalletBatches.of(database, batch_max=50, batch_wait=30.0)


def _keyed(
    database: Database, batches: service.WalletBatches, user: int, per_day: int = 1_000_000
) -> Callable[[int, str], asyncio.Future[service.BalanceResult]]:
    """Sends a keyed change of ``user`` (anonymous) through ``batches``, in the background."""

    def send(amount: int, key: str) -> asyncio.Future[service.BalanceResult]:
        return asyncio.ensure_future(
            service.update_balance(
                database.pool, user, amount, key, None, ANONYMOUS, per_day, batches
            )
        )

    return send


async def test_one_key_twice_never_shares_a_batch(
    client: httpx.AsyncClient,
    database: Database,
    database_url: str,
    wallet_batches: service.WalletBatches,
) -> None:
    """Queued behind a keyed change in flight: a, b, a again, a with another amount. The
    first a and b go together; the second a waits for the next batch and replays the first
    a's outcome (its entry and balance), and the third is told 422 in a batch of its own:
    three batches, two entries after the first."""
    user = await new_user(client, 100)
    send = _keyed(database, wallet_batches, user)
    sent = batches_sent("keyed_change")
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = send(-1, f"first-{user}")
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        queued = [send(-1, f"a-{user}"), send(-1, f"b-{user}"), send(-1, f"a-{user}")]
        queued.append(send(-5, f"a-{user}"))
        await asyncio.sleep(0)
    done = await asyncio.gather(first, *queued, return_exceptions=True)
    assert batches_sent("keyed_change") == sent + 3
    assert isinstance(done[4], IdempotencyKeyReusedError), done[4]
    made = [d for d in done[:4] if isinstance(d, service.BalanceResult)]
    assert [(d.balance, d.replayed) for d in made] == [
        (99, False),
        (98, False),
        (97, False),
        (98, True),
    ]
    assert made[3].entry_id == made[1].entry_id
    assert await entries(database_url, user) == [(-1, 99), (-1, 98), (-1, 97)]


async def test_a_key_pruned_after_it_applied_replays_in_a_batch(
    client: httpx.AsyncClient,
    database: Database,
    database_url: str,
    wallet_batches: service.WalletBatches,
) -> None:
    """A key applied, its stored outcome pruned (deleted here): sent again inside a batch, it
    is claimed anew, found in the journal and replayed (its entry, its balance), while the new
    key beside it applies; the pruned key's outcome is stored again."""
    user = await new_user(client, 100)
    send = _keyed(database, wallet_batches, user)
    old = await send(-10, f"old-{user}")
    await fetch(database_url, "DELETE FROM idempotency_keys WHERE key = $1", f"old-{user}")
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = send(-1, f"first-{user}")
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        queued = [send(-10, f"old-{user}"), send(-2, f"new-{user}")]
        await asyncio.sleep(0)
    done = await asyncio.gather(first, *queued)
    assert [(d.balance, d.entry_id, d.replayed) for d in done[1:]] == [
        (90, old.entry_id, True),
        (87, done[2].entry_id, False),
    ]
    assert await entries(database_url, user) == [(-10, 90), (-1, 89), (-2, 87)]
    stored = await fetch(
        database_url, "SELECT outcome FROM idempotency_keys WHERE key = $1", f"old-{user}"
    )
    assert [r["outcome"] for r in stored] == ["ok"]


async def test_the_daily_cap_is_decided_per_item_in_a_batch(
    client: httpx.AsyncClient,
    database: Database,
    database_url: str,
    wallet_batches: service.WalletBatches,
) -> None:
    """A caller with room for 3 more new keys today sends 5 (one in flight, 4 queued): the
    batch would pass the cap, so it rolls back (nothing counted, nothing claimed) and its items
    go alone in order: the first 3 keys apply, the last 2 are refused 429 with nothing stored."""
    used = await fetch(
        database_url,
        "SELECT coalesce(sum(used), 0) FROM idempotency_usage WHERE api_key_id IS NULL"
        " AND day = (clock_timestamp() AT TIME ZONE 'UTC')::date",
    )
    user = await new_user(client, 100)
    send = _keyed(database, wallet_batches, user, per_day=used[0][0] + 3)
    keys = [f"cap-{user}-{n}" for n in range(5)]
    sent = batches_sent("keyed_change")
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = send(-1, keys[0])
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        queued = [send(-1, key) for key in keys[1:]]
        await asyncio.sleep(0)
    done = await asyncio.gather(first, *queued, return_exceptions=True)
    assert batches_sent("keyed_change") == sent + 1  # the batch was sent, then rolled back
    assert [d.balance for d in done[:3]] == [99, 98, 97]  # type: ignore[union-attr]
    assert all(isinstance(d, TooManyIdempotencyKeysError) for d in done[3:]), done
    assert await entries(database_url, user) == [(-1, 99), (-1, 98), (-1, 97)]
    claimed = await fetch(
        database_url, "SELECT key FROM idempotency_keys WHERE key = ANY($1) ORDER BY key", keys
    )
    assert [r["key"] for r in claimed] == keys[:3]
    counted = await fetch(
        database_url,
        "SELECT coalesce(sum(used), 0) FROM idempotency_usage WHERE api_key_id IS NULL"
        " AND day = (clock_timestamp() AT TIME ZONE 'UTC')::date",
    )
    assert counted[0][0] == used[0][0] + 3  # the rolled-back batch counted nothing


async def test_a_pruned_key_reused_in_a_batch_is_told_422_and_the_rest_apply(
    client: httpx.AsyncClient,
    database: Database,
    database_url: str,
    wallet_batches: service.WalletBatches,
) -> None:
    """A key applied, its stored outcome pruned, then sent again inside a batch with another
    amount: the journal shows it applied something else, so the batch rolls back and its
    changes go one by one, in order: that one is told 422 and changes nothing, the others
    apply as they would have."""
    user = await new_user(client, 100)
    send = _keyed(database, wallet_batches, user)
    await send(-10, f"old-{user}")
    await fetch(database_url, "DELETE FROM idempotency_keys WHERE key = $1", f"old-{user}")
    sent = batches_sent("keyed_change")
    async with holding(database_url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
        first = send(-1, f"first-{user}")
        await _waiting_in(database_url, "tandem_apply_delta_v2")
        queued = [send(-2, f"before-{user}"), send(-5, f"old-{user}"), send(-3, f"after-{user}")]
        await asyncio.sleep(0)
    done = await asyncio.gather(first, *queued, return_exceptions=True)
    assert batches_sent("keyed_change") == sent + 1
    assert isinstance(done[2], IdempotencyKeyReusedError), done[2]
    assert [d.balance for d in (done[0], done[1], done[3])] == [89, 87, 84]  # type: ignore[union-attr]
    assert await entries(database_url, user) == [(-10, 90), (-1, 89), (-2, 87), (-3, 84)]


# --- helpers ----------------------------------------------------------------------------------

# Backends of this database waiting on a lock, with their statement.
LOCK_WAITERS = """
SELECT pid, query FROM pg_stat_activity
WHERE datname = current_database() AND wait_event_type = 'Lock'
"""


async def _waiting_in(url: str, function: str, count: int = 1) -> int:
    """A backend waiting on a lock in a statement calling ``function``, once ``count`` are."""
    found: list[int] = []

    async def waiting() -> bool:
        rows = await fetch(url, LOCK_WAITERS)
        found[:] = [r["pid"] for r in rows if f"{function}(" in r["query"]]
        return len(found) == count

    await until(waiting, 10)
    return found[0]


async def _terminate_waiting(url: str, function: str) -> None:
    """Ends the backend waiting on a lock in ``function``."""
    await fetch(url, "SELECT pg_terminate_backend($1)", await _waiting_in(url, function))


async def test_without_the_batch_function_every_change_goes_alone(
    own_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """On a database below migration 0018 (its function dropped here, as its downgrade does),
    a batch finds no function: its changes are sent one by one and all apply, and the
    instance says once that group commit waits for the migration."""
    url = own_database_url
    await fetch(url, APPLY_DELTAS_V1.drop_statement())
    user = (await fetch(url, "INSERT INTO users (balance) VALUES (100) RETURNING id"))[0][0]
    database = Database(Settings(database_url=url))
    await database.open()
    try:
        batches = GroupCommit(database, batch_max=50, batch_wait=30.0)
        async with holding(url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
            first = asyncio.ensure_future(batches.apply(user, withdrawal(1)))
            await _waiting_in(url, "tandem_apply_delta_v2")
            queued = [asyncio.ensure_future(batches.apply(user, withdrawal(1))) for _ in range(3)]
            await asyncio.sleep(0)
        done = await asyncio.gather(first, *queued)
        # Now every change goes alone at once, none queued behind another for a batch: three
        # at once each wait on the row lock in a statement of their own.
        async with holding(url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):
            later = [asyncio.ensure_future(batches.apply(user, withdrawal(1))) for _ in range(3)]
            await _waiting_in(url, "tandem_apply_delta_v2", count=3)
        done += await asyncio.gather(*later)
    finally:
        await database.close()
    assert sorted(outcome(d) for d in done) == [(b, True) for b in range(93, 100)]
    assert caplog.text.count("group commit waits for migration 0018") == 1
    assert await entries(url, user, opening=False) == [(-1, b) for b in range(99, 92, -1)]
