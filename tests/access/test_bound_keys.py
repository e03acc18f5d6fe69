"""Keys bound to users: every wallet route x a key bound to user A acting on A (works), on
another user B and on a user that does not exist (the same 404, nothing changed); routes
that are not one user's refuse a bound key; POST /keys and the owner's function behind it;
expiry. In process, against the real database."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from tandem.access import keys, policy, repository
from tandem.access.cache import KeyCache
from tandem.access.errors import REFUSALS
from tandem.access.keys import digest, new_token
from tandem.access.schemas import BOUND_KEY_MAX_USERS
from tandem.core.callers import (
    ALL,
    EVENTS_READ,
    KEYS_WRITE,
    WALLET_MINT,
    WALLET_READ,
    WALLET_WRITE,
)
from tandem.core.database import Database
from tests.access.keys import bearer, make_key, revoke_key
from tests.support import fetch, until

BASE = "http://tandem.test"
# An id no user has: far beyond the identity sequence of a test database.
NOBODY = 10**15

# Everything a request could change, read in one statement.
STATE = """
SELECT (SELECT array_agg(balance ORDER BY id) FROM users), (SELECT count(*) FROM ledger_entries),
       (SELECT count(*) FROM transfers), (SELECT count(*) FROM idempotency_keys),
       (SELECT array_agg(held ORDER BY id) FROM users),
       (SELECT array_agg(status ORDER BY id) FROM holds), (SELECT count(*) FROM hold_events),
       (SELECT coalesce(sum(used), 0) FROM idempotency_usage), (SELECT count(*) FROM api_keys)
"""


@dataclass(frozen=True)
class Route:
    """A wallet route, acting on the user ``u`` (its ``other`` is a user besides ``u``)."""

    method: str
    path: Callable[[dict[str, Any], int], str]
    body: Callable[[dict[str, Any], int], Any] | None = None
    headers: dict[str, str] | None = None
    ok: int = 200


def _other(w: dict[str, Any], u: int) -> int:
    return w["c"] if u != w["c"] else w["a"]


MATRIX = [
    Route("POST", lambda w, u: "/balance/update", body=lambda w, u: {"userId": u, "amount": -1}),
    Route(
        "POST",
        lambda w, u: "/balance/update",
        body=lambda w, u: {"userId": u, "amount": -1, "reference": "keyed"},
        headers={"Idempotency-Key": "matrix-update"},
    ),
    Route("GET", lambda w, u: f"/balance/{u}"),
    Route("HEAD", lambda w, u: f"/balance/{u}"),
    Route("GET", lambda w, u: f"/balance/{u}?at=2099-01-01T00:00:00Z"),
    Route("GET", lambda w, u: f"/balance/{u}/history"),
    Route("GET", lambda w, u: f"/balance/{u}/history?limit=1"),
    Route(
        "POST",
        lambda w, u: "/transfers",
        body=lambda w, u: {"fromUserId": u, "toUserId": _other(w, u), "amount": 1},
        ok=201,
    ),
    Route(
        "POST",
        lambda w, u: "/transfers",
        body=lambda w, u: {"fromUserId": u, "toUserId": _other(w, u), "amount": 1},
        headers={"Idempotency-Key": "matrix-transfer"},
        ok=201,
    ),
    # The transfer whose payer is u (the world's transfer of each user; none for NOBODY).
    Route("GET", lambda w, u: f"/transfers/{w['transfer_from'].get(u, NOBODY)}"),
    Route("POST", lambda w, u: "/holds", body=lambda w, u: {"userId": u, "amount": 1}, ok=201),
    Route(
        "POST",
        lambda w, u: "/holds",
        body=lambda w, u: {"userId": u, "amount": 1, "toUserId": _other(w, u)},
        headers={"Idempotency-Key": "matrix-hold"},
        ok=201,
    ),
    # The holds whose payer is u (the world's holds of each user; none for NOBODY): one read,
    # one captured, one released.
    Route("GET", lambda w, u: f"/holds/{w['holds']['read'].get(u, NOBODY)}"),
    Route("POST", lambda w, u: f"/holds/{w['holds']['capture'].get(u, NOBODY)}/capture"),
    Route("POST", lambda w, u: f"/holds/{w['holds']['release'].get(u, NOBODY)}/release"),
    Route("GET", lambda w, u: f"/balance/{u}/holds"),
    Route("GET", lambda w, u: f"/events?userId={u}"),
]
HOLD_USES = ("read", "capture", "release")


@pytest.fixture(scope="module")
async def app(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        yield c


@pytest.fixture(scope="module")
async def world(database_url: str, app: httpx.AsyncClient) -> dict[str, Any]:
    """Users A, B, C; a transfer from each (A->C, B->C, C->A); a key bound to A (wallet
    read and write), one bound to A with every scope, one bound to C, an unbound one."""
    rows = await fetch(
        database_url, "INSERT INTO users (balance) VALUES (1000), (1000), (1000) RETURNING id"
    )
    a, b, c = (row["id"] for row in rows)
    transfer_from = {}
    for payer, payee in ((a, c), (b, c), (c, a)):
        moved = await fetch(
            database_url,
            "SELECT transfer_id FROM tandem_transfer_v1($1, $2, 5, NULL, NULL, NULL)",
            payer,
            payee,
        )
        transfer_from[payer] = moved[0]["transfer_id"]
    holds: dict[str, dict[int, int]] = {use: {} for use in HOLD_USES}
    for payer in (a, b, c):
        for use in HOLD_USES:
            made = await fetch(
                database_url,
                "SELECT hold_id FROM tandem_create_hold_v1($1, NULL, 5, 600, NULL, NULL, NULL)",
                payer,
            )
            holds[use][payer] = made[0]["hold_id"]

    async def key(name: str, *scopes: str, users: list[int] | None = None) -> dict[str, str]:
        return bearer(await make_key(database_url, name, *scopes, users=users, known_to=app))

    return {
        "a": a,
        "b": b,
        "c": c,
        "transfer_from": transfer_from,
        "holds": holds,
        "bound": await key("bound-a", WALLET_READ, WALLET_WRITE, EVENTS_READ, users=[a]),
        "bound_all": await key("bound-a-all", ALL, users=[a]),
        "bound_c": await key("bound-c", WALLET_READ, users=[c]),
        "unbound": await key("unbound", ALL),
        "service": await key("service", KEYS_WRITE, WALLET_READ),
    }


async def _send(
    app: httpx.AsyncClient, route: Route, w: dict[str, Any], user: int, key: dict[str, str]
) -> httpx.Response:
    body = None if route.body is None else route.body(w, user)
    return await app.request(
        route.method, route.path(w, user), json=body, headers={**key, **(route.headers or {})}
    )


def _said(answer: httpx.Response, *ids: int) -> tuple[int, Any]:
    """The status and body, with the ids the request named written as a name: two answers
    about two users compare equal when they say the same about each."""
    if not answer.content:
        return answer.status_code, None
    text = answer.text
    for named in ids:
        text = re.sub(rf"\b{named}\b", "<id>", text)
    return answer.status_code, json.loads(text)


def _label(route: Route) -> str:
    headers = " keyed" if route.headers else ""
    nothing = {"transfer_from": {}, "holds": {use: {} for use in HOLD_USES}}
    return f"{route.method} {route.path(nothing, 0)}{headers}"


@pytest.mark.parametrize("route", MATRIX, ids=_label)
async def test_a_bound_key_touches_its_user_only(
    app: httpx.AsyncClient, world: dict[str, Any], database_url: str, route: Route
) -> None:
    """On its user: works. On another user, existing or not: 404 with the body a user that
    does not exist gets, and nothing changed (no balance, journal entry or idempotency key)."""
    bound = world["bound"]
    for user in (world["b"], NOBODY):
        before = await fetch(database_url, STATE)
        answer = await _send(app, route, world, user, bound)
        assert answer.status_code == 404, (user, answer.text)
        assert await fetch(database_url, STATE) == before, "a refused request changed something"
        if route.method != "HEAD":
            code = answer.json()["error"]["code"]
            path = answer.url.path
            assert code == (
                "transfer_not_found"
                if "/transfers/" in path
                else "hold_not_found"
                if "/holds/" in path
                else "user_not_found"
            )

    def named(user: int) -> tuple[int, ...]:
        holds = (world["holds"][use].get(user, NOBODY) for use in HOLD_USES)
        return user, world["transfer_from"].get(user, NOBODY), *holds

    b = world["b"]
    foreign = _said(await _send(app, route, world, b, bound), *named(b))
    missing = _said(await _send(app, route, world, NOBODY, bound), *named(NOBODY))
    assert foreign == missing, "a bound key can tell another user from no user"
    if "at=" not in route.path(world, 0):
        # ...and it is what an unbound key is told of a user that does not exist.
        unbound = _said(await _send(app, route, world, NOBODY, world["unbound"]), *named(NOBODY))
        assert missing == unbound

    answer = await _send(app, route, world, world["a"], bound)
    assert answer.status_code == route.ok, answer.text


def test_the_matrix_covers_every_route_of_one_user() -> None:
    """Every rule a bound key may use on a user's money is in the matrix above."""
    bound_by_user = {
        (rule.method, rule.template)
        for rule in policy.RULES
        if rule.binding
        in (policy.Binding.PATH_USER, policy.Binding.BODY_USER, policy.Binding.RESOURCE_USER)
    }
    world = {
        "transfer_from": {1: 1},
        "holds": {use: {1: 1} for use in HOLD_USES},
        "a": 1,
        "c": 2,
    }
    tested = set()
    for route in MATRIX:
        rule = policy.rule_for(route.method, route.path(world, 1).partition("?")[0])
        tested.add((rule.method, rule.template))
    assert bound_by_user <= tested, bound_by_user - tested


async def test_a_bound_key_may_pay_anyone_from_its_user(
    app: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    """From its user to a user it is not bound to: allowed; into its user from another: 404."""
    a, b = world["a"], world["b"]
    paid = await app.post(
        "/transfers", json={"fromUserId": a, "toUserId": b, "amount": 2}, headers=world["bound"]
    )
    assert paid.status_code == 201, paid.text
    pulled = await app.post(
        "/transfers", json={"fromUserId": b, "toUserId": a, "amount": 2}, headers=world["bound"]
    )
    assert pulled.status_code == 404
    assert pulled.json()["error"]["details"][0]["field"] == "fromUserId"


async def test_a_malformed_user_id_is_the_routes_422(
    app: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    """An id the route refuses is refused alike for every key: nothing to hide."""
    for path in ("/balance/007", "/balance/x/history", f"/balance/{2**63}"):
        answer = await app.get(path, headers=world["bound"])
        assert answer.status_code == 422, (path, answer.text)


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", "/users", {"balance": 0}),
        ("POST", "/keys", {"name": "from-bound", "scopes": [WALLET_READ], "userIds": [1]}),
        ("GET", "/tasks", None),
        ("GET", "/instances", None),
        ("GET", "/tasks/x/history", None),
        ("POST", "/tasks/x/run", None),
        ("POST", "/tasks/x/pause", None),
        ("POST", "/tasks/x/resume", None),
        ("GET", "/", None),
        ("GET", "/status/fragment", None),
    ],
)
async def test_a_bound_key_cannot_use_routes_of_no_one_user(
    app: httpx.AsyncClient,
    world: dict[str, Any],
    database_url: str,
    method: str,
    path: str,
    body: Any,
) -> None:
    """Even with every scope (users:write, keys:write, tasks:*): 403, nothing changed."""
    before = await fetch(database_url, STATE)
    answer = await app.request(method, path, json=body, headers=world["bound_all"])
    assert answer.status_code == 403, answer.text
    assert answer.json()["error"]["code"] == "forbidden"
    assert await fetch(database_url, STATE) == before
    rules = {policy.rule_for(method, path).binding}
    assert rules == {policy.Binding.UNBOUND_ONLY}


async def test_a_transfer_shows_a_bound_key_its_side_only(
    app: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    a_to_c = world["transfer_from"][world["a"]]
    full = (await app.get(f"/transfers/{a_to_c}", headers=world["unbound"])).json()
    as_payer = (await app.get(f"/transfers/{a_to_c}", headers=world["bound"])).json()
    as_payee = (await app.get(f"/transfers/{a_to_c}", headers=world["bound_c"])).json()
    assert full["fromBalance"] is not None
    assert full["toBalance"] is not None
    assert as_payer == {**full, "toBalance": None}
    assert as_payee == {**full, "fromBalance": None}


@pytest.mark.parametrize("key", [None, "side-only-made", "side-only-replayed"])
async def test_a_bound_key_paying_learns_nothing_of_its_payee(
    app: httpx.AsyncClient, world: dict[str, Any], key: str | None
) -> None:
    """Paying user C 1 unit from A, without and with an idempotency key, and replayed: the
    answer is what the key would read of the transfer (C's balance-after null), never C's
    exact balance."""
    a, c = world["a"], world["c"]
    headers = {**world["bound"], **({} if key is None else {"Idempotency-Key": key})}
    body = {"fromUserId": a, "toUserId": c, "amount": 1}
    answer = await app.post("/transfers", json=body, headers=headers)
    if key == "side-only-replayed":
        answer = await app.post("/transfers", json=body, headers=headers)
        assert answer.headers["Idempotent-Replayed"] == "true"
    assert answer.status_code == 201, answer.text
    made = answer.json()
    read = (await app.get(f"/transfers/{made['transferId']}", headers=world["bound"])).json()
    assert made == read
    assert made["toBalance"] is None
    assert made["fromBalance"] is not None


async def test_a_bound_keys_history_names_no_other_key(
    app: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    """The user's statement, references included; the names of the keys that made entries
    only where the reading key made them itself."""
    a = world["a"]
    by_service = {"userId": a, "amount": -1, "reference": "by the service"}
    assert (await app.post("/balance/update", json=by_service, headers=world["unbound"])).is_success
    by_itself = {"userId": a, "amount": -1, "reference": "by itself"}
    assert (await app.post("/balance/update", json=by_itself, headers=world["bound"])).is_success

    seen = (await app.get(f"/balance/{a}/history", headers=world["bound"])).json()["entries"]
    full = (await app.get(f"/balance/{a}/history", headers=world["unbound"])).json()["entries"]
    assert [e["reference"] for e in seen] == [e["reference"] for e in full]
    assert full[0]["apiKey"] == "bound-a"
    assert full[1]["apiKey"] == "unbound"
    own = [e["apiKey"] if e["apiKey"] == "bound-a" else None for e in full]
    assert [e["apiKey"] for e in seen] == own


# --- POST /keys ------------------------------------------------------------------------------


async def test_post_keys_mints_a_bound_key(
    app: httpx.AsyncClient, world: dict[str, Any], database_url: str
) -> None:
    """201 with the token once; the key works at once on its user, and only there."""
    a = world["a"]
    asked = {"name": "app-user-a", "scopes": [WALLET_READ], "userIds": [a], "expiresIn": 600}
    made = await app.post("/keys", json=asked, headers=world["service"])
    assert made.status_code == 201, made.text
    body = made.json()
    assert made.headers["cache-control"] == "no-store"
    assert (body["name"], body["scopes"], body["userIds"]) == ("app-user-a", [WALLET_READ], [a])
    row = await fetch(
        database_url,
        "SELECT bound_user_ids, expires_at - created_at AS life, token_sha256 FROM api_keys "
        "WHERE name = 'app-user-a'",
    )
    assert row[0]["bound_user_ids"] == [a]
    assert 599 <= row[0]["life"].total_seconds() <= 600
    assert bytes(row[0]["token_sha256"]) == digest(body["token"])
    minted = bearer(body["token"])
    assert (await app.get(f"/balance/{a}", headers=minted)).status_code == 200
    assert (await app.get(f"/balance/{world['b']}", headers=minted)).status_code == 404
    # wallet:read only: no writes, as asked.
    withdrawal = {"userId": a, "amount": -1}
    assert (await app.post("/balance/update", json=withdrawal, headers=minted)).status_code == 403


@pytest.mark.parametrize(
    ("change", "status", "code"),
    [
        ({"userIds": []}, 422, "key_users_required"),
        ({"userIds": [NOBODY]}, 422, "key_users_not_found"),
        ({"scopes": ["tasks:read"]}, 422, "key_scope_not_allowed"),
        ({"scopes": [ALL]}, 422, "key_scope_not_allowed"),
        ({"scopes": []}, 422, "key_scope_not_allowed"),
        ({"scopes": [WALLET_WRITE]}, 403, "key_scope_beyond_caller"),
        ({"scopes": [WALLET_READ, WALLET_MINT]}, 422, "key_scope_not_allowed"),
        ({"expiresIn": 86401}, 422, "key_expiry_out_of_range"),
        ({"expiresIn": 0}, 422, "key_expiry_out_of_range"),
        ({"expiresIn": 10**10}, 422, "validation_error"),
        ({"name": "bad name"}, 422, "validation_error"),
        ({"name": "service"}, 409, "key_name_taken"),
        ({"userIds": [0]}, 422, "validation_error"),
        ({"userIds": [2**63]}, 422, "validation_error"),
    ],
)
async def test_post_keys_refuses(
    app: httpx.AsyncClient,
    world: dict[str, Any],
    database_url: str,
    change: dict[str, Any],
    status: int,
    code: str,
) -> None:
    """Each refusal of the owner's function, with its stable code; no key made."""
    asked = {"name": "refused", "scopes": [WALLET_READ], "userIds": [world["a"]], **change}
    before = await fetch(database_url, STATE)
    answer = await app.post("/keys", json=asked, headers=world["service"])
    assert answer.status_code == status, answer.text
    assert answer.json()["error"]["code"] == code
    assert await fetch(database_url, STATE) == before


@pytest.mark.parametrize(
    "order", [("application/json", "text/plain"), ("text/plain", "application/json")]
)
async def test_post_keys_refuses_two_content_types(
    app: httpx.AsyncClient, world: dict[str, Any], database_url: str, order: tuple[str, str]
) -> None:
    """As every route taking a body (wallet's test_two_content_types_are_415_on_both_paths):
    two Content-Type headers are 415 whichever comes first, no key made."""
    asked = {"name": "two-types", "scopes": [WALLET_READ], "userIds": [world["a"]]}
    headers = [*world["service"].items(), *(("content-type", value) for value in order)]
    before = await fetch(database_url, STATE)
    answer = await app.post("/keys", content=json.dumps(asked).encode(), headers=headers)
    assert answer.status_code == 415, answer.text
    assert answer.json()["error"]["code"] == "unsupported_media_type"
    assert await fetch(database_url, STATE) == before


async def test_the_function_refuses_whatever_the_app_asks(
    world: dict[str, Any], database_url: str, database: Database
) -> None:
    """Called as the application calls it, the endpoint's checks bypassed: only the function's
    rules stand between the app's role and a key."""
    await make_key(database_url, "revoked-minter", ALL, revoked=True)
    await make_key(database_url, "expired-minter", ALL, expires_in=0.001)
    await make_key(database_url, "no-keys-write", WALLET_READ, WALLET_WRITE)
    ids = {
        row["name"]: row["id"] for row in await fetch(database_url, "SELECT name, id FROM api_keys")
    }
    a = world["a"]

    async def mint(
        caller: str | int,
        scopes: list[str],
        users: list[int],
        seconds: float = 60,
    ) -> str:
        caller_id = caller if isinstance(caller, int) else ids[caller]
        made = await repository.create_bound_key(
            database.pool,
            caller_id,
            f"direct-{new_token()[4:20]}",
            digest(new_token()),
            scopes,
            users,
            seconds,
        )
        return made.outcome

    before = await fetch(database_url, STATE)
    assert await mint("bound-a-all", [WALLET_READ], [a]) == "caller_not_allowed"
    assert await mint("revoked-minter", [WALLET_READ], [a]) == "caller_not_allowed"
    assert await mint("expired-minter", [WALLET_READ], [a]) == "caller_not_allowed"
    assert await mint("no-keys-write", [WALLET_READ], [a]) == "caller_not_allowed"
    assert await mint(NOBODY, [WALLET_READ], [a]) == "caller_not_allowed"
    assert await mint("service", [WALLET_READ], []) == "no_users"
    assert await mint("service", [WALLET_READ], [NOBODY]) == "users_not_found"
    assert await mint("unbound", [ALL], [a]) == "scope_outside_wallet"
    assert await mint("unbound", [KEYS_WRITE, WALLET_READ], [a]) == "scope_outside_wallet"
    assert await mint("service", [WALLET_WRITE], [a]) == "scope_beyond_caller"
    assert await mint("service", [WALLET_READ], [a], 0) == "expiry_out_of_range"
    assert await mint("service", [WALLET_READ], [a], -5) == "expiry_out_of_range"
    assert await mint("service", [WALLET_READ], [a], 86400.5) == "expiry_out_of_range"
    assert await fetch(database_url, STATE) == before, "a refusal made a key"
    assert await mint("service", [WALLET_READ], [a, a], 86400) == "ok"
    made = await fetch(
        database_url,
        "SELECT bound_user_ids, scopes FROM api_keys WHERE name LIKE 'direct-%'",
    )
    assert [(r["bound_user_ids"], r["scopes"]) for r in made] == [([a], [WALLET_READ])]


async def test_the_function_keeps_names_the_user_cap_and_tokens(
    world: dict[str, Any], database_url: str, database: Database
) -> None:
    """What the endpoint checks first, the function keeps too, each with its own outcome: the
    CLI's name pattern, at most BOUND_KEY_MAX_USERS users (the endpoint's cap), and a token
    already another key's told apart from a name taken."""
    service_id = (await fetch(database_url, "SELECT id FROM api_keys WHERE name = 'service'"))[0][
        "id"
    ]
    a = world["a"]

    async def mint(name: str, users: list[int], sha256: bytes | None = None) -> str:
        made = await repository.create_bound_key(
            database.pool,
            service_id,
            name,
            sha256 or digest(new_token()),
            [WALLET_READ],
            users,
            60,
        )
        return made.outcome

    before = await fetch(database_url, STATE)
    for name in ("bad name", "-leading", "x" * 65, "", "näme", "a/b", "a\nb"):
        assert keys.NAME_RE.fullmatch(name) is None
        assert await mint(name, [a]) == "name_invalid", name
    many = list(range(NOBODY, NOBODY + BOUND_KEY_MAX_USERS + 1))
    assert await mint("too-many", many) == "too_many_users"
    # At the cap the function goes on (to find these users missing).
    assert await mint("at-the-cap", many[:BOUND_KEY_MAX_USERS]) == "users_not_found"
    taken = (await fetch(database_url, "SELECT token_sha256 FROM api_keys WHERE name = 'service'"))[
        0
    ]["token_sha256"]
    assert await mint("fresh-name", [a], bytes(taken)) == "token_taken"
    assert await mint("service", [a]) == "name_taken"
    assert await fetch(database_url, STATE) == before, "a refusal made a key"
    assert await mint("a.valid_name-1", [a]) == "ok"


def test_the_new_refusals_have_their_codes() -> None:
    """Each new outcome of the function is a 4xx with its stable code (never a 500)."""
    for outcome, code in (
        ("name_invalid", "key_name_invalid"),
        ("too_many_users", "key_users_too_many"),
        ("token_taken", "key_token_taken"),
    ):
        refusal, message = REFUSALS[outcome]
        assert refusal.code == code
        assert 400 <= refusal(message).status_code < 500


async def test_a_minted_key_is_as_limited_as_its_maker(
    app: httpx.AsyncClient, database_url: str
) -> None:
    """The probe: a key limited to 10 a day, refused 429 on 11, mints a key for another user
    through POST /keys; that key is refused past the same limit (it inherits its maker's
    debit limits and rate), and lives no longer than its maker."""
    rows = await fetch(
        database_url, "INSERT INTO users (balance) VALUES (1000000), (1000000) RETURNING id"
    )
    own, other = rows[0]["id"], rows[1]["id"]
    maker = bearer(
        await make_key(
            database_url,
            "limited-minter",
            KEYS_WRITE,
            WALLET_READ,
            WALLET_WRITE,
            debit_limits=("10/day", "7/minute"),
            rate="50/minute",
            expires_in=1800,
            known_to=app,
        )
    )
    take_11 = {"userId": own, "amount": -11}
    answer = await app.post("/balance/update", json=take_11, headers=maker)
    assert answer.status_code == 429, answer.text
    asked = {"name": "minted-by-limited", "scopes": [WALLET_READ, WALLET_WRITE], "userIds": [other]}
    made = await app.post("/keys", json=asked, headers=maker)
    assert made.status_code == 201, made.text
    child = bearer(made.json()["token"])

    async def known() -> bool:
        # A token new to this process is looked up within its allowance: polled.
        return (await app.get(f"/balance/{other}", headers=child)).status_code != 401

    await until(known, 10)
    drain = {"userId": other, "amount": -500000}
    answer = await app.post("/balance/update", json=drain, headers=child)
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "debit_limit_exceeded"
    balance = await app.get(f"/balance/{other}", headers=child)
    assert balance.json()["balance"] == 1000000
    limits = await fetch(
        database_url,
        "SELECT name, debit_per_minute, debit_per_hour, debit_per_day, rate_requests, "
        "rate_seconds, expires_at FROM api_keys "
        "WHERE name IN ('limited-minter', 'minted-by-limited') ORDER BY name",
    )
    parent, minted = (tuple(row)[1:] for row in limits)
    assert minted[:5] == parent[:5] == (7, None, 10, 50, 60)
    # Asked for 24 h (the default), given its maker's 30 minutes.
    assert minted[5] == parent[5]


async def test_minted_keys_share_their_makers_budget(
    app: httpx.AsyncClient, database_url: str
) -> None:
    """Minting many keys multiplies nothing: the debits of the maker and of every key it
    minted count in the maker's windows (10 a day for all of them together); revoking the
    maker revokes them."""
    rows = await fetch(database_url, "INSERT INTO users (balance) VALUES (100), (100) RETURNING id")
    one, two = rows[0]["id"], rows[1]["id"]
    maker = bearer(
        await make_key(
            database_url,
            "budget-minter",
            KEYS_WRITE,
            WALLET_READ,
            WALLET_WRITE,
            debit_limits=("10/day",),
            known_to=app,
        )
    )
    children = []
    for n, user in enumerate((one, two, two)):
        asked = {"name": f"budget-child-{n}", "scopes": [WALLET_WRITE], "userIds": [user]}
        made = await app.post("/keys", json=asked, headers=maker)
        assert made.status_code == 201, made.text
        child = bearer(made.json()["token"])

        async def known(child: dict[str, str] = child, user: int = user) -> bool:
            # A token new to this process is looked up within its allowance: polled.
            return (await app.get(f"/balance/{user}", headers=child)).status_code != 401

        await until(known, 10)
        children.append((child, user))

    async def take(headers: dict[str, str], user: int, amount: int) -> int:
        withdrawal = {"userId": user, "amount": -amount}
        return (await app.post("/balance/update", json=withdrawal, headers=headers)).status_code

    assert await take(maker, one, 4) == 200
    assert await take(children[0][0], one, 4) == 200
    assert await take(children[1][0], two, 3) == 429  # 4 + 4 + 3 > 10
    assert await take(children[2][0], two, 2) == 200  # 10: the limit is inclusive
    assert await take(maker, one, 1) == 429
    balances = await fetch(
        database_url, "SELECT balance FROM users WHERE id = ANY($1) ORDER BY id", [one, two]
    )
    assert [row[0] for row in balances] == [92, 98]
    # Revoking the maker revokes what it minted.
    await revoke_key(database_url, "budget-minter")
    live = await fetch(
        database_url,
        "SELECT count(*) FROM api_keys WHERE name LIKE 'budget-%' AND revoked_at IS NULL",
    )
    assert live[0][0] == 0


# --- expiry ----------------------------------------------------------------------------------


async def test_an_expired_key_is_refused_at_its_expiry(
    world: dict[str, Any], database_url: str, database: Database
) -> None:
    """The cache stops accepting a key at its expiry by the wall clock, not at its next load;
    a load after it does not bring it back."""
    token = await make_key(
        database_url, "expiring", WALLET_READ, users=[world["a"]], expires_in=3600
    )
    now = [0.0]
    cache = KeyCache(database, ttl=3600, lookups_per_second=10, wall_clock=lambda: now[0])
    await cache.refresh()
    caller = await cache.resolve(token)
    assert caller is not None
    assert caller.expires_at is not None
    assert caller.users == frozenset({world["a"]})
    now[0] = caller.expires_at - 0.001
    assert await cache.resolve(token) is not None
    now[0] = caller.expires_at
    assert await cache.resolve(token) is None, "accepted at its expiry"
    await revoke_key(database_url, "expiring")


async def test_an_expired_key_is_refused_by_the_app(
    app: httpx.AsyncClient, world: dict[str, Any], database_url: str
) -> None:
    """Made to live 0.5 s: accepted, then refused (401) without any reload between."""
    token = bearer(
        await make_key(database_url, "short-lived", WALLET_READ, users=[world["a"]], expires_in=0.5)
    )
    path = f"/balance/{world['a']}"
    first = await app.get(path, headers=token)
    assert first.status_code in (200, 401)  # a slow machine may see it expired already

    async def refused() -> bool:
        return (await app.get(path, headers=token)).status_code == 401

    await until(refused, 10)
