"""Webhooks in process (a real PostgreSQL, a real HTTP receiver, the delivery worker run as
its task would run it): an endpoint receives every event committed after its creation, in
cursor order, each signed (the Standard Webhooks specification's own example checks the
signing), the next only after the previous was acknowledged; failures are retried with
backoff and recorded; an endpoint failing past the retry window is marked failing and
disabled; one that hangs does not hold up another; a replay sends again from a cursor; a
rotation signs with both secrets; a worker whose run was taken over cannot move a cursor;
and the API answers bad input with stable codes, changing nothing."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from tandem.core.database import Database
from tandem.core.settings import Settings
from tandem.events.delivery import Sender, parse_url, sign
from tandem.events.relay import RELAY_TASK, Relay
from tandem.scheduler.schedules import retry_delay
from tests.access.keys import make_key
from tests.support import (
    app_settings,
    assert_error,
    eventually,
    fetch,
    in_process_client,
    new_user,
    until,
)
from tests.support.events import cursor_now, follow, stamp
from tests.support.webhooks import Receiver, verified

# Compressed for the tests: a retry after 50 ms (doubling), an attempt given up after 1 s.
FAST = {
    "webhooks_allow_private": True,
    "webhooks_retry_base": 0.05,
    "webhooks_timeout": 1.0,
    "events_poll_interval": 0.02,
}


def test_signatures_are_the_specifications_example() -> None:
    """The Standard Webhooks specification's example: its secret, id, timestamp and body
    sign to its signature."""
    body = b'{"test": 2432232314}'
    assert (
        sign(
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "msg_p5jXN8AQM9LWM0D4loKWxJek",
            1614265330,
            body,
        )
        == "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


@pytest.fixture(scope="module")
async def api(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process, allowed to send to this machine (the receivers are local)."""
    async with in_process_client(app_settings(database_url, **FAST)) as client:
        yield client


RELAY_ROW = """
INSERT INTO tasks (name, "interval", function_name, is_running, running_instance, started_at,
                   lease_until, fence)
VALUES ($1, interval '1 second', 'test', true, 'test', clock_timestamp(),
        clock_timestamp() + interval '1 hour', 1)
ON CONFLICT (name) DO UPDATE SET fence = tasks.fence + 1
RETURNING fence
"""


@contextlib.asynccontextmanager
async def relaying(url: str, **overrides: Any) -> AsyncIterator[int]:
    """The delivery worker, running as its task's run would (its fence the task row's, made
    here as a claim would); yields the fence."""
    database = Database(Settings(database_url=url, **{**FAST, **overrides}))
    await database.open()
    fence = (await fetch(url, RELAY_ROW, RELAY_TASK))[0]["fence"]
    worker = asyncio.ensure_future(Relay(database, None, fence, lambda: None, retry_delay).run())
    try:
        yield fence
    finally:
        worker.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await worker
        await database.close()


@contextlib.asynccontextmanager
async def receiving(
    answer: Callable[[dict[str, Any]], int | None] | None = None,
) -> AsyncIterator[Receiver]:
    receiver = await (Receiver(answer) if answer else Receiver()).start()
    try:
        yield receiver
    finally:
        await receiver.stop()


async def subscribe(api: httpx.AsyncClient, url: str, **fields: Any) -> dict[str, Any]:
    made = await api.post("/webhook-endpoints", json={"url": url, **fields})
    assert made.status_code == 201, made.text
    body: dict[str, Any] = made.json()
    assert body["secret"].startswith("whsec_")
    return body


async def changes(api: httpx.AsyncClient, user: int, amounts: list[int]) -> None:
    for amount in amounts:
        answer = await api.post("/balance/update", json={"userId": user, "amount": amount})
        assert answer.status_code == 200, answer.text


async def arrived(check: Callable[[], bool]) -> None:
    """Waits (up to 30 s) for what the receiver records."""
    await eventually(check, within=30)


async def test_an_endpoint_receives_each_event_after_its_creation_once_in_order_signed(
    api: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(api)
    await changes(api, user, [1])  # before the endpoint: never sent to it
    async with receiving() as receiver, relaying(database_url):
        endpoint = await subscribe(api, receiver.url, types=["balance.updated"])
        await changes(api, user, [2, 3, -4, 5])
        await arrived(lambda: len(receiver.acknowledged()) >= 4)
        await changes(api, user, [6])
        await arrived(lambda: len(receiver.acknowledged()) >= 5)
    await stamp(database_url)
    expected, _ = await follow(api, endpoint["cursor"], types="balance.updated")
    assert receiver.acknowledged() == expected
    assert [e["data"]["amount"] for e in expected if e["data"]["userId"] == user] == [
        2,
        3,
        -4,
        5,
        6,
    ]
    assert all(verified(d, endpoint["secret"]) for d in receiver.deliveries)
    assert all(d.headers["webhook-id"] == d.event["id"] for d in receiver.deliveries)


async def test_a_failed_delivery_is_retried_with_backoff_and_recorded(
    api: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(api)
    refusals = iter([500, 503, 500])

    def answer(event: dict[str, Any]) -> int:
        return next(refusals, 200)

    async with receiving(answer) as receiver, relaying(database_url):
        endpoint = await subscribe(api, receiver.url, types=["balance.updated"])
        await changes(api, user, [7, 8])
        await arrived(lambda: len(receiver.acknowledged()) >= 2)
    assert [e["data"]["amount"] for e in receiver.acknowledged()] == [7, 8]
    # The first event three times refused, then delivered; the second at once.
    assert [d.event["data"]["amount"] for d in receiver.deliveries] == [7, 7, 7, 7, 8]
    listed = await api.get(f"/webhook-endpoints/{endpoint['id']}/deliveries")
    assert listed.status_code == 200, listed.text
    attempts = [
        (d["attempt"], d["outcome"], d["statusCode"]) for d in reversed(listed.json()["deliveries"])
    ]
    assert attempts == [
        (1, "failed", 500),
        (2, "failed", 503),
        (3, "failed", 500),
        (4, "delivered", 200),
        (1, "delivered", 200),
    ]
    shown = (await api.get(f"/webhook-endpoints/{endpoint['id']}")).json()
    assert (shown["state"], shown["attempts"], shown["failingSince"]) == ("active", 0, None)


async def test_an_endpoint_failing_past_the_retry_window_is_marked_failing(
    api: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(api)
    async with (
        receiving(lambda event: 500) as receiver,
        relaying(database_url, webhooks_retry_window=0.5, events_retention=3600),
    ):
        endpoint = await subscribe(api, receiver.url, types=["balance.updated"])
        await changes(api, user, [1])

        async def failing() -> bool:
            shown = (await api.get(f"/webhook-endpoints/{endpoint['id']}")).json()
            return bool(shown["state"] == "failing")

        await until(failing, within=30)
        shown = (await api.get(f"/webhook-endpoints/{endpoint['id']}")).json()
        assert (shown["enabled"], shown["attempts"] >= 2) == (False, True)
        tried = len(receiver.deliveries)
        # Enabled again: it starts afresh from its cursor (the same event).
        receiver.answer = lambda event: 200
        again = await api.patch(f"/webhook-endpoints/{endpoint['id']}", json={"enabled": True})
        assert again.status_code == 200
        assert again.json()["state"] == "active"
        await arrived(lambda: len(receiver.acknowledged()) == 1)
    assert len(receiver.deliveries) == tried + 1
    assert receiver.acknowledged()[0]["data"]["amount"] == 1


async def test_an_endpoint_that_hangs_does_not_hold_up_another(
    api: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(api)
    async with (
        receiving(lambda event: None) as stuck,
        receiving() as fine,
        relaying(database_url, webhooks_timeout=30.0),
    ):
        await subscribe(api, stuck.url, types=["balance.updated"])
        await subscribe(api, fine.url, types=["balance.updated"])
        await changes(api, user, [1, 2, 3])
        await arrived(lambda: len(fine.acknowledged()) >= 3)
        # The other is still waiting on its first answer (30 s deadline), none acknowledged.
        assert stuck.deliveries == []
    assert [e["data"]["amount"] for e in fine.acknowledged()] == [1, 2, 3]


async def test_a_replay_sends_again_from_the_cursor_and_a_rotation_signs_with_both(
    api: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(api)
    async with receiving() as receiver, relaying(database_url):
        endpoint = await subscribe(api, receiver.url, types=["balance.updated"])
        await changes(api, user, [1, 2, 3])
        await arrived(lambda: len(receiver.acknowledged()) >= 3)
        rotated = await api.post(
            f"/webhook-endpoints/{endpoint['id']}/rotate-secret", json={"overlap": 600}
        )
        assert rotated.status_code == 200, rotated.text
        new_secret = rotated.json()["secret"]
        assert new_secret != endpoint["secret"]
        replayed = await api.post(
            f"/webhook-endpoints/{endpoint['id']}/replay", json={"from": endpoint["cursor"]}
        )
        assert replayed.status_code == 200, replayed.text
        assert replayed.json()["cursor"] == endpoint["cursor"]
        await arrived(lambda: len(receiver.acknowledged()) >= 6)
    amounts = [e["data"]["amount"] for e in receiver.acknowledged()]
    assert amounts == [1, 2, 3, 1, 2, 3]
    first, again = receiver.deliveries[:3], receiver.deliveries[3:]
    assert [d.event["id"] for d in first] == [d.event["id"] for d in again]
    assert all(verified(d, endpoint["secret"]) and verified(d, new_secret) for d in again)
    assert not any(verified(d, new_secret) for d in first)


async def test_a_worker_whose_run_was_taken_over_cannot_move_a_cursor(
    api: httpx.AsyncClient, database_url: str
) -> None:
    user = await new_user(api)
    async with receiving() as receiver, relaying(database_url) as fence:
        endpoint = await subscribe(api, receiver.url, types=["balance.updated"])
        await changes(api, user, [1])
        await arrived(lambda: len(receiver.acknowledged()) >= 1)

        async def cursor() -> str:
            return str((await api.get(f"/webhook-endpoints/{endpoint['id']}")).json()["cursor"])

        # Recorded after the receiver answered: wait for the write.
        await until(lambda: _differs(cursor(), endpoint["cursor"]), within=30)
        moved = await cursor()
        # Another instance claimed the run: the task's fence moved on.
        await fetch(
            database_url, "UPDATE tasks SET fence = $2 WHERE name = $1", RELAY_TASK, fence + 1
        )
        await changes(api, user, [2])
        await arrived(lambda: len(receiver.deliveries) >= 2)
        await asyncio.sleep(0.3)
        assert await cursor() == moved, "the old worker's write was refused"


async def _differs(value: Awaitable[str], other: str) -> bool:
    return await value != other


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"url": "ftp://example.com/x"}, 422, "webhook_url_refused"),
        ({"url": "https://user:pw@example.com/x"}, 422, "webhook_url_refused"),
        ({"url": "https:///nohost"}, 422, "webhook_url_refused"),
        ({"url": "https://example.com/a b"}, 422, "webhook_url_refused"),
        ({"url": "http://example.com:0/x"}, 422, "webhook_url_refused"),
        ({"url": "http://a..b/x"}, 422, "webhook_url_refused"),
        ({"url": "http://" + "a" * 64 + ".com/x"}, 422, "webhook_url_refused"),
        ({"url": "http://exa\u0000mple.com/x"}, 422, "webhook_url_refused"),
        ({"url": "https://example.com/" + "x" * 2100}, 422, "validation_error"),
        (
            {"url": "http://example.com", "types": ["balance.updated", "nope"]},
            422,
            "unknown_event_type",
        ),
        ({"url": "http://example.com", "types": []}, 422, "validation_error"),
        ({"url": 5}, 422, "validation_error"),
        ({"url": "http://example.com", "extra": 1}, 422, "validation_error"),
        ({}, 422, "validation_error"),
    ],
)
async def test_a_bad_endpoint_is_refused_and_nothing_made(
    api: httpx.AsyncClient, database_url: str, body: dict[str, Any], status: int, code: str
) -> None:
    before = await fetch(database_url, "SELECT count(*) FROM webhook_endpoints")
    assert_error(await api.post("/webhook-endpoints", json=body), status, code)
    assert await fetch(database_url, "SELECT count(*) FROM webhook_endpoints") == before


@pytest.mark.parametrize(
    "url",
    ["http://127.0.0.1:9/x", "http://10.1.2.3/x", "http://[::1]/x", "http://169.254.169.254/"],
)
async def test_a_private_target_is_refused_without_the_setting(
    client: httpx.AsyncClient, url: str
) -> None:
    """The suite's default app (TANDEM_WEBHOOKS_ALLOW_PRIVATE unset)."""
    assert_error(
        await client.post("/webhook-endpoints", json={"url": url}), 422, "webhook_url_refused"
    )


async def test_unknown_endpoints_cursors_and_bound_keys_get_stable_codes(
    api: httpx.AsyncClient, database_url: str
) -> None:
    for method, path in [
        ("GET", "/webhook-endpoints/999999"),
        ("PATCH", "/webhook-endpoints/999999"),
        ("DELETE", "/webhook-endpoints/999999"),
        ("GET", "/webhook-endpoints/999999/deliveries"),
    ]:
        body = {"enabled": False} if method == "PATCH" else None
        assert_error(await api.request(method, path, json=body), 404, "webhook_endpoint_not_found")
    assert_error(await api.get("/webhook-endpoints/abc"), 422, "validation_error")
    async with receiving() as receiver:
        endpoint = await subscribe(api, receiver.url)
    replay = f"/webhook-endpoints/{endpoint['id']}/replay"
    assert_error(await api.post(replay, json={"from": "x"}), 400, "invalid_cursor")
    assert_error(await api.post(replay, json={"from": "99999999999"}), 400, "invalid_cursor")
    assert_error(await api.post(replay, json={}), 422, "validation_error")
    user = await new_user(api)
    token = await make_key(database_url, "hooks-bound", "all", users=[user], known_to=api)
    bound = {"Authorization": f"Bearer {token}"}
    assert_error(await api.get("/webhook-endpoints", headers=bound), 403, "forbidden")
    assert_error(
        await api.post("/webhook-endpoints", json={"url": receiver.url}, headers=bound),
        403,
        "forbidden",
    )
    assert (await api.delete(f"/webhook-endpoints/{endpoint['id']}")).status_code == 204
    assert_error(
        await api.get(f"/webhook-endpoints/{endpoint['id']}"), 404, "webhook_endpoint_not_found"
    )


async def test_a_new_endpoint_starts_at_the_stream_end(
    api: httpx.AsyncClient, database_url: str
) -> None:
    """Events committed before it was made are not its own, even those not stamped yet."""
    user = await new_user(api)
    await changes(api, user, [1])
    async with receiving() as receiver:
        endpoint = await subscribe(api, receiver.url)
    assert endpoint["cursor"] == await cursor_now(api, database_url)
    rows = await fetch(database_url, "SELECT max(position) FROM events WHERE user_id = $1", user)
    assert rows[0][0] <= int(endpoint["cursor"])


async def test_an_endpoint_enabled_past_the_retention_is_told_to_replay(
    api: httpx.AsyncClient, database_url: str
) -> None:
    """Disabled while its events were pruned: enabling it answers 410 (the events after its
    cursor are gone), a replay from a kept cursor starts it again."""
    async with receiving() as receiver:
        endpoint = await subscribe(api, receiver.url)
    path = f"/webhook-endpoints/{endpoint['id']}"
    assert (await api.patch(path, json={"enabled": False})).status_code == 200
    user = await new_user(api)
    await changes(api, user, [1])
    end = await cursor_now(api, database_url)
    await fetch(database_url, "SELECT tandem_prune_events_v1(interval '0', 100000)")
    assert_error(await api.patch(path, json={"enabled": True}), 410, "cursor_expired")
    replayed = await api.post(f"{path}/replay", json={"from": end})
    assert replayed.status_code == 200, replayed.text
    assert replayed.json()["enabled"] is True


async def _raw_answer(answer: bytes) -> tuple[asyncio.Server, str]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/hook"


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 500 X\r\nContent-Length: 5\r\n\r\na\x00b\x01c",
        b"HTTP/1.1 101 Switching\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"garbage\r\n\r\n",
    ],
    ids=["nul-in-the-body", "upgrade", "not-http"],
)
async def test_any_answer_is_a_recordable_outcome(answer: bytes) -> None:
    """Whatever a receiver answers, the attempt ends as an outcome the worker can record: no
    exception, and no byte a text column refuses."""
    server, url = await _raw_answer(answer)
    sender = Sender(allow_private=True)
    try:
        got = await sender.post(parse_url(url), {}, b"{}", 5.0)
    finally:
        sender.close()
        server.close()
    assert not got.delivered
    assert got.error is not None
    assert "\x00" not in got.error
