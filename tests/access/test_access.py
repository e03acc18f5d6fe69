"""Every route x {no key, wrong key, revoked key, key without the scope, key with it}: status,
code, and that a refusal changed nothing. In process, against the real database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tandem.access import policy
from tandem.access.keys import new_token
from tandem.core.callers import (
    SCOPES,
    TASKS_READ,
    TASKS_WRITE,
    USERS_WRITE,
    WALLET_MINT,
    WALLET_READ,
    WALLET_WRITE,
)
from tandem.core.settings import Settings
from tandem.main import create_app
from tests.access.keys import bearer, make_key
from tests.access.routes import GONE, PUBLIC_HOOK, ROUTES, SCHEDULE, TASK, Route
from tests.support import fetch

BASE = "http://tandem.test"
# Everything a request could change, read in one statement.
STATE = """
SELECT (SELECT count(*) FROM users), (SELECT sum(balance) FROM users),
       (SELECT count(*) FROM ledger_entries), (SELECT count(*) FROM transfers),
       (SELECT count(*) FROM idempotency_keys), (SELECT count(*) FROM task_actions),
       (SELECT count(*) FROM api_keys), (SELECT array_agg(status ORDER BY id) FROM holds),
       (SELECT count(*) FROM hold_events), (SELECT sum(held) FROM users),
       (SELECT string_agg(name || enabled::text || next_run_at::text, ',') FROM tasks)
"""


@pytest.fixture(scope="module")
async def world(database_url: str, anonymous: httpx.AsyncClient) -> dict[str, Any]:
    """Two users, a transfer between them, a task, and keys: one per scope lacking just that
    scope, one revoked, one with every scope."""
    await fetch(
        database_url,
        "INSERT INTO tasks (name, \"interval\", function_name) VALUES ($1, '1 hour', 'x')",
        TASK,
    )
    for name in (SCHEDULE, GONE):
        await fetch(
            database_url,
            'INSERT INTO tasks (name, task, source, params, "interval", function_name) '
            "VALUES ($1, 'demo.echo', 'api', '{\"message\": \"probe\"}', '1 hour', 'x')",
            name,
        )
    users = await fetch(
        database_url,
        "INSERT INTO users (balance) VALUES (1000), (1000) RETURNING id",
    )
    user, other = users[0]["id"], users[1]["id"]
    moved = await fetch(
        database_url,
        "SELECT transfer_id FROM tandem_transfer($1, $2, 1, NULL, NULL, NULL)",
        user,
        other,
    )
    transfer = moved[0]["transfer_id"]
    holds = [
        (
            await fetch(
                database_url,
                "SELECT hold_id FROM tandem_create_hold_v1($1, $2, 5, 600, NULL, NULL, NULL)",
                user,
                other,
            )
        )[0]["hold_id"]
        for _ in range(2)
    ]
    # Two webhook endpoints: one read and changed, one deleted.
    hooks = await fetch(
        database_url,
        "INSERT INTO webhook_endpoints (url, secret, position) "
        "VALUES ($1, 'whsec_AA==', 0), ($1, 'whsec_AA==', 0) RETURNING id",
        PUBLIC_HOOK,
    )
    keys = {
        scope: await make_key(
            database_url, f"without-{scope.replace(':', '-')}", *others, known_to=anonymous
        )
        for scope in SCOPES
        if scope != "all"
        for others in [[s for s in SCOPES if s not in (scope, "all")]]
    }
    return {
        "ids": {
            "user": user,
            "other": other,
            "transfer": transfer,
            "hold": holds[0],
            "released": holds[1],
            "endpoint": hooks[0]["id"],
            "doomed": hooks[1]["id"],
        },
        "without": keys,
        "revoked": await make_key(database_url, "revoked", "all", revoked=True),
        "every": await make_key(database_url, "every", "all", known_to=anonymous),
    }


@pytest.fixture(scope="module")
async def anonymous(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(transport=transport, base_url=BASE) as c:
        yield c


async def _send(
    client: httpx.AsyncClient, route: Route, world: dict[str, Any], headers: dict[str, str]
) -> httpx.Response:
    ids = world["ids"]
    body = route.body(ids) if route.body else None
    return await client.request(
        route.method,
        route.path.format(**ids),
        json=body,
        headers={**(route.headers or {}), **headers},
    )


@pytest.mark.parametrize("route", ROUTES, ids=lambda r: f"{r.method} {r.path}")
async def test_route_requires_its_key(
    anonymous: httpx.AsyncClient, world: dict[str, Any], database_url: str, route: Route
) -> None:
    before = await fetch(database_url, STATE)
    unauthenticated = {
        "no key": {},
        "wrong key": bearer(new_token()),
        "revoked key": bearer(world["revoked"]),
        "malformed header": {"Authorization": "Basic dXNlcjpwYXNz"},
    }
    for case, headers in unauthenticated.items():
        answer = await _send(anonymous, route, world, headers)
        if route.page:
            assert answer.status_code == 303, (case, answer.status_code)
            assert answer.headers["location"] == "/login"
        else:
            assert answer.status_code == 401, (case, answer.text)
            assert answer.headers["www-authenticate"].startswith("Bearer")
            if route.method != "HEAD":
                assert answer.json()["error"]["code"] == "unauthenticated", case
    if route.requirement != policy.ANY_KEY:
        answer = await _send(anonymous, route, world, bearer(world["without"][route.requirement]))
        assert answer.status_code == 403, answer.text
        if route.method != "HEAD":
            assert answer.json()["error"]["code"] == "forbidden"
            assert route.requirement in answer.json()["error"]["message"]
    assert await fetch(database_url, STATE) == before, "a refused request changed something"

    answer = await _send(anonymous, route, world, bearer(world["every"]))
    assert answer.status_code == route.ok, answer.text[:300]


def served_routes() -> set[tuple[str, str]]:
    """Every (method, path template) the app serves: its schema's operations (the lean
    path's included) and the routes left out of the schema (pages, docs)."""
    app = create_app(Settings(database_url="postgresql://unused/unused"))
    served = {
        (method.upper(), path)
        for path, operations in app.openapi()["paths"].items()
        for method in operations
    }
    routes = list(app.routes)
    while routes:
        route = routes.pop()
        # An included router (FastAPI 0.16x keeps it whole): its own routes.
        routes += getattr(getattr(route, "original_router", None), "routes", [])
        methods = getattr(route, "methods", None) or set()
        served |= {(method, getattr(route, "path", "")) for method in methods if method != "HEAD"}
    return served


def test_every_route_is_in_the_table() -> None:
    """No (method, path) the app serves falls through to the default: each has its rule, and
    with it its binding."""
    served = served_routes()
    assert ("POST", "/keys") in served
    assert ("GET", "/status/fragment") in served
    missing = {route for route in served if policy.TABLE.rule_named(*route) is None}
    assert not missing, missing
    listed = {rule.template for rule in policy.RULES}
    assert {r.path for r in ROUTES if r.path.startswith("/no/")}.isdisjoint(listed)
    # ...and the matrix above covers every rule that needs a key.
    tested = {
        (rule.method, rule.template)
        for r in ROUTES
        for rule in [
            policy.rule_for(
                r.method,
                r.path.format(user=1, transfer=1, hold=1, released=1, endpoint=1, doomed=1),
            )
        ]
    }
    needing = {(r.method, r.template) for r in policy.RULES if r.requirement != policy.PUBLIC}
    assert needing <= tested, needing - tested


@pytest.mark.parametrize("path", ["/balance/{user}/history/", "/balance/{user}/", "/tasks/"])
async def test_a_trailing_slash_is_an_unknown_path(
    anonymous: httpx.AsyncClient, world: dict[str, Any], path: str
) -> None:
    """404 as any path no route serves, not a redirect (whose Location would name http://
    behind TLS at the edge): each route has one spelling, the policy table's."""
    answer = await anonymous.get(
        path.format(user=world["ids"]["user"]), headers=bearer(world["every"])
    )
    assert answer.status_code == 404, answer.text
    assert "location" not in answer.headers
    assert answer.json()["error"]["code"] == "not_found"


def test_a_rule_without_a_binding_is_refused() -> None:
    """The table cannot hold a route that does not say how a bound key is held on it."""
    with pytest.raises(TypeError):
        policy.Rule("GET", "/holds/{userId}", WALLET_READ)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        policy.Rule("GET", "/holds/{userId}", WALLET_READ, None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="PATH_USER"):
        policy.Rule("GET", "/holds", WALLET_READ, policy.Binding.PATH_USER)
    rule = policy.Rule("GET", "/events", WALLET_READ, policy.Binding.UNBOUND_ONLY)
    with pytest.raises(ValueError, match="declared twice"):
        policy.Table((rule, rule))


@pytest.mark.parametrize(
    "path", ["/health/live", "/health/ready", "/metrics", "/static-offline-docs/swagger-ui.css"]
)
async def test_public_routes_need_no_key(anonymous: httpx.AsyncClient, path: str) -> None:
    assert (await anonymous.get(path)).status_code == 200


async def test_creating_money_is_its_own_right(
    anonymous: httpx.AsyncClient, world: dict[str, Any], database_url: str
) -> None:
    """wallet:write withdraws and transfers but cannot deposit; users:write opens accounts
    with 0 but not with money; wallet:mint adds both."""
    mover = bearer(
        await make_key(database_url, "mover", WALLET_WRITE, USERS_WRITE, known_to=anonymous)
    )
    minter = bearer(
        await make_key(
            database_url, "minter", WALLET_WRITE, USERS_WRITE, WALLET_MINT, known_to=anonymous
        )
    )
    user = world["ids"]["user"]
    before = await fetch(database_url, STATE)
    deposit = {"userId": user, "amount": 5}
    answer = await anonymous.post("/balance/update", json=deposit, headers=mover)
    assert answer.status_code == 403
    assert WALLET_MINT in answer.json()["error"]["message"]
    answer = await anonymous.post("/users", json={"balance": 5}, headers=mover)
    assert answer.status_code == 403
    assert await fetch(database_url, STATE) == before
    withdrawal = {"userId": user, "amount": -5}
    assert (await anonymous.post("/balance/update", json=withdrawal, headers=mover)).is_success
    assert (await anonymous.post("/users", json={"balance": 0}, headers=mover)).is_success
    assert (await anonymous.post("/balance/update", json=deposit, headers=minter)).is_success
    assert (await anonymous.post("/users", json={"balance": 5}, headers=minter)).is_success


async def test_the_journal_and_the_task_audit_name_the_key(
    anonymous: httpx.AsyncClient, world: dict[str, Any], database_url: str
) -> None:
    teller = bearer(
        await make_key(database_url, "teller", WALLET_WRITE, WALLET_READ, known_to=anonymous)
    )
    operator = bearer(
        await make_key(database_url, "operator", TASKS_WRITE, TASKS_READ, known_to=anonymous)
    )
    user = world["ids"]["user"]
    update = {"userId": user, "amount": -3, "reference": "by the teller"}
    assert (await anonymous.post("/balance/update", json=update, headers=teller)).is_success
    assert (await anonymous.post(f"/tasks/{TASK}/pause", headers=operator)).is_success
    assert (await anonymous.post(f"/tasks/{TASK}/resume", headers=operator)).is_success

    entries = (await anonymous.get(f"/balance/{user}/history", headers=teller)).json()["entries"]
    assert entries[0]["reference"] == "by the teller"
    assert entries[0]["apiKey"] == "teller"
    actions = (await anonymous.get(f"/tasks/{TASK}/history", headers=operator)).json()["actions"]
    assert [(a["action"], a["api_key"]) for a in actions[:2]] == [
        ("resume", "operator"),
        ("pause", "operator"),
    ]


async def test_idempotency_keys_belong_to_their_caller(
    anonymous: httpx.AsyncClient, world: dict[str, Any], database_url: str
) -> None:
    """The same Idempotency-Key from two API keys is two keys: neither replays, blocks or
    reveals the other's."""
    first = bearer(await make_key(database_url, "first", WALLET_WRITE, known_to=anonymous))
    second = bearer(await make_key(database_url, "second", WALLET_WRITE, known_to=anonymous))
    user = world["ids"]["user"]
    one = await anonymous.post(
        "/balance/update",
        json={"userId": user, "amount": -1},
        headers={**first, "Idempotency-Key": "shared-key"},
    )
    other = await anonymous.post(
        "/balance/update",
        json={"userId": user, "amount": -2},
        headers={**second, "Idempotency-Key": "shared-key"},
    )
    assert one.status_code == other.status_code == 200, other.text
    assert "idempotent-replayed" not in other.headers
    assert other.json()["balance"] == one.json()["balance"] - 2
    again = await anonymous.post(
        "/balance/update",
        json={"userId": user, "amount": -1},
        headers={**first, "Idempotency-Key": "shared-key"},
    )
    assert again.headers.get("idempotent-replayed") == "true"
    assert again.json() == one.json()


async def test_new_idempotency_keys_are_capped_per_caller_per_day(database_url: str) -> None:
    from tests.support import in_process

    settings = Settings(
        database_url=database_url,
        scheduler_enabled=False,
        maintenance_enabled=False,
        idempotency_keys_per_day=3,
    )
    capped = bearer(await make_key(database_url, "capped", WALLET_WRITE))
    rows = await fetch(database_url, "INSERT INTO users (balance) VALUES (100) RETURNING id")
    user = rows[0]["id"]
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url=BASE, headers=capped) as c,
    ):

        async def withdraw(key: str) -> httpx.Response:
            body = {"userId": user, "amount": -1}
            return await c.post("/balance/update", json=body, headers={"Idempotency-Key": key})

        assert [(await withdraw(f"k{i}")).status_code for i in range(3)] == [200] * 3
        refused = await withdraw("k3")
        assert refused.status_code == 429
        assert refused.json()["error"]["code"] == "idempotency_key_limit"
        assert "retry-after" in refused.headers
        # A retry of a stored key is never refused, and unkeyed requests are not counted.
        assert (await withdraw("k1")).headers.get("idempotent-replayed") == "true"
        unkeyed = await c.post("/balance/update", json={"userId": user, "amount": -1})
        assert unkeyed.status_code == 200
    balance = await fetch(database_url, "SELECT balance FROM users WHERE id = $1", user)
    assert balance[0]["balance"] == 100 - 4


async def test_a_history_page_is_capped(
    anonymous: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    """A probe: `?limit=1000` turned an 80-byte request into 2.2 MB."""
    reader = bearer(world["every"])
    user = world["ids"]["user"]
    capped = await anonymous.get(f"/balance/{user}/history?limit=201", headers=reader)
    assert capped.status_code == 422
    assert capped.json()["error"]["code"] == "validation_error"
    assert (await anonymous.get(f"/balance/{user}/history?limit=200", headers=reader)).is_success
    tasks = await anonymous.get(f"/tasks/{TASK}/history?limit=201", headers=reader)
    assert tasks.status_code == 422


async def test_two_authorization_headers_are_refused(
    anonymous: httpx.AsyncClient, world: dict[str, Any]
) -> None:
    """Ambiguous credentials are no credentials, even when both name a valid key."""
    token = f"Bearer {world['every']}"
    answer = await anonymous.get(
        f"/balance/{world['ids']['user']}",
        headers=[("Authorization", token), ("Authorization", token)],
    )
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthenticated"
