"""The change stream in process (a real PostgreSQL): every change of money writes its event in
its own transaction, the sequencer's positions never skip an event that commits late and keep
each user's order (the three traps, with transactions held open and committed out of order),
the events rebuild every balance, and GET /events answers bad input with stable codes, holds
a bound key to its users, expires cursors past the retention and waits for what comes next."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import asyncpg
import httpx
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.events import repository
from tests.access.keys import make_key
from tests.support import app_settings, assert_error, fetch, in_process_client, new_user
from tests.support.events import cursor_now, follow, stamp


def rebuild(events: list[dict[str, Any]]) -> dict[int, int]:
    """Each user's balance from the events alone (the last balance-after seen)."""
    balances: dict[int, int] = {}
    for event in events:
        data = event["data"]
        if event["type"] in ("user.created", "balance.updated"):
            balances[data["userId"]] = data["balance"]
        for leg in data.get("legs", ()):
            balances[leg["userId"]] = leg["balance"]
    return balances


async def test_every_change_writes_one_event_and_the_events_rebuild_every_balance(
    client: httpx.AsyncClient, database_url: str
) -> None:
    start = await cursor_now(client, database_url)
    payer, payee = await new_user(client, 1000), await new_user(client, 50)
    assert (await client.post("/balance/update", json={"userId": payer, "amount": 5})).is_success
    refused = await client.post("/balance/update", json={"userId": payee, "amount": -10_000})
    assert refused.status_code == 409
    transfer = await client.post(
        "/transfers", json={"fromUserId": payer, "toUserId": payee, "amount": 30}
    )
    assert transfer.status_code == 201, transfer.text
    hold = await client.post("/holds", json={"userId": payer, "toUserId": payee, "amount": 100})
    assert hold.status_code == 201, hold.text
    hold_id = hold.json()["holdId"]
    captured = await client.post(f"/holds/{hold_id}/capture", json={"amount": 60})
    assert captured.status_code == 200, captured.text
    second = await client.post("/holds", json={"userId": payer, "amount": 7})
    released = await client.post(f"/holds/{second.json()['holdId']}/release", json={})
    assert released.status_code == 200, released.text

    await stamp(database_url)
    events, _ = await follow(client, start)
    mine = [e for e in events if {payer, payee} & _users(e)]
    assert [e["type"] for e in mine] == [
        "user.created",
        "user.created",
        "balance.updated",
        "transfer.created",
        "hold.created",
        "hold.captured",
        "hold.created",
        "hold.released",
    ]
    assert len({e["id"] for e in events}) == len(events)
    transfer_event = mine[3]["data"]
    assert transfer_event["transferId"] == transfer.json()["transferId"]
    assert [(leg["userId"], leg["amount"]) for leg in transfer_event["legs"]] == [
        (payer, -30),
        (payee, 30),
    ]
    capture = mine[5]["data"]
    assert (capture["holdId"], capture["amount"], capture["released"], capture["held"]) == (
        hold_id,
        60,
        40,
        0,
    )
    assert mine[6]["data"]["held"] == 7
    assert mine[7]["data"]["held"] == 0
    # Every balance, from the events alone, is the one the wallet holds.
    rebuilt = rebuild(events)
    for user in (payer, payee):
        balance = (await client.get(f"/balance/{user}")).json()["balance"]
        assert rebuilt[user] == balance


def _users(event: dict[str, Any]) -> set[int]:
    data = event["data"]
    return {data[k] for k in ("userId", "toUserId") if data.get(k)} | {
        leg["userId"] for leg in data.get("legs", ())
    }


@pytest.fixture
async def owner(database_url: str) -> AsyncIterator[list[asyncpg.Connection]]:
    """Connections of the owner's to hold transactions open, closed after the test."""
    opened: list[asyncpg.Connection] = []
    yield opened
    for conn in opened:
        await conn.close()


async def _open(url: str, owner: list[asyncpg.Connection]) -> asyncpg.Connection:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    owner.append(conn)
    return conn


DEPOSIT = "SELECT balance FROM tandem_apply_delta_v2($1, $2, NULL, NULL, NULL)"
TRANSFER = "SELECT outcome FROM tandem_transfer_v3($1, $2, $3, NULL, NULL, NULL)"


async def test_a_lower_id_that_commits_later_is_not_skipped(
    client: httpx.AsyncClient, database_url: str, owner: list[asyncpg.Connection]
) -> None:
    """Trap 1: two writers take event ids 7 and 8, 8 commits first; a reader past 8 still
    gets 7."""
    start = await cursor_now(client, database_url)
    first, second = await new_user(client), await new_user(client)
    start = await cursor_now(client, database_url)
    early, late = await _open(database_url, owner), await _open(database_url, owner)
    early_tx = early.transaction()
    await early_tx.start()
    await early.fetchval(DEPOSIT, first, 1)  # the lower event id, still uncommitted
    await late.fetchval(DEPOSIT, second, 2)  # the higher one, committed
    await stamp(database_url)
    seen, cursor = await follow(client, start)
    assert [e["data"]["userId"] for e in seen] == [second]
    await early_tx.commit()
    await stamp(database_url)
    after, _ = await follow(client, cursor)
    assert [e["data"]["userId"] for e in after] == [first]
    ids = [int(e["id"].removeprefix("evt_")) for e in seen + after]
    assert ids[0] > ids[1], "the trap: the event committed later has the lower id"


async def test_each_users_order_holds_when_transaction_ids_are_taken_before_the_lock(
    client: httpx.AsyncClient, database_url: str, owner: list[asyncpg.Connection]
) -> None:
    """Trap 2: a transfer takes its transaction id at its first row lock (the payer) and then
    waits for the payee's row, held by a change that began later; it commits after that
    change, and the payee's events come in the payee's order all the same."""
    payer, payee = await new_user(client), await new_user(client)
    start = await cursor_now(client, database_url)
    holder, transferring = await _open(database_url, owner), await _open(database_url, owner)
    held = holder.transaction()
    await held.start()
    # The transfer first takes a transaction id (a write of its own), then waits for payee.
    transfer_tx = transferring.transaction()
    await transfer_tx.start()
    await transferring.fetchval("SELECT txid_current()")
    await holder.fetchval(DEPOSIT, payee, 5)  # payee's row locked, its entry written
    transfer = asyncio.ensure_future(transferring.fetchval(TRANSFER, payer, payee, 3))
    await asyncio.sleep(0.2)
    assert not transfer.done(), "the transfer waits for the payee's row"
    await held.commit()
    assert await transfer == "ok"
    await transfer_tx.commit()
    await stamp(database_url)
    events, _ = await follow(client, start, userId=str(payee))
    journal = await fetch(
        database_url, "SELECT id FROM ledger_entries WHERE user_id = $1 ORDER BY id", payee
    )
    seen_entries = [
        leg["entryId"]
        for e in events
        for leg in (e["data"].get("legs") or [e["data"]])
        if leg["userId"] == payee
    ]
    assert seen_entries == [r["id"] for r in journal][1:]
    assert [e["type"] for e in events] == ["balance.updated", "transfer.created"]


async def test_an_unrelated_open_transaction_neither_stalls_nor_reorders_the_stream(
    client: httpx.AsyncClient, database_url: str, owner: list[asyncpg.Connection]
) -> None:
    """Trap 3: a transaction left open (it pins the snapshot horizon between two changes of
    one user) holds nothing back: both changes are read at once, in the user's order."""
    user = await new_user(client)
    start = await cursor_now(client, database_url)
    idle = await _open(database_url, owner)
    pinning = idle.transaction()
    await pinning.start()
    await idle.fetchval("SELECT txid_current()")
    await client.post("/balance/update", json={"userId": user, "amount": 1})
    other = await new_user(client)
    await client.post("/balance/update", json={"userId": user, "amount": -1})
    await stamp(database_url)
    events, _ = await follow(client, start)
    assert [(e["type"], e["data"]["userId"]) for e in events] == [
        ("balance.updated", user),
        ("user.created", other),
        ("balance.updated", user),
    ]
    assert [e["data"]["amount"] for e in events if e["type"] == "balance.updated"] == [1, -1]
    await pinning.rollback()


async def test_a_bound_key_reads_only_its_users_events_and_its_own_leg(
    client: httpx.AsyncClient, database_url: str
) -> None:
    mine, theirs = await new_user(client), await new_user(client)
    start = await cursor_now(client, database_url)
    await client.post("/balance/update", json={"userId": theirs, "amount": 3})
    await client.post("/transfers", json={"fromUserId": theirs, "toUserId": mine, "amount": 2})
    await stamp(database_url)
    token = await make_key(
        database_url, "events-bound", "events:read", users=[mine], known_to=client
    )
    bound = {"Authorization": f"Bearer {token}"}
    response = await client.get("/events", params={"after": start}, headers=bound)
    assert response.status_code == 200, response.text
    events = response.json()["events"]
    assert [e["type"] for e in events] == ["transfer.created"]
    assert [leg["userId"] for leg in events[0]["data"]["legs"]] == [mine]
    refused = await client.get("/events", params={"userId": str(theirs)}, headers=bound)
    assert_error(refused, 404, "user_not_found")


@pytest.mark.parametrize(
    ("params", "status", "code"),
    [
        ({"after": "abc"}, 400, "invalid_cursor"),
        ({"after": "-1"}, 400, "invalid_cursor"),
        ({"after": "99999999999999999999"}, 400, "invalid_cursor"),
        ({"after": "9223372036854775807"}, 400, "invalid_cursor"),
        ({"types": "balance.updated,nope"}, 422, "unknown_event_type"),
        ({"types": ""}, 422, "unknown_event_type"),
        ({"limit": "0"}, 422, "validation_error"),
        ({"limit": "1001"}, 422, "validation_error"),
        ({"limit": "1.5"}, 422, "validation_error"),
        ({"wait": "31"}, 422, "validation_error"),
        ({"wait": "-1"}, 422, "validation_error"),
        ({"wait": "nan"}, 422, "validation_error"),
        ({"userId": "0"}, 422, "validation_error"),
        ({"userId": "x"}, 422, "validation_error"),
    ],
)
async def test_bad_input_gets_a_stable_code(
    client: httpx.AsyncClient, params: dict[str, str], status: int, code: str
) -> None:
    assert_error(await client.get("/events", params=params), status, code)


async def test_a_cursor_past_the_retention_has_expired(
    client: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(client)
    await client.post("/balance/update", json={"userId": user, "amount": 1})
    start = await cursor_now(client, database_url)
    await client.post("/balance/update", json={"userId": user, "amount": 2})
    newest = await cursor_now(client, database_url)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # Everything made before now is past a retention of 0.
        pruned = await repository.prune_events(conn, timedelta(0), 100_000)
    finally:
        await conn.close()
    assert pruned > 0
    assert_error(await client.get("/events", params={"after": start}), 410, "cursor_expired")
    # Without a cursor: from the oldest kept (nothing, all pruned), and `next` is still good.
    response = await client.get("/events")
    assert response.status_code == 200
    assert response.json()["events"] == []
    assert response.json()["next"] == newest


async def test_a_waiting_read_answers_when_an_event_arrives(
    client: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(client)
    start = await cursor_now(client, database_url)
    waiting = asyncio.ensure_future(
        client.get("/events", params={"after": start, "wait": "20", "userId": str(user)})
    )
    await asyncio.sleep(0.3)
    assert not waiting.done(), "nothing yet: the read waits"
    await client.post("/balance/update", json={"userId": user, "amount": 4})
    await stamp(database_url)
    response = await waiting
    assert response.status_code == 200
    assert [e["data"]["amount"] for e in response.json()["events"]] == [4]


async def test_a_wait_is_cut_to_the_servers_longest(database_url: str) -> None:
    """TANDEM_EVENTS_WAIT_MAX=0: a read that finds nothing answers at once, whatever `wait`."""
    async with in_process_client(app_settings(database_url, events_wait_max=0)) as client:
        end = await cursor_now(client, database_url)
        response = await asyncio.wait_for(
            client.get("/events", params={"after": end, "wait": "30"}), 10
        )
    assert response.status_code == 200
    assert response.json() == {"events": [], "next": end}
