"""Every served route, once, as the access tests send it: its method and path (formatted with
a test world's ids), what it requires, the status it answers with the right key and its
body. The route matrix (test_access.py) and the app role's tests (tests/core) walk it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tandem.access import policy
from tandem.core.callers import (
    EVENTS_READ,
    KEYS_WRITE,
    SCHEDULES_READ,
    SCHEDULES_WRITE,
    TASKS_READ,
    TASKS_WRITE,
    USERS_WRITE,
    WALLET_READ,
    WALLET_WRITE,
    WEBHOOKS_WRITE,
)

TASK = "access.probe"
# The API schedules the routes act on (made by each test's world: one read, changed, paused,
# resumed and run, one deleted), and the one POST /schedules makes; their task is the demo
# registry's, which every test app has.
SCHEDULE, GONE, MADE = "access.schedule", "access.gone", "access.made"
SCHEDULE_BODY = {"task": "demo.echo", "params": {"message": "probe"}, "every": 3600}
# A public address written as one (no name to resolve): a webhook endpoint any app accepts.
PUBLIC_HOOK = "http://93.184.216.34/hooks/tandem"


@dataclass(frozen=True)
class Route:
    method: str
    path: str  # formatted with the world's ids
    requirement: str  # a scope, or policy.ANY_KEY
    ok: int = 200  # the status with the right key
    body: Callable[[dict[str, int]], Any] | None = None
    page: bool = False
    headers: dict[str, str] | None = None


ROUTES = [
    Route(
        "POST",
        "/balance/update",
        WALLET_WRITE,
        body=lambda w: {"userId": w["user"], "amount": -1},
    ),
    Route("GET", "/balance/{user}", WALLET_READ),
    Route("HEAD", "/balance/{user}", WALLET_READ),
    Route("GET", "/balance/{user}/history", WALLET_READ),
    Route(
        "POST",
        "/transfers",
        WALLET_WRITE,
        ok=201,
        body=lambda w: {"fromUserId": w["user"], "toUserId": w["other"], "amount": 1},
    ),
    Route("GET", "/transfers/{transfer}", WALLET_READ),
    Route(
        "POST",
        "/holds",
        WALLET_WRITE,
        ok=201,
        body=lambda w: {"userId": w["user"], "amount": 1, "toUserId": w["other"]},
    ),
    Route("GET", "/holds/{hold}", WALLET_READ),
    # Each hold changed once, by the key that may (the refusals before change nothing).
    Route("POST", "/holds/{hold}/capture", WALLET_WRITE, body=lambda w: {"amount": 1}),
    Route("POST", "/holds/{released}/release", WALLET_WRITE),
    Route("GET", "/balance/{user}/holds", WALLET_READ),
    Route("POST", "/users", USERS_WRITE, ok=201, body=lambda w: {"balance": 0}),
    Route(
        "POST",
        "/keys",
        KEYS_WRITE,
        ok=201,
        body=lambda w: {"name": "minted", "scopes": [WALLET_READ], "userIds": [w["user"]]},
    ),
    Route("GET", "/tasks", TASKS_READ),
    Route("GET", f"/tasks/{TASK}/history", TASKS_READ),
    Route("GET", "/instances", TASKS_READ),
    Route("POST", f"/tasks/{TASK}/run", TASKS_WRITE),
    Route("POST", f"/tasks/{TASK}/pause", TASKS_WRITE),
    Route("POST", f"/tasks/{TASK}/resume", TASKS_WRITE),
    Route("GET", "/events", EVENTS_READ),
    Route(
        "POST", "/webhook-endpoints", WEBHOOKS_WRITE, ok=201, body=lambda w: {"url": PUBLIC_HOOK}
    ),
    Route("GET", "/webhook-endpoints", EVENTS_READ),
    Route("GET", "/webhook-endpoints/{endpoint}", EVENTS_READ),
    Route(
        "PATCH", "/webhook-endpoints/{endpoint}", WEBHOOKS_WRITE, body=lambda w: {"enabled": False}
    ),
    Route("POST", "/webhook-endpoints/{endpoint}/rotate-secret", WEBHOOKS_WRITE, body=lambda w: {}),
    Route(
        "POST", "/webhook-endpoints/{endpoint}/replay", WEBHOOKS_WRITE, body=lambda w: {"from": "0"}
    ),
    Route("GET", "/webhook-endpoints/{endpoint}/deliveries", EVENTS_READ),
    Route("DELETE", "/webhook-endpoints/{doomed}", WEBHOOKS_WRITE, ok=204),
    Route(
        "POST",
        "/schedules",
        SCHEDULES_WRITE,
        ok=201,
        body=lambda w: {"name": MADE, **SCHEDULE_BODY},
    ),
    Route("GET", "/schedules", SCHEDULES_READ),
    Route("GET", f"/schedules/{SCHEDULE}", SCHEDULES_READ),
    Route(
        "PATCH",
        f"/schedules/{SCHEDULE}",
        SCHEDULES_WRITE,
        body=lambda w: {"note": "changed"},
        headers={"If-Match": "1"},
    ),
    Route("POST", f"/schedules/{SCHEDULE}/pause", SCHEDULES_WRITE, body=lambda w: {"note": "n"}),
    Route("POST", f"/schedules/{SCHEDULE}/resume", SCHEDULES_WRITE),
    Route("POST", f"/schedules/{SCHEDULE}/run", SCHEDULES_WRITE),
    Route("GET", f"/schedules/{SCHEDULE}/history", SCHEDULES_READ),
    Route("DELETE", f"/schedules/{GONE}", SCHEDULES_WRITE, ok=204),
    Route("GET", "/", TASKS_READ, page=True),
    Route("GET", "/status/fragment", TASKS_READ, page=True),
    Route("GET", "/docs", policy.ANY_KEY, page=True),
    Route("GET", "/redoc", policy.ANY_KEY, page=True),
    Route("GET", "/openapi.json", policy.ANY_KEY),
    Route("GET", "/no/such/route", policy.ANY_KEY, ok=404),
]
