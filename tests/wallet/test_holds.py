"""Holds in process (the app itself over ASGI, a real PostgreSQL): a hold reserves part of a
balance, is captured once (all or part, to a payee or withdrawn, the rest released),
released, or expires by the database's clock, never early; spending counts only what is
available, and an expired hold never blocks it; keyed requests replay; bound keys see and
change only what is theirs; bad input changes nothing."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import datetime
from typing import Any

import asyncpg
import httpx
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.core.ids import INT64_MAX
from tandem.wallet import repository
from tests.access.keys import bearer, make_key
from tests.support import assert_error, fetch, new_user, until

# Everything a hold request could change, read in one statement.
STATE = """
SELECT (SELECT array_agg(balance ORDER BY id) FROM users),
       (SELECT array_agg(held ORDER BY id) FROM users),
       (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM transfers),
       (SELECT array_agg(status ORDER BY id) FROM holds), (SELECT count(*) FROM hold_events),
       (SELECT count(*) FROM idempotency_keys), (SELECT coalesce(sum(amount), 0) FROM key_debits)
"""


async def hold(client: httpx.AsyncClient, user: int, amount: int, **extra: Any) -> dict[str, Any]:
    """A new hold (201), its body."""
    headers = extra.pop("headers", None)
    answer = await client.post(
        "/holds", json={"userId": user, "amount": amount, **extra}, headers=headers
    )
    assert answer.status_code == 201, answer.text
    body: dict[str, Any] = answer.json()
    return body


async def balance(client: httpx.AsyncClient, user: int) -> tuple[int, int, int]:
    """The user's balance, held and available, as GET /balance answers them."""
    answer = await client.get(f"/balance/{user}")
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert set(body) == {"userId", "balance", "held", "available"}
    assert body["available"] == body["balance"] - body["held"]
    return body["balance"], body["held"], body["available"]


async def database_now(url: str) -> datetime:
    rows = await fetch(url, "SELECT clock_timestamp()")
    moment: datetime = rows[0][0]
    return moment


async def past(url: str, moment: str, within: float = 10.0) -> None:
    """Returns once the database's clock is at or past ``moment`` (an answer's expiresAt)."""
    due = datetime.fromisoformat(moment)

    async def reached() -> bool:
        return await database_now(url) >= due

    await until(reached, within)


async def test_a_hold_reserves_part_of_the_balance(client: httpx.AsyncClient) -> None:
    """201 with the hold; the balance is unchanged, held and available say the reservation,
    and the hold reads back with its expiry from the database's clock."""
    user, payee = await new_user(client, 1000), await new_user(client, 0)
    made = await hold(client, user, 300, toUserId=payee, expiresIn=60, reference="trade-1")
    assert set(made) == {
        "holdId",
        "userId",
        "toUserId",
        "amount",
        "status",
        "expiresAt",
        "available",
    }
    assert (made["userId"], made["toUserId"], made["amount"]) == (user, payee, 300)
    assert (made["status"], made["available"]) == ("active", 700)
    assert await balance(client, user) == (1000, 300, 700)
    read = (await client.get(f"/holds/{made['holdId']}")).json()
    assert read == {
        "holdId": made["holdId"],
        "userId": user,
        "toUserId": payee,
        "amount": 300,
        "capturedAmount": None,
        "status": "active",
        "expiresAt": made["expiresAt"],
        "createdAt": read["createdAt"],
        "reference": "trade-1",
    }
    lasts = datetime.fromisoformat(read["expiresAt"]) - datetime.fromisoformat(read["createdAt"])
    assert lasts.total_seconds() == 60


async def test_the_default_expiry_is_900_seconds(client: httpx.AsyncClient) -> None:
    user = await new_user(client, 10)
    read = (await client.get(f"/holds/{(await hold(client, user, 1))['holdId']}")).json()
    lasts = datetime.fromisoformat(read["expiresAt"]) - datetime.fromisoformat(read["createdAt"])
    assert lasts.total_seconds() == 900


async def test_spending_counts_only_the_available_amount(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """With 300 of 1000 held: a withdrawal, a transfer or a hold of 701 is 409
    insufficient_funds and changes nothing; of 700 each works (one after the other)."""
    user, other = await new_user(client, 1000), await new_user(client, 0)
    await hold(client, user, 300)
    before = await fetch(database_url, STATE)
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": -701}),
        409,
        "insufficient_funds",
    )
    assert_error(
        await client.post(
            "/transfers", json={"fromUserId": user, "toUserId": other, "amount": 701}
        ),
        409,
        "insufficient_funds",
    )
    assert_error(
        await client.post("/holds", json={"userId": user, "amount": 701}), 409, "insufficient_funds"
    )
    assert await fetch(database_url, STATE) == before
    assert (await client.post("/holds", json={"userId": user, "amount": 700})).status_code == 201
    assert await balance(client, user) == (1000, 1000, 0)
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": -1}),
        409,
        "insufficient_funds",
    )


async def test_capture_of_all_without_a_payee_is_a_withdrawal(client: httpx.AsyncClient) -> None:
    """No body: all of it, withdrawn from the payer; the entry carries the hold's id."""
    user = await new_user(client, 1000)
    made = await hold(client, user, 300)
    answer = await client.post(f"/holds/{made['holdId']}/capture")
    assert answer.status_code == 200, answer.text
    captured = answer.json()
    assert (captured["status"], captured["capturedAmount"]) == ("captured", 300)
    assert captured["transferId"] is None
    assert await balance(client, user) == (700, 0, 700)
    entries = (await client.get(f"/balance/{user}/history")).json()["entries"]
    assert (entries[0]["id"], entries[0]["kind"], entries[0]["amount"]) == (
        captured["entryId"],
        "withdrawal",
        -300,
    )
    assert entries[0]["holdId"] == made["holdId"]
    assert entries[1]["holdId"] is None


async def test_escrow_captures_part_to_the_payee_and_releases_the_rest(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Buyer reserves 1000 for the seller; the trade completes: 900 to the seller as a
    transfer (both legs carry the hold), the other 100 released in the same step."""
    buyer, seller = await new_user(client, 5000), await new_user(client, 0)
    made = await hold(client, buyer, 1000, toUserId=seller)
    answer = await client.post(f"/holds/{made['holdId']}/capture", json={"amount": 900})
    assert answer.status_code == 200, answer.text
    captured = answer.json()
    assert (captured["status"], captured["amount"], captured["capturedAmount"]) == (
        "captured",
        1000,
        900,
    )
    assert await balance(client, buyer) == (4100, 0, 4100)
    assert await balance(client, seller) == (900, 0, 900)
    transfer = (await client.get(f"/transfers/{captured['transferId']}")).json()
    assert (transfer["fromUserId"], transfer["toUserId"], transfer["amount"]) == (
        buyer,
        seller,
        900,
    )
    for user, amount in ((buyer, -900), (seller, 900)):
        entry = (await client.get(f"/balance/{user}/history")).json()["entries"][0]
        assert (entry["kind"], entry["amount"], entry["holdId"]) == (
            "transfer",
            amount,
            made["holdId"],
        )
    events = await fetch(
        database_url,
        "SELECT kind, amount FROM hold_events WHERE hold_id = $1 ORDER BY id",
        made["holdId"],
    )
    assert [(e["kind"], e["amount"]) for e in events] == [
        ("created", 1000),
        ("captured", 900),
        ("released", 100),
    ]


async def test_a_capture_names_the_payee_of_a_hold_made_without_one(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """toUserId at capture pays that user; given for a hold made with a payee it is 409
    payee_already_set and changes nothing."""
    buyer, seller = await new_user(client, 100), await new_user(client, 0)
    open_hold = await hold(client, buyer, 40)
    answer = await client.post(f"/holds/{open_hold['holdId']}/capture", json={"toUserId": seller})
    assert answer.status_code == 200, answer.text
    assert answer.json()["toUserId"] == seller
    assert (await client.get(f"/holds/{open_hold['holdId']}")).json()["toUserId"] == seller
    assert await balance(client, seller) == (40, 0, 40)
    named = await hold(client, buyer, 10, toUserId=seller)
    before = await fetch(database_url, STATE)
    for payee in (seller, buyer):
        assert_error(
            await client.post(f"/holds/{named['holdId']}/capture", json={"toUserId": payee}),
            409,
            "payee_already_set",
        )
    assert await fetch(database_url, STATE) == before


async def test_a_hold_is_captured_once(client: httpx.AsyncClient, database_url: str) -> None:
    """After its capture, another capture or a release is 409 hold_not_active naming the
    state, and changes nothing."""
    user = await new_user(client, 100)
    made = await hold(client, user, 50)
    assert (await client.post(f"/holds/{made['holdId']}/capture", json={"amount": 10})).is_success
    before = await fetch(database_url, STATE)
    for action in ("capture", "release"):
        refused = await client.post(f"/holds/{made['holdId']}/{action}")
        assert_error(refused, 409, "hold_not_active")
        assert refused.json()["error"]["details"][0]["type"] == "captured"
        assert "captured" in refused.json()["error"]["message"]
    assert await fetch(database_url, STATE) == before
    assert await balance(client, user) == (90, 0, 90)


async def test_a_release_gives_the_amount_back_and_answers_again(
    client: httpx.AsyncClient,
) -> None:
    """Released: available again; released twice: 200 released again; captured after: 409."""
    user = await new_user(client, 100)
    made = await hold(client, user, 60)
    # No body and no Content-Type: a valid release.
    first = await client.post(f"/holds/{made['holdId']}/release")
    assert first.status_code == 200, first.text
    assert first.json()["status"] == "released"
    assert await balance(client, user) == (100, 0, 100)
    again = await client.post(f"/holds/{made['holdId']}/release", json={})
    assert again.status_code == 200
    assert again.json() == first.json()
    refused = await client.post(f"/holds/{made['holdId']}/capture")
    assert_error(refused, 409, "hold_not_active")
    assert refused.json()["error"]["details"][0]["type"] == "released"


async def test_expiry_is_never_early(client: httpx.AsyncClient, database_url: str) -> None:
    """Read again and again: active while the database's clock is before expiresAt (read
    before the request), expired only once it is at or past it (read after)."""
    user = await new_user(client, 100)
    made = await hold(client, user, 5, expiresIn=1)
    due = datetime.fromisoformat(made["expiresAt"])

    async def expired() -> bool:
        before = await database_now(database_url)
        status = (await client.get(f"/holds/{made['holdId']}")).json()["status"]
        after = await database_now(database_url)
        if status == "active":
            assert before < due, "active at or past its expiry"
            return False
        assert status == "expired"
        assert after >= due, "expired before its time"
        return True

    await until(expired, 10.0)
    # Expired but not released yet (no task runs here, nothing spent): still held.
    assert await balance(client, user) == (100, 5, 95)
    refused = await client.post(f"/holds/{made['holdId']}/capture")
    assert_error(refused, 409, "hold_not_active")
    assert refused.json()["error"]["details"][0]["type"] == "expired"
    # The refused capture released it (it found it due): available again.
    assert await balance(client, user) == (100, 0, 100)
    release = await client.post(f"/holds/{made['holdId']}/release")
    assert (release.status_code, release.json()["status"]) == (200, "expired")


@pytest.mark.parametrize("spending", ["withdrawal", "transfer", "hold"])
async def test_an_expired_hold_never_blocks_spending(
    client: httpx.AsyncClient, database_url: str, spending: str
) -> None:
    """All of a balance held by a hold now expired (no task releases it here): the user's
    withdrawal, transfer or new hold of all of it works, releasing it in the same request."""
    user, other = await new_user(client, 100), await new_user(client, 0)
    made = await hold(client, user, 100, expiresIn=1)
    await past(database_url, made["expiresAt"])
    assert await balance(client, user) == (100, 100, 0)
    answer = await {
        "withdrawal": lambda: client.post("/balance/update", json={"userId": user, "amount": -100}),
        "transfer": lambda: client.post(
            "/transfers", json={"fromUserId": user, "toUserId": other, "amount": 100}
        ),
        "hold": lambda: client.post("/holds", json={"userId": user, "amount": 100}),
    }[spending]()
    assert answer.is_success, answer.text
    assert (await client.get(f"/holds/{made['holdId']}")).json()["status"] == "expired"
    events = await fetch(
        database_url, "SELECT kind FROM hold_events WHERE hold_id = $1 ORDER BY id", made["holdId"]
    )
    assert [e["kind"] for e in events] == ["created", "expired"]
    assert (await balance(client, user))[1] == (100 if spending == "hold" else 0)


async def test_the_expiry_batch_releases_due_holds_only(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """repository.expire_holds (the expiry task's statement) releases a due hold and leaves
    one not yet due; hold_stats counts them."""
    user = await new_user(client, 100)
    due = await hold(client, user, 10, expiresIn=1)
    later = await hold(client, user, 20, expiresIn=3600)
    await past(database_url, due["expiresAt"])
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await repository.expire_holds(conn, 500) >= 1
        assert await repository.expire_holds(conn, 500) == 0
    finally:
        await conn.close()
    assert (await client.get(f"/holds/{due['holdId']}")).json()["status"] == "expired"
    assert (await client.get(f"/holds/{later['holdId']}")).json()["status"] == "active"
    assert await balance(client, user) == (100, 20, 80)


async def test_a_keyed_hold_replays_its_first_outcome(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """The same request with the same key: the first answer again (Idempotent-Replayed),
    even after the hold was captured and the stored outcome pruned; a different request with
    the key: 422 idempotency_key_reused. Nothing applied twice."""
    user = await new_user(client, 100)
    key = {"Idempotency-Key": f"hold-{user}"}
    body = {"userId": user, "amount": 30, "expiresIn": 600}
    first = await client.post("/holds", json=body, headers=key)
    assert first.status_code == 201, first.text
    again = await client.post("/holds", json=body, headers=key)
    assert (again.status_code, again.headers.get("idempotent-replayed")) == (201, "true")
    assert again.json() == first.json()
    assert_error(
        await client.post("/holds", json={**body, "amount": 31}, headers=key),
        422,
        "idempotency_key_reused",
    )
    assert_error(
        await client.post("/holds", json={**body, "expiresIn": 601}, headers=key),
        422,
        "idempotency_key_reused",
    )
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": -1}, headers=key),
        422,
        "idempotency_key_reused",
    )
    assert (await client.post(f"/holds/{first.json()['holdId']}/capture")).is_success
    await fetch(database_url, "DELETE FROM idempotency_keys WHERE key = $1", key["Idempotency-Key"])
    replayed = await client.post("/holds", json=body, headers=key)
    assert (replayed.status_code, replayed.headers.get("idempotent-replayed")) == (201, "true")
    assert replayed.json() == first.json()
    # ...and a key of a hold is not a balance update's, pruned or not.
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": -1}, headers=key),
        422,
        "idempotency_key_reused",
    )
    assert await balance(client, user) == (70, 0, 70)


async def test_a_keyed_refusal_is_replayed(client: httpx.AsyncClient) -> None:
    """A refused keyed hold stays refused on retry, even once the funds would suffice."""
    user = await new_user(client, 5)
    key = {"Idempotency-Key": f"hold-refused-{user}"}
    body = {"userId": user, "amount": 10}
    assert_error(await client.post("/holds", json=body, headers=key), 409, "insufficient_funds")
    await client.post("/balance/update", json={"userId": user, "amount": 100})
    assert_error(await client.post("/holds", json=body, headers=key), 409, "insufficient_funds")
    assert await balance(client, user) == (105, 0, 105)


@pytest.mark.parametrize("action", ["capture", "release"])
async def test_a_keyed_capture_or_release_replays(
    client: httpx.AsyncClient, database_url: str, action: str
) -> None:
    """Its answer again, with or without the stored outcome; the key with another hold or
    the other action is reused."""
    user, payee = await new_user(client, 100), await new_user(client, 0)
    made = await hold(client, user, 50, toUserId=payee)
    other = await hold(client, user, 5)
    key = {"Idempotency-Key": f"{action}-{made['holdId']}"}
    body = {"amount": 20} if action == "capture" else None
    first = await client.post(f"/holds/{made['holdId']}/{action}", json=body, headers=key)
    assert first.status_code == 200, first.text
    for prune in (False, True):
        if prune:
            await fetch(
                database_url, "DELETE FROM idempotency_keys WHERE key = $1", key["Idempotency-Key"]
            )
        again = await client.post(f"/holds/{made['holdId']}/{action}", json=body, headers=key)
        assert (again.status_code, again.headers.get("idempotent-replayed")) == (200, "true")
        assert again.json() == first.json()
        assert_error(
            await client.post(f"/holds/{other['holdId']}/{action}", json=body, headers=key),
            422,
            "idempotency_key_reused",
        )
        flip = "release" if action == "capture" else "capture"
        assert_error(
            await client.post(f"/holds/{made['holdId']}/{flip}", headers=key),
            422,
            "idempotency_key_reused",
        )
    assert (await client.get(f"/holds/{other['holdId']}")).json()["status"] == "active"
    assert await balance(client, payee) == ((20, 0, 20) if action == "capture" else (0, 0, 0))


async def test_bound_keys_on_holds(client: httpx.AsyncClient, database_url: str) -> None:
    """A key bound to the payer makes, reads, lists, captures and releases its holds; one
    bound to the payee reads them (and lists none of the payer's); any other bound key is
    told they do not exist; an unbound key does everything."""
    payer, payee, stranger = [await new_user(client, 1000) for _ in range(3)]
    payer_key = bearer(
        await make_key(
            database_url,
            f"payer-{payer}",
            "wallet:read",
            "wallet:write",
            users=[payer],
            known_to=client,
        )
    )
    payee_key = bearer(
        await make_key(
            database_url,
            f"payee-{payee}",
            "wallet:read",
            "wallet:write",
            users=[payee],
            known_to=client,
        )
    )
    other_key = bearer(
        await make_key(
            database_url,
            f"other-{stranger}",
            "wallet:read",
            "wallet:write",
            users=[stranger],
            known_to=client,
        )
    )
    body = {"userId": payer, "amount": 10, "toUserId": payee}
    for key in (payee_key, other_key):
        assert_error(await client.post("/holds", json=body, headers=key), 404, "user_not_found")
    made = (await client.post("/holds", json=body, headers=payer_key)).json()
    path = f"/holds/{made['holdId']}"
    for key in (payer_key, payee_key):
        assert (await client.get(path, headers=key)).json()["holdId"] == made["holdId"]
    assert_error(await client.get(path, headers=other_key), 404, "hold_not_found")
    listed = await client.get(f"/balance/{payer}/holds", headers=payer_key)
    assert [h["holdId"] for h in listed.json()["holds"]] == [made["holdId"]]
    for key in (payee_key, other_key):
        assert_error(
            await client.get(f"/balance/{payer}/holds", headers=key), 404, "user_not_found"
        )
    before = await fetch(database_url, STATE)
    for key in (payee_key, other_key):
        for action in ("capture", "release"):
            assert_error(await client.post(f"{path}/{action}", headers=key), 404, "hold_not_found")
    assert await fetch(database_url, STATE) == before
    assert (await client.post(f"{path}/capture", json={"amount": 4}, headers=payer_key)).is_success
    second = (await client.post("/holds", json=body, headers=payer_key)).json()
    released = await client.post(f"/holds/{second['holdId']}/release", headers=payer_key)
    assert released.json()["status"] == "released"
    assert await balance(client, payee) == (1004, 0, 1004)


async def test_a_hold_counts_against_the_debit_limit_once(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """A hold counts when made; its capture does not count again; past the limit a hold is
    429 and changes nothing."""
    user, payee = await new_user(client, 1000), await new_user(client, 0)
    token = bearer(
        await make_key(
            database_url,
            f"limited-{user}",
            "wallet:read",
            "wallet:write",
            debit_limits=("10/day",),
            known_to=client,
        )
    )
    made = (
        await client.post(
            "/holds", json={"userId": user, "amount": 6, "toUserId": payee}, headers=token
        )
    ).json()
    captured = await client.post(f"/holds/{made['holdId']}/capture", headers=token)
    assert captured.status_code == 200, captured.text
    assert (
        await client.post("/holds", json={"userId": user, "amount": 4}, headers=token)
    ).is_success
    before = await fetch(database_url, STATE)
    refused = await client.post("/holds", json={"userId": user, "amount": 1}, headers=token)
    assert_error(refused, 429, "debit_limit_exceeded")
    assert await fetch(database_url, STATE) == before
    assert await balance(client, user) == (994, 4, 990)


BAD_HOLDS: list[tuple[str, dict[str, Any] | bytes, int, str]] = [
    ("zero amount", {"amount": 0}, 422, "validation_error"),
    ("negative amount", {"amount": -5}, 422, "validation_error"),
    ("float amount", {"amount": 5.0}, 422, "validation_error"),
    ("string amount", {"amount": "5"}, 422, "validation_error"),
    ("amount past int64", {"amount": INT64_MAX + 1}, 422, "validation_error"),
    ("zero expiresIn", {"expiresIn": 0}, 422, "validation_error"),
    ("negative expiresIn", {"expiresIn": -1}, 422, "validation_error"),
    ("expiresIn past 30 days", {"expiresIn": 2_592_001}, 422, "validation_error"),
    ("float expiresIn", {"expiresIn": 60.0}, 422, "validation_error"),
    ("payee is the payer", {"toUserId": "payer"}, 422, "validation_error"),
    ("unknown field", {"note": "x"}, 422, "validation_error"),
    ("empty reference", {"reference": ""}, 422, "validation_error"),
    ("unknown payer", {"userId": 10**15}, 404, "user_not_found"),
    ("unknown payee", {"toUserId": 10**15}, 404, "user_not_found"),
    ("more than available", {"amount": 1001}, 409, "insufficient_funds"),
    ("duplicate key", b'{"userId": %d, "amount": 5, "amount": 6}', 422, "validation_error"),
    ("malformed JSON", b'{"userId": %d, "amount": ', 422, "validation_error"),
]


@pytest.fixture(scope="module")
async def bad_input_users(client: httpx.AsyncClient) -> tuple[int, int]:
    return await new_user(client, 1000), await new_user(client, 0)


@pytest.mark.parametrize(
    ("change", "status", "code"), [b[1:] for b in BAD_HOLDS], ids=[b[0] for b in BAD_HOLDS]
)
async def test_a_bad_hold_is_refused_and_changes_nothing(
    client: httpx.AsyncClient,
    database_url: str,
    bad_input_users: tuple[int, int],
    change: dict[str, Any] | bytes,
    status: int,
    code: str,
) -> None:
    payer, payee = bad_input_users
    before = await fetch(database_url, STATE)
    if isinstance(change, bytes):
        answer = await client.post(
            "/holds", content=change % payer, headers={"content-type": "application/json"}
        )
    else:
        fields = {k: payer if v == "payer" else v for k, v in change.items()}
        answer = await client.post(
            "/holds", json={"userId": payer, "amount": 5, "toUserId": payee, **fields}
        )
    assert_error(answer, status, code)
    if change == {"toUserId": 10**15}:
        assert answer.json()["error"]["details"][0]["field"] == "toUserId"
    assert await fetch(database_url, STATE) == before


BAD_CAPTURES: list[tuple[str, dict[str, Any] | None, int, str]] = [
    ("zero amount", {"amount": 0}, 422, "validation_error"),
    ("negative amount", {"amount": -1}, 422, "validation_error"),
    ("float amount", {"amount": 1.5}, 422, "validation_error"),
    ("string amount", {"amount": "1"}, 422, "validation_error"),
    ("more than the hold", {"amount": 11}, 422, "amount_exceeds_hold"),
    ("payee is the payer", {"toUserId": "payer"}, 422, "validation_error"),
    ("unknown payee", {"toUserId": 10**15}, 404, "user_not_found"),
    ("unknown field", {"note": 1}, 422, "validation_error"),
]


@pytest.mark.parametrize(
    ("body", "status", "code"), [b[1:] for b in BAD_CAPTURES], ids=[b[0] for b in BAD_CAPTURES]
)
async def test_a_bad_capture_is_refused_and_changes_nothing(
    client: httpx.AsyncClient,
    database_url: str,
    bad_input_users: tuple[int, int],
    body: dict[str, Any] | None,
    status: int,
    code: str,
) -> None:
    payer, _ = bad_input_users
    made = await hold(client, payer, 10)
    before = await fetch(database_url, STATE)
    asked = None if body is None else {k: payer if v == "payer" else v for k, v in body.items()}
    answer = await client.post(f"/holds/{made['holdId']}/capture", json=asked)
    assert_error(answer, status, code)
    assert await fetch(database_url, STATE) == before
    assert (await client.post(f"/holds/{made['holdId']}/release")).is_success


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code"),
    [
        ("GET", "/holds/{missing}", None, 404, "hold_not_found"),
        ("POST", "/holds/{missing}/capture", None, 404, "hold_not_found"),
        ("POST", "/holds/{missing}/release", None, 404, "hold_not_found"),
        ("GET", "/holds/abc", None, 422, "validation_error"),
        ("GET", "/holds/0", None, 422, "validation_error"),
        ("POST", "/holds/007/capture", None, 422, "validation_error"),
        ("POST", "/holds/{hold}/release", {"reason": "x"}, 422, "validation_error"),
        ("GET", "/balance/{missing}/holds", None, 404, "user_not_found"),
        ("GET", "/balance/{user}/holds?limit=0", None, 422, "validation_error"),
        ("GET", "/balance/{user}/holds?limit=201", None, 422, "validation_error"),
        ("GET", "/balance/{user}/holds?status=pending", None, 422, "validation_error"),
    ],
)
async def test_bad_hold_ids_and_queries(
    client: httpx.AsyncClient,
    database_url: str,
    bad_input_users: tuple[int, int],
    method: str,
    path: str,
    body: dict[str, Any] | None,
    status: int,
    code: str,
) -> None:
    payer, _ = bad_input_users
    made = await hold(client, payer, 1)
    before = await fetch(database_url, STATE)
    answer = await client.request(
        method, path.format(missing=10**15, hold=made["holdId"], user=payer), json=body
    )
    assert_error(answer, status, code)
    assert await fetch(database_url, STATE) == before
    assert (await client.post(f"/holds/{made['holdId']}/release")).is_success


async def test_holds_are_listed_newest_first_by_keyset(client: httpx.AsyncClient) -> None:
    """Pages of `limit`, `nextBefore` to the next, `status` keeping one state."""
    user = await new_user(client, 100)
    made = [(await hold(client, user, 1))["holdId"] for _ in range(5)]
    await client.post(f"/holds/{made[1]}/release")
    first = (await client.get(f"/balance/{user}/holds?limit=2")).json()
    assert [h["holdId"] for h in first["holds"]] == [made[4], made[3]]
    rest = (await client.get(f"/balance/{user}/holds?before={first['nextBefore']}")).json()
    assert [h["holdId"] for h in rest["holds"]] == [made[2], made[1], made[0]]
    assert rest["nextBefore"] is None
    active = (await client.get(f"/balance/{user}/holds?status=active")).json()
    assert [h["holdId"] for h in active["holds"]] == [made[4], made[3], made[2], made[0]]
    released = (await client.get(f"/balance/{user}/holds?status=released")).json()
    assert [h["holdId"] for h in released["holds"]] == [made[1]]
    assert (await client.get(f"/balance/{user}/holds?status=captured")).json()["holds"] == []


async def test_each_change_of_a_hold_records_its_key(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """The hold, its events and its capture's entries name the API key that made them."""
    user = await new_user(client, 100)
    token = await make_key(database_url, f"teller-{user}", "wallet:write", known_to=client)
    made = (
        await client.post("/holds", json={"userId": user, "amount": 7}, headers=bearer(token))
    ).json()
    assert (await client.post(f"/holds/{made['holdId']}/capture", headers=bearer(token))).is_success
    rows = await fetch(
        database_url,
        """
        SELECT (SELECT k.name FROM holds h JOIN api_keys k ON k.id = h.api_key_id
                WHERE h.id = $1),
               (SELECT array_agg(k.name ORDER BY v.id) FROM hold_events v
                JOIN api_keys k ON k.id = v.api_key_id WHERE v.hold_id = $1),
               (SELECT array_agg(k.name) FROM ledger_entries e
                JOIN api_keys k ON k.id = e.api_key_id WHERE e.hold_id = $1)
        """,
        made["holdId"],
    )
    name = f"teller-{user}"
    assert tuple(rows[0]) == (name, [name, name], [name])


@pytest.fixture
def holds_off(database_url: str) -> Iterator[None]:
    """Holds not enabled (a database whose contract 0017 waits), for one test."""
    from tests.support import query

    query(database_url, "UPDATE wallet_settings SET holds_enabled = false")
    try:
        yield
    finally:
        query(database_url, "UPDATE wallet_settings SET holds_enabled = true")


async def test_holds_are_unavailable_until_enabled(
    client: httpx.AsyncClient, database_url: str, holds_off: None
) -> None:
    """503 holds_unavailable with Retry-After, nothing changed and the key not stored: the
    same keyed request works once holds are enabled."""
    user = await new_user(client, 100)
    key = {"Idempotency-Key": f"before-enabled-{user}"}
    before = await fetch(database_url, STATE)
    refused = await client.post("/holds", json={"userId": user, "amount": 5}, headers=key)
    assert_error(refused, 503, "holds_unavailable")
    assert "retry-after" in refused.headers
    assert await fetch(database_url, STATE) == before
    await fetch(database_url, "UPDATE wallet_settings SET holds_enabled = true")
    made = await client.post("/holds", json={"userId": user, "amount": 5}, headers=key)
    assert made.status_code == 201, made.text
    assert "idempotent-replayed" not in made.headers


async def test_the_previous_releases_functions_work_with_nothing_held(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """The previous release's withdrawal (tandem_apply_delta_v1) and transfer
    (tandem_transfer_v2) work against this schema while nothing is held (holds are enabled
    only once none of its instances is live); with something held, the CHECK on held refuses
    what they would let through instead of spending it."""
    user, other = await new_user(client, 100), await new_user(client, 0)
    withdrawn = await fetch(
        database_url, "SELECT * FROM tandem_apply_delta_v1($1, -10, NULL, NULL, NULL)", user
    )
    assert (withdrawn[0]["balance"], withdrawn[0]["applied"]) == (90, True)
    moved = await fetch(
        database_url, "SELECT * FROM tandem_transfer_v2($1, $2, 20, NULL, NULL, NULL)", user, other
    )
    assert (moved[0]["outcome"], moved[0]["from_balance"]) == ("ok", 70)
    refused = await fetch(
        database_url, "SELECT * FROM tandem_apply_delta_v1($1, -71, NULL, NULL, NULL)", user
    )
    assert refused[0]["applied"] is False
    await hold(client, user, 60)
    with pytest.raises(asyncpg.CheckViolationError, match="held_within_balance"):
        await fetch(
            database_url, "SELECT * FROM tandem_apply_delta_v1($1, -20, NULL, NULL, NULL)", user
        )
    assert await balance(client, user) == (70, 60, 10)


async def test_the_ledger_verifies_after_holds(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """After every test above, the ledger and its holds verify (held is the sum of active
    holds, captures match their events and entries); a planted mismatch of held is found."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        found = await repository.verify_ledger(conn, 60.0)
        assert found is not None
        assert found.holds_checked > 0
        assert (found.mismatches, found.holds) == (0, [])
    finally:
        await conn.close()


@pytest.fixture
async def owner_conn(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        yield conn
    finally:
        await conn.close()


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE holds SET status = 'active' WHERE status = 'released'",
        "UPDATE holds SET amount = amount + 1 WHERE status = 'active'",
        "UPDATE holds SET status = 'captured', captured_amount = amount WHERE status = 'released'",
        "DELETE FROM holds",
        "TRUNCATE holds CASCADE",
        "UPDATE hold_events SET amount = 1",
        "DELETE FROM hold_events",
    ],
)
async def test_hold_history_cannot_be_rewritten_even_by_the_owner(
    client: httpx.AsyncClient, owner_conn: asyncpg.Connection, statement: str
) -> None:
    """A finished hold cannot be revived or captured, an amount rewritten, a hold or an
    event deleted: the triggers refuse every role."""
    user = await new_user(client, 10)
    for _ in range(2):
        made = await hold(client, user, 1)
        await client.post(f"/holds/{made['holdId']}/release")
    await hold(client, user, 1)
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        async with owner_conn.transaction():
            await owner_conn.execute(statement)
