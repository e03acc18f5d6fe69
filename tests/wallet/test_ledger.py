"""The ledger in process (the app over ASGI, a real PostgreSQL): the journal behind every
balance, transfers, history pages, the balance at an instant, keys that outlast pruning, and
a journal the database itself keeps append-only."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import httpx
import pytest
from fastapi.encoders import jsonable_encoder
from fastapi.responses import JSONResponse

from tandem.core.ids import INT64_MAX, INT64_MIN
from tandem.wallet.endpoints import HISTORY_PAGE_MAX
from tandem.wallet.models import REFERENCE_MAX_LENGTH
from tandem.wallet.schemas import History, HistoryEntry
from tests.support import REPO, assert_error, balance_of, fetch, new_user


async def update(
    client: httpx.AsyncClient, user: int, amount: int, key: str | None = None, **extra: object
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    return await client.post(
        "/balance/update", json={"userId": user, "amount": amount, **extra}, headers=headers
    )


async def transfer(
    client: httpx.AsyncClient,
    src: int,
    dst: int,
    amount: int,
    key: str | None = None,
    **extra: object,
) -> httpx.Response:
    headers = {"Idempotency-Key": key} if key else {}
    body = {"fromUserId": src, "toUserId": dst, "amount": amount, **extra}
    return await client.post("/transfers", json=body, headers=headers)


async def entries(
    client: httpx.AsyncClient, user: int, **params: object
) -> list[dict[str, object]]:
    """Every journal entry of the user, newest first, page by page."""
    found: list[dict[str, object]] = []
    before = None
    while True:
        query = {**params, **({"before": before} if before else {})}
        page = await client.get(f"/balance/{user}/history", params=query)
        assert page.status_code == 200, page.text
        found += page.json()["entries"]
        before = page.json()["nextBefore"]
        if before is None:
            return found


async def test_every_change_is_an_entry_with_the_balance_after(client: httpx.AsyncClient) -> None:
    """Opening, deposit, withdrawal, both legs of a transfer: each one entry, newest first,
    with the balance after it; the answer's entryId names it, and the sum is the balance."""
    a, b = await new_user(client, 100), await new_user(client, 0)
    deposit = await update(client, a, 50, reference="top-up")
    withdrawal = await update(client, a, -30)
    moved = await transfer(client, a, b, 70, reference="order-17")
    assert moved.status_code == 201, moved.text
    journal = await entries(client, a)
    assert [(e["kind"], e["amount"], e["balance"]) for e in journal] == [
        ("transfer", -70, 50),
        ("withdrawal", -30, 120),
        ("deposit", 50, 150),
        ("opening", 100, 100),
    ]
    assert [journal[2]["id"], journal[1]["id"]] == [
        deposit.json()["entryId"],
        withdrawal.json()["entryId"],
    ]
    assert (journal[2]["reference"], journal[0]["reference"]) == ("top-up", "order-17")
    assert journal[0]["transferId"] == moved.json()["transferId"]
    assert sum(int(e["amount"]) for e in journal) == await balance_of(client, a) == 50  # type: ignore[arg-type]
    payee = await entries(client, b)
    assert [(e["kind"], e["amount"], e["balance"], e["transferId"]) for e in payee] == [
        ("transfer", 70, 70, moved.json()["transferId"]),
        ("opening", 0, 0, None),
    ]


async def test_a_transfer_moves_money_and_reads_back(client: httpx.AsyncClient) -> None:
    """201 with both balances after it; GET /transfers/{id} answers the same; both users'
    journals have a leg with its id."""
    a, b = await new_user(client, 100), await new_user(client, 5)
    moved = await transfer(client, a, b, 30)
    assert moved.status_code == 201, moved.text
    body = moved.json()
    assert {k: body[k] for k in ("fromUserId", "toUserId", "amount")} == {
        "fromUserId": a,
        "toUserId": b,
        "amount": 30,
    }
    assert (body["fromBalance"], body["toBalance"]) == (70, 35)
    assert datetime.fromisoformat(body["createdAt"]).tzinfo is not None
    again = await client.get(f"/transfers/{body['transferId']}")
    assert again.status_code == 200
    assert again.json() == body
    assert (await balance_of(client, a), await balance_of(client, b)) == (70, 35)
    legs = [e for u in (a, b) for e in await entries(client, u) if e["kind"] == "transfer"]
    assert sorted(int(e["amount"]) for e in legs) == [-30, 30]  # type: ignore[call-overload]
    assert {e["transferId"] for e in legs} == {body["transferId"]}


async def test_transfer_refusals_change_nothing(client: httpx.AsyncClient) -> None:
    """Too little money: 409; an unknown user: 404 saying which; the same user twice, amount
    <= 0, floats, strings, unknown fields, duplicate keys: 422; nothing changes."""
    a, b = await new_user(client, 10), await new_user(client, 0)
    assert_error(await transfer(client, a, b, 11), 409, "insufficient_funds")
    missing = 9_000_000_000
    for src, dst, field in [(missing, b, "fromUserId"), (a, missing, "toUserId")]:
        response = await transfer(client, src, dst, 1)
        assert_error(response, 404, "user_not_found")
        assert response.json()["error"]["details"][0]["field"] == field
    for body in [
        {"fromUserId": a, "toUserId": a, "amount": 1},
        {"fromUserId": a, "toUserId": b, "amount": 0},
        {"fromUserId": a, "toUserId": b, "amount": -1},
        {"fromUserId": a, "toUserId": b, "amount": 1.0},
        {"fromUserId": a, "toUserId": b, "amount": "1"},
        {"fromUserId": a, "toUserId": b},
        {"fromUserId": a, "toUserId": b, "amount": 1, "note": "x"},
        {"fromUserId": a, "toUserId": b, "amount": 1, "reference": "r" * 256},
    ]:
        assert_error(await client.post("/transfers", json=body), 422, "validation_error")
    twice = b'{"fromUserId": %d, "toUserId": %d, "amount": 1, "toUserId": %d}' % (a, b, a)
    assert_error(
        await client.post(
            "/transfers", content=twice, headers={"content-type": "application/json"}
        ),
        422,
        "validation_error",
    )
    form = b'{"fromUserId": %d, "toUserId": %d, "amount": 1}' % (a, b)
    assert_error(
        await client.post("/transfers", content=form, headers={"content-type": "text/plain"}),
        415,
        "unsupported_media_type",
    )
    assert (await balance_of(client, a), await balance_of(client, b)) == (10, 0)
    assert len(await entries(client, a)) == len(await entries(client, b)) == 1
    assert_error(await client.get("/transfers/999999999"), 404, "transfer_not_found")
    assert_error(await client.get("/transfers/0"), 422, "validation_error")


async def test_opposite_transfers_at_once_never_deadlock(client: httpx.AsyncClient) -> None:
    """Hundreds of transfers A->B and B->A in flight at once: every one answers 201 or 409
    (never a deadlock, never a 5xx), and the money is all still there."""
    a, b = await new_user(client, 1000), await new_user(client, 1000)
    answers = await asyncio.gather(
        *(transfer(client, *((a, b) if i % 2 else (b, a)), 7) for i in range(300))
    )
    assert {r.status_code for r in answers} <= {201, 409}, {r.text for r in answers}
    assert await balance_of(client, a) + await balance_of(client, b) == 2000


async def test_keyed_transfer_applies_once(client: httpx.AsyncClient) -> None:
    """A retry with the same key answers the same transfer and moves nothing again; the key
    with another request is refused."""
    a, b = await new_user(client, 100), await new_user(client, 0)
    first = await transfer(client, a, b, 40, key=f"t-{a}")
    second = await transfer(client, a, b, 40, key=f"t-{a}")
    assert (first.status_code, second.status_code) == (201, 201)
    assert first.json() == second.json()
    assert second.headers["idempotent-replayed"] == "true"
    assert_error(await transfer(client, a, b, 41, key=f"t-{a}"), 422, "idempotency_key_reused")
    assert (await balance_of(client, a), await balance_of(client, b)) == (60, 40)
    refused = await transfer(client, a, b, 1000, key=f"t2-{a}")
    assert_error(refused, 409, "insufficient_funds")
    await update(client, a, 5000)
    assert_error(await transfer(client, a, b, 1000, key=f"t2-{a}"), 409, "insufficient_funds")


async def test_applied_keys_outlast_the_pruning_of_outcomes(
    client: httpx.AsyncClient, database_url: str
) -> None:
    """Every stored outcome pruned (as the 24 h housekeeping does), then a retry of an applied
    update and of an applied transfer: replayed from the journal, applied never again."""
    a, b = await new_user(client, 100), await new_user(client, 0)
    first = await update(client, a, -10, key=f"p-{a}")
    moved = await transfer(client, a, b, 5, key=f"pt-{a}")
    await fetch(database_url, "DELETE FROM idempotency_keys")
    again = await update(client, a, -10, key=f"p-{a}")
    moved_again = await transfer(client, a, b, 5, key=f"pt-{a}")
    assert (again.status_code, again.json()) == (200, first.json())
    assert (moved_again.status_code, moved_again.json()) == (201, moved.json())
    assert again.headers["idempotent-replayed"] == "true"
    assert (await balance_of(client, a), await balance_of(client, b)) == (85, 5)
    await fetch(database_url, "DELETE FROM idempotency_keys")
    assert_error(await update(client, a, -11, key=f"p-{a}"), 422, "idempotency_key_reused")
    # A key of one kind, its outcome pruned, sent with a request of the other kind.
    await fetch(database_url, "DELETE FROM idempotency_keys")
    assert_error(await transfer(client, a, b, 5, key=f"p-{a}"), 422, "idempotency_key_reused")
    await fetch(database_url, "DELETE FROM idempotency_keys")
    assert_error(await update(client, a, -5, key=f"pt-{a}"), 422, "idempotency_key_reused")
    assert (await balance_of(client, a), await balance_of(client, b)) == (85, 5)


async def test_history_pages_neither_skip_nor_repeat_while_writes_go_on(
    client: httpx.AsyncClient,
) -> None:
    """Paging 7 at a time while deposits keep landing: the pages together are exactly the
    entries that existed when paging began (newer ones come before the first page's)."""
    user = await new_user(client, 0)
    for _ in range(30):
        await update(client, user, 1)
    first = (await client.get(f"/balance/{user}/history", params={"limit": 7})).json()
    seen = list(first["entries"])
    before = first["nextBefore"]
    writes = 0
    while before is not None:
        await update(client, user, 1)
        writes += 1
        page = (
            await client.get(f"/balance/{user}/history", params={"limit": 7, "before": before})
        ).json()
        seen += page["entries"]
        before = page["nextBefore"]
    ids = [e["id"] for e in seen]
    assert len(ids) == len(set(ids)) == 31
    assert ids == sorted(ids, reverse=True)
    assert len(await entries(client, user)) == 31 + writes


@pytest.mark.parametrize(
    "params",
    [{"limit": 0}, {"limit": 1001}, {"limit": "x"}, {"before": 0}, {"before": "-1"}],
)
async def test_bad_history_query_is_422(
    client: httpx.AsyncClient, params: dict[str, object]
) -> None:
    user = await new_user(client, 0)
    assert_error(
        await client.get(f"/balance/{user}/history", params=params), 422, "validation_error"
    )


async def test_history_of_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    assert_error(await client.get("/balance/9000000000/history"), 404, "user_not_found")


async def test_balance_at_an_instant(client: httpx.AsyncClient, database_url: str) -> None:
    """The balance after the last entry at or before the instant; before the opening entry
    there is none (404); a malformed instant is 422."""
    user = await new_user(client, 100)
    opened = (await fetch(database_url, "SELECT clock_timestamp() AS t"))[0]["t"]
    await update(client, user, -40)
    after = (await fetch(database_url, "SELECT clock_timestamp() AS t"))[0]["t"]
    await update(client, user, -10)
    for at, balance in [(opened, 100), (after, 60), (after + timedelta(days=1), 50)]:
        response = await client.get(f"/balance/{user}", params={"at": at.isoformat()})
        assert response.status_code == 200, response.text
        assert response.json()["balance"] == balance
        assert datetime.fromisoformat(response.json()["at"]) == at
    zulu = after.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert (await client.get(f"/balance/{user}", params={"at": zulu})).json()["balance"] == 60
    before = opened - timedelta(hours=1)
    assert_error(
        await client.get(f"/balance/{user}", params={"at": before.isoformat()}),
        404,
        "user_not_found",
    )
    for bad in [
        "yesterday",
        "2026-12-01",
        "2026-12-01T12:00:00",
        "2026-13-01T00:00:00Z",
        "",
        "0001-01-01T00:00:00+01:00",  # before year 1 in UTC
        "9999-12-31T23:59:59-01:00",  # after year 9999 in UTC
    ]:
        response = await client.get(f"/balance/{user}", params={"at": bad})
        assert_error(response, 422, "validation_error")
    assert_error(await client.get(f"/balance/{user}?at={zulu}&at={zulu}"), 422, "validation_error")


@pytest.mark.parametrize(
    "statement",
    [
        "UPDATE ledger_entries SET amount = amount + 1",
        "DELETE FROM ledger_entries",
        "TRUNCATE ledger_entries",
        "UPDATE transfers SET amount = 1 WHERE false",
        "DELETE FROM transfers WHERE false",
    ],
)
async def test_the_journal_refuses_to_change(
    client: httpx.AsyncClient, database_url: str, statement: str
) -> None:
    """The database refuses UPDATE, DELETE and TRUNCATE on the journal, even from its owner and
    even when no row matches."""
    await new_user(client, 1)
    with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
        await fetch(database_url, statement)


async def test_bodies_past_the_limit_are_413_and_never_read_whole(
    client: httpx.AsyncClient,
) -> None:
    """Every route with a body stops reading at 4 KiB: a large body, declared or streamed
    without a length, is 413 and changes nothing."""
    a, b = await new_user(client, 100), await new_user(client, 0)
    padded = b'{"fromUserId": %d, "toUserId": %d, "amount": 1, "reference": "%s"}' % (
        a,
        b,
        b"x" * 5000,
    )
    json_type = {"content-type": "application/json"}
    for path in ("/transfers", "/users", "/balance/update"):
        assert_error(
            await client.post(path, content=padded, headers=json_type), 413, "payload_too_large"
        )

    sent = 0

    async def endless() -> AsyncIterator[bytes]:
        nonlocal sent
        yield b'{"balance": 1, "pad": "'
        while sent < 50_000_000:
            sent += 65536
            yield b"x" * 65536

    response = await client.post("/users", content=endless(), headers=json_type)
    assert_error(response, 413, "payload_too_large")
    assert sent < 1_000_000, f"read {sent} bytes of a body refused at 4 KiB"
    assert (await balance_of(client, a), await balance_of(client, b)) == (100, 0)


# Control characters, DEL, C1, bidi overrides, isolates and marks, zero-width and separators,
# a byte-order mark and a tag character (invisible text), each inside a reference.
FORBIDDEN_REFERENCES = {
    "ESC (ANSI)": "red\x1b[31m",
    "tab": "a\tb",
    "line feed": "a\nb",
    "carriage return": "a\rb",
    "DEL": "a\x7fb",
    "C1 CSI": "a\x9bb",
    "RLO": "order-\u202e71",
    "LRE": "\u202aorder",
    "RLI": "\u2067order\u2069",
    "LRM": "order\u200e",
    "RLM": "order\u200f",
    "ALM": "order\u061c",
    "zero-width space": "ord\u200ber",
    "line separator": "a\u2028b",
    "BOM": "\ufefforder",
    "tag": "order\U000e0041",
}


@pytest.mark.parametrize("route", ["/balance/update", "/transfers"])
@pytest.mark.parametrize("case", list(FORBIDDEN_REFERENCES))
async def test_references_refuse_control_and_format_characters(
    client: httpx.AsyncClient, route: str, case: str
) -> None:
    """A reference holding a control, bidi, zero-width or separator character is 422
    (details type forbidden_character) on both HTTP paths, and nothing is journaled."""
    a, b = await new_user(client, 100), await new_user(client, 0)
    reference = FORBIDDEN_REFERENCES[case]
    if route == "/balance/update":
        response = await update(client, a, -2, reference=reference)
    else:
        response = await transfer(client, a, b, 2, reference=reference)
    assert_error(response, 422, "validation_error")
    (detail,) = response.json()["error"]["details"]
    assert (detail["field"], detail["type"]) == ("reference", "forbidden_character")
    assert detail["message"].startswith("holds U+"), detail
    assert (await balance_of(client, a), await balance_of(client, b)) == (100, 0)
    assert len(await entries(client, a)) == 1


async def test_references_keep_text_in_any_script(client: httpx.AsyncClient) -> None:
    """Right-to-left text, joined emoji (ZWJ) and a Persian word with a non-joiner (ZWNJ)
    are kept as sent."""
    user = await new_user(client, 100)
    kept = [
        "\u0637\u0644\u0628-\u0661\u0667",  # Arabic, "order-17"
        "👩\u200d💻",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # Persian, with a ZWNJ
        "order «17» — ok",
    ]
    for reference in kept:
        assert (await update(client, user, -1, reference=reference)).status_code == 200
    stored = [entry["reference"] for entry in await entries(client, user)][:4]
    assert stored == kept[::-1]


def worst_history_page_bytes() -> int:
    """The largest history page the API can answer: HISTORY_PAGE_MAX entries, every number
    at its widest, the longest key name, every reference 255 four-byte characters (the
    widest an accepted character renders), serialized as the route does."""
    entry = HistoryEntry(
        id=INT64_MAX,
        amount=INT64_MIN,
        balance=INT64_MAX,
        kind="withdrawal",
        transfer_id=INT64_MAX,
        reference="\U0001d11e" * REFERENCE_MAX_LENGTH,
        created_at=datetime(2026, 12, 7, 4, 0, 0, 123456, tzinfo=UTC),
        api_key="k" * 64,
        hold_id=INT64_MAX,
    )
    page = History(user_id=INT64_MAX, entries=[entry] * HISTORY_PAGE_MAX, next_before=INT64_MAX)
    return len(JSONResponse(jsonable_encoder(page)).body)


def test_the_documented_history_page_size_is_the_worst_case() -> None:
    """docs/wallet.md states the largest history page in bytes, and it is that."""
    documented = re.search(r"at most ([\d,]+) bytes", (REPO / "docs" / "wallet.md").read_text())
    assert documented is not None
    assert int(documented.group(1).replace(",", "")) == worst_history_page_bytes()


async def test_a_history_page_stays_within_its_documented_size(client: httpx.AsyncClient) -> None:
    """Whatever reference the API accepts (control characters once were, each escaped to 6
    bytes in JSON), a full page of 200 entries carrying the widest accepted one stays within
    the worst case docs/wallet.md states."""
    user = await new_user(client, 1_000_000)
    candidates = ["\x01" * 255, "\x1b" * 255, "\u202e" * 255, '"' * 255, "\U0001d11e" * 255]
    accepted = [
        reference
        for reference in candidates
        if (await update(client, user, 1, reference=reference)).status_code == 200
    ]
    widest = max(accepted, key=lambda text: len(json.dumps(text, ensure_ascii=False).encode()))
    for _ in range(HISTORY_PAGE_MAX - 1 - len(accepted)):
        assert (await update(client, user, 1, reference=widest)).status_code == 200
    page = await client.get(f"/balance/{user}/history", params={"limit": HISTORY_PAGE_MAX})
    assert len(page.json()["entries"]) == HISTORY_PAGE_MAX
    assert len(page.content) <= worst_history_page_bytes()
