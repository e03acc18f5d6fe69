"""The wallet API in process (the app itself over ASGI, a real PostgreSQL)."""

from __future__ import annotations

import asyncio
import gc
import json
import re
from collections.abc import Iterator

import httpx
import pytest

from tandem.core.ids import INT64_MAX
from tests.support import assert_error, balance_of, new_user, sample_sum


async def test_withdrawal_answers_new_balance(client: httpx.AsyncClient) -> None:
    """A withdrawal answers the new balance, and the balance reads back the same."""
    user = await new_user(client)
    response = await client.post("/balance/update", json={"userId": user, "amount": -2})
    assert response.status_code == 200
    body = response.json()
    assert (body["userId"], body["balance"]) == (user, 9998)
    assert isinstance(body["entryId"], int)
    assert await balance_of(client, user) == 9998


async def test_deposit_adds(client: httpx.AsyncClient) -> None:
    """A positive amount is a deposit."""
    user = await new_user(client, 5)
    response = await client.post("/balance/update", json={"userId": user, "amount": 7})
    assert (response.json()["userId"], response.json()["balance"]) == (user, 12)


async def test_withdrawal_to_exactly_zero_is_allowed(client: httpx.AsyncClient) -> None:
    """The balance may reach 0 but never go below: the next unit is refused."""
    user = await new_user(client, 5)
    assert (await client.post("/balance/update", json={"userId": user, "amount": -5})).json()[
        "balance"
    ] == 0
    refused = await client.post("/balance/update", json={"userId": user, "amount": -1})
    assert_error(refused, 409, "insufficient_funds")
    assert await balance_of(client, user) == 0


async def test_insufficient_funds_changes_nothing(client: httpx.AsyncClient) -> None:
    """A withdrawal larger than the balance is refused with 409 and changes nothing."""
    user = await new_user(client, 5)
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": -6}),
        409,
        "insufficient_funds",
    )
    assert await balance_of(client, user) == 5


async def test_balance_ceiling_is_refused(client: httpx.AsyncClient) -> None:
    """A deposit past 2^63-1 is refused (not a 500) and changes nothing."""
    user = await new_user(client, INT64_MAX - 1)
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": 2}),
        409,
        "balance_limit_exceeded",
    )
    assert await balance_of(client, user) == INT64_MAX - 1
    assert (
        await client.post("/balance/update", json={"userId": user, "amount": 1})
    ).status_code == 200


async def test_unknown_user_is_404(client: httpx.AsyncClient) -> None:
    """Updating or reading a user that does not exist answers user_not_found."""
    missing = 2**62
    assert_error(
        await client.post("/balance/update", json={"userId": missing, "amount": 5}),
        404,
        "user_not_found",
    )
    assert_error(await client.get(f"/balance/{missing}"), 404, "user_not_found")


async def test_plan_user_one_exists(client: httpx.AsyncClient) -> None:
    """The migration creates user 1 for clients written against the original plan."""
    assert (await client.get("/balance/1")).status_code == 200


BAD_UPDATE_BODIES: list[tuple[str, bytes]] = [
    ("malformed JSON", b'{"userId": 1, "amount": '),
    ("empty body", b""),
    ("not UTF-8", b"\xff\xfe\x00"),
    ("array", b"[1, -2]"),
    ("string", b'"hello"'),
    ("null", b"null"),
    ("number", b"-2"),
    ("missing amount", b'{"userId": %d}'),
    ("missing userId", b'{"amount": -2}'),
    ("amount as string", b'{"userId": %d, "amount": "-2"}'),
    ("userId as string", b'{"userId": "%d", "amount": -2}'),
    ("fractional amount", b'{"userId": %d, "amount": 1.5}'),
    ("integral float amount", b'{"userId": %d, "amount": -2.0}'),
    ("exponent amount", b'{"userId": %d, "amount": -2e0}'),
    ("float userId", b'{"userId": 1.0, "amount": -2}'),
    ("boolean amount", b'{"userId": %d, "amount": true}'),
    ("boolean userId", b'{"userId": true, "amount": -2}'),
    ("null amount", b'{"userId": %d, "amount": null}'),
    ("zero amount", b'{"userId": %d, "amount": 0}'),
    ("amount above int64", b'{"userId": %d, "amount": 9223372036854775808}'),
    ("amount below int64", b'{"userId": %d, "amount": -9223372036854775809}'),
    ("huge amount", b'{"userId": %d, "amount": -' + b"9" * 5000 + b"}"),
    ("zero userId", b'{"userId": 0, "amount": -2}'),
    ("negative userId", b'{"userId": -1, "amount": -2}'),
    ("userId above int64", b'{"userId": 9223372036854775808, "amount": -2}'),
    ("unknown field", b'{"userId": %d, "amount": -2, "note": "x"}'),
    ("NaN amount", b'{"userId": %d, "amount": NaN}'),
    ("duplicate key", b'{"userId": %d, "amount": -2, "amount": 2}'),
    ("duplicate userId", b'{"userId": %d, "amount": -2, "userId": 1}'),
    ("empty reference", b'{"userId": %d, "amount": -2, "reference": ""}'),
    ("reference too long", b'{"userId": %d, "amount": -2, "reference": "' + b"r" * 256 + b'"}'),
    ("reference not text", b'{"userId": %d, "amount": -2, "reference": 17}'),
    ("reference with NUL", b'{"userId": %d, "amount": -2, "reference": "a\\u0000b"}'),
]


@pytest.mark.parametrize(
    ("case", "body"), BAD_UPDATE_BODIES, ids=[case for case, _ in BAD_UPDATE_BODIES]
)
async def test_malformed_update_is_422_and_changes_nothing(
    client: httpx.AsyncClient, case: str, body: bytes
) -> None:
    """Every malformed update answers a 4xx JSON error with a stable code; nothing changes."""
    user = await new_user(client, 100)
    payload = body.replace(b"%d", str(user).encode()) if b"%d" in body else body
    response = await client.post(
        "/balance/update", content=payload, headers={"content-type": "application/json"}
    )
    if len(payload) > 4096:
        assert_error(response, 413, "payload_too_large")
    else:
        assert_error(response, 422, "validation_error")
    assert await balance_of(client, user) == 100


@pytest.mark.parametrize(
    "key", ["", "a b", "x" * 256, "ключ"], ids=["empty", "space", "too-long", "non-ascii"]
)
async def test_bad_idempotency_key_is_422(client: httpx.AsyncClient, key: str) -> None:
    """An Idempotency-Key that is not 1-255 visible ASCII characters is refused."""
    user = await new_user(client, 100)
    response = await client.post(
        "/balance/update",
        json={"userId": user, "amount": -2},
        headers={"Idempotency-Key": key.encode()},
    )
    assert_error(response, 422, "validation_error")
    assert await balance_of(client, user) == 100


@pytest.mark.parametrize(
    "raw",
    ["abc", "0", "-1", "01", "1.5", "1e3", "9223372036854775808", "99999999999999999999999", "%20"],
)
async def test_bad_user_id_in_path_is_422(client: httpx.AsyncClient, raw: str) -> None:
    """A path userId that is not a positive 64-bit integer answers validation_error."""
    assert_error(await client.get(f"/balance/{raw}"), 422, "validation_error")


@pytest.mark.parametrize(
    ("body", "status", "expected"),
    [
        (None, 201, 10_000),
        (b"{}", 201, 10_000),
        (b'{"balance": 0}', 201, 0),
        (b'{"balance": 5}', 201, 5),
        (b'{"balance": -1}', 422, None),
        (b'{"balance": 1.5}', 422, None),
        (b'{"balance": 5.0}', 422, None),
        (b'{"balance": "5"}', 422, None),
        (b'{"balance": true}', 422, None),
        (b'{"balance": 9223372036854775808}', 422, None),
        (b'{"balance": 5, "extra": 1}', 422, None),
        (b'{"balance": ', 422, None),
        (b"[]", 422, None),
        (b"\xff\xfe", 422, None),
        (b'{"balance": 5, "balance": 6}', 422, None),
    ],
)
async def test_create_user(
    client: httpx.AsyncClient, body: bytes | None, status: int, expected: int | None
) -> None:
    """POST /users makes a user with the given balance (default 10000) or refuses with 422."""
    headers = {"content-type": "application/json"} if body is not None else {}
    response = await client.post("/users", content=body, headers=headers)
    if status == 201:
        assert response.status_code == 201, response.text
        assert response.json()["balance"] == expected
        assert await balance_of(client, response.json()["userId"]) == expected
    else:
        assert_error(response, 422, "validation_error")


async def test_idempotent_retry_applies_once(client: httpx.AsyncClient) -> None:
    """A retry with the same Idempotency-Key returns the first outcome and does not apply."""
    user = await new_user(client, 100)
    first = await client.post(
        "/balance/update",
        json={"userId": user, "amount": -10},
        headers={"Idempotency-Key": f"k1-{user}"},
    )
    second = await client.post(
        "/balance/update",
        json={"userId": user, "amount": -10},
        headers={"Idempotency-Key": f"k1-{user}"},
    )
    assert first.status_code == second.status_code == 200
    assert first.json() == second.json()
    assert (first.json()["userId"], first.json()["balance"]) == (user, 90)
    assert "idempotent-replayed" not in first.headers
    assert second.headers["idempotent-replayed"] == "true"
    assert await balance_of(client, user) == 90


async def test_idempotency_key_reused_with_other_body(client: httpx.AsyncClient) -> None:
    """The same key with a different request is refused and changes nothing."""
    user = await new_user(client, 100)
    key = {"Idempotency-Key": f"k2-{user}"}
    first = await client.post("/balance/update", json={"userId": user, "amount": -10}, headers=key)
    assert first.status_code == 200
    reused = await client.post("/balance/update", json={"userId": user, "amount": -20}, headers=key)
    assert_error(reused, 422, "idempotency_key_reused")
    assert await balance_of(client, user) == 90


async def test_idempotent_refusal_is_replayed(client: httpx.AsyncClient) -> None:
    """A refused keyed request stays refused on retry, even once funds would suffice."""
    user = await new_user(client, 5)
    key = {"Idempotency-Key": f"k3-{user}"}
    assert_error(
        await client.post("/balance/update", json={"userId": user, "amount": -10}, headers=key),
        409,
        "insufficient_funds",
    )
    await client.post("/balance/update", json={"userId": user, "amount": 100})
    retry = await client.post("/balance/update", json={"userId": user, "amount": -10}, headers=key)
    assert_error(retry, 409, "insufficient_funds")
    assert await balance_of(client, user) == 105


@pytest.mark.parametrize(
    "content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/jsonx"]
)
async def test_update_body_must_be_declared_json(
    client: httpx.AsyncClient, content_type: str | None
) -> None:
    """A body not declared application/json (a cross-site form's text/plain, say) is 415
    and changes nothing; a charset parameter is fine."""
    user = await new_user(client, 100)
    body = b'{"userId": %d, "amount": -2}' % user
    headers = {"content-type": content_type} if content_type else {}
    assert_error(
        await client.post("/balance/update", content=body, headers=headers),
        415,
        "unsupported_media_type",
    )
    assert await balance_of(client, user) == 100
    ok = await client.post(
        "/balance/update", content=body, headers={"content-type": "application/json; charset=utf-8"}
    )
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize(
    "order", [("application/json", "text/plain"), ("text/plain", "application/json")]
)
@pytest.mark.parametrize("route", ["/balance/update", "/transfers", "/users"])
async def test_two_content_types_are_415_on_both_paths(
    client: httpx.AsyncClient, route: str, order: tuple[str, str]
) -> None:
    """Two Content-Type headers are refused alike by the lean path (/balance/update) and
    FastAPI's routes (/transfers, /users), whichever comes first, and change nothing."""
    payer, payee = await new_user(client, 100), await new_user(client, 0)
    body = {
        "/balance/update": {"userId": payer, "amount": -2},
        "/transfers": {"fromUserId": payer, "toUserId": payee, "amount": 2},
        "/users": {"balance": 0},
    }[route]
    headers = [("content-type", order[0]), ("content-type", order[1])]
    response = await client.post(route, content=json.dumps(body).encode(), headers=headers)
    assert_error(response, 415, "unsupported_media_type")
    assert "given 2 times" in response.json()["error"]["message"]
    assert (await balance_of(client, payer), await balance_of(client, payee)) == (100, 0)


async def test_two_idempotency_keys_are_422(client: httpx.AsyncClient) -> None:
    """Two Idempotency-Key headers are ambiguous: refused, nothing changed."""
    user = await new_user(client, 100)
    response = await client.post(
        "/balance/update",
        json={"userId": user, "amount": -2},
        headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
    )
    assert_error(response, 422, "validation_error")
    assert await balance_of(client, user) == 100


async def test_unknown_route_and_method_are_json(client: httpx.AsyncClient) -> None:
    """Unknown paths and wrong methods answer JSON errors, not HTML."""
    assert_error(await client.get("/nowhere"), 404, "not_found")
    assert_error(await client.put("/balance/update", json={}), 405, "method_not_allowed")


async def test_docs_work_offline(client: httpx.AsyncClient) -> None:
    """/docs loads Swagger UI from the app itself, not from a CDN."""
    page = await client.get("/docs")
    assert page.status_code == 200
    sources = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert sources
    for source in sources:
        assert not source.startswith(("http://", "https://", "//")), source
        if source.endswith((".js", ".css")):
            assert (await client.get(source)).status_code == 200, source


async def test_openapi_documents_wallet(client: httpx.AsyncClient) -> None:
    """The OpenAPI schema documents both endpoints, their request body and their errors."""
    schema = (await client.get("/openapi.json")).json()
    update = schema["paths"]["/balance/update"]["post"]
    body_ref = update["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert body_ref == "#/components/schemas/BalanceUpdate"
    model = schema["components"]["schemas"]["BalanceUpdate"]
    assert set(model["required"]) == {"userId", "amount"}
    assert {"200", "404", "409", "422"} <= set(update["responses"])
    assert "/balance/{userId}" in schema["paths"]
    assert any(p["name"] == "Idempotency-Key" for p in update["parameters"])


async def test_every_schema_reference_resolves(client: httpx.AsyncClient) -> None:
    """Every $ref in the schema names a component it holds: the models that hand-written
    parts refer to (the hot routes' operations, raw-body routes) are registered by the
    reference itself, with no list to forget one in."""
    schema = (await client.get("/openapi.json")).json()
    components = schema["components"]["schemas"]

    def refs(node: object) -> Iterator[str]:
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "$ref" and isinstance(value, str):
                    yield value
                else:
                    yield from refs(value)
        elif isinstance(node, list):
            for item in node:
                yield from refs(item)

    found = set(refs(schema))
    assert {"#/components/schemas/TransferCreate", "#/components/schemas/BalanceAt"} <= found
    prefix = "#/components/schemas/"
    assert all(ref.startswith(prefix) for ref in found), found
    assert {ref.removeprefix(prefix) for ref in found} - set(components) == set()


async def test_health(client: httpx.AsyncClient) -> None:
    """Live answers; ready reports the database reachable and the schema at head."""
    assert (await client.get("/health/live")).json() == {"status": "ok"}
    ready = await client.get("/health/ready")
    assert ready.status_code == 200
    body = ready.json()
    assert body["status"] == "ready"
    assert body["schema_revision"] == body["expected_revision"]


async def test_metrics_count_requests_and_outcomes(client: httpx.AsyncClient) -> None:
    """Each answered update is counted by route template, status and wallet outcome."""
    user = await new_user(client, 1)
    before = (await client.get("/metrics")).text
    await client.post("/balance/update", json={"userId": user, "amount": -5})
    await client.get(f"/balance/{user}")
    after = (await client.get("/metrics")).text

    def delta(name: str, **labels: str) -> float:
        return sample_sum(after, name, **labels) - sample_sum(before, name, **labels)

    assert delta("tandem_wallet_balance_updates_total", outcome="insufficient_funds") == 1
    assert (
        delta("tandem_http_requests_total", method="POST", route="/balance/update", status="409")
        == 1
    )
    assert (
        delta("tandem_http_requests_total", method="GET", route="/balance/{userId}", status="200")
        == 1
    )
    assert (
        delta("tandem_http_request_duration_seconds_count", method="POST", route="/balance/update")
        == 1
    )


async def test_every_response_names_its_instance(client: httpx.AsyncClient) -> None:
    """Lean-path, routed, error and 404 answers all carry X-Instance-Id, and it is the id the
    instance reports in tandem_instance_info (what a load balancer's access log records)."""
    user = await new_user(client, 3)
    responses = [
        await client.post("/balance/update", json={"userId": user, "amount": -1}),
        await client.post("/balance/update", json={"userId": user, "amount": -10}),
        await client.get(f"/balance/{user}"),
        await client.get("/no/such/route"),
        await client.get("/health/live"),
    ]
    ids = {r.headers.get("x-instance-id") for r in responses}
    assert len(ids) == 1, ids
    (instance_id,) = ids
    assert instance_id
    info = [
        line
        for line in (await client.get("/metrics")).text.splitlines()
        if line.startswith("tandem_instance_info{")
    ]
    assert len(info) == 1, info
    assert f'instance_id="{instance_id}"' in info[0], info


async def test_a_refused_request_leaves_no_reference_cycle(client: httpx.AsyncClient) -> None:
    """Refusals answered on both paths (the lean path's withdrawal, a FastAPI route's
    transfer, each refused 409, 20 of each at once) leave no error in a reference cycle: an
    error's traceback would hold the frames it passed, and with them the request's connection,
    until the cyclic collector ran (under a burst, most of the server's collection work)."""
    payer, payee = await new_user(client, 1), await new_user(client, 0)
    gc.collect()
    gc.disable()
    try:
        answers = await asyncio.gather(
            *(
                client.post("/balance/update", json={"userId": payer, "amount": -2})
                for _ in range(20)
            ),
            *(
                client.post(
                    "/transfers", json={"fromUserId": payer, "toUserId": payee, "amount": 2}
                )
                for _ in range(20)
            ),
        )
        assert [a.status_code for a in answers] == [409] * 40
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        cyclic = [type(o).__name__ for o in gc.garbage if isinstance(o, BaseException)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert cyclic == []
