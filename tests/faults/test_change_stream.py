"""The change stream through crashes (real processes, a PostgreSQL of the test's own): three
instances take concurrent wallet changes while a receiver process answers 500 at random,
sometimes hangs past the deadline, and is killed and restarted; the instance running the
delivery worker is SIGKILLed mid-delivery and PostgreSQL is restarted once. Afterwards every
committed event reached the receiver, signed, first seen in cursor order, none that was
never committed; the events rebuild every balance; the pull API returns the same events in
the same order; an endpoint answering 500 past the (compressed) retry window is marked
failing and exported as such; a replay sends again from a cursor; and an endpoint that is
down never held the first one up."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from tandem.events.relay import RELAY_TASK
from tests.faults.common import FAULT_ENV
from tests.faults.postgres import ThrowawayPostgres
from tests.support import (
    AUTH,
    CRON_TIMINGS,
    Server,
    free_port,
    http_get,
    http_post,
    sample_sum,
    start_servers,
    task_owner,
    wait_for,
)
from tests.support.processes import REPO
from tests.support.webhooks import Delivery, recorded, verified

RETRY_WINDOW = 10.0
ENV = {
    **CRON_TIMINGS,
    **FAULT_ENV,
    "TANDEM_SCHEDULER_TASKS": "tests.support.registries:housekeeping",
    "TANDEM_MAINTENANCE_ENABLED": "true",
    "TANDEM_WEBHOOKS_ALLOW_PRIVATE": "true",
    "TANDEM_WEBHOOKS_RETRY_BASE": "0.1",
    "TANDEM_WEBHOOKS_RETRY_WINDOW": str(RETRY_WINDOW),
    "TANDEM_WEBHOOKS_TIMEOUT": "1",
    "TANDEM_EVENTS_POLL_INTERVAL": "0.05",
}
USERS = 12


class ReceiverProcess:
    """tests/support/webhooks.py run as a process of its own, recording to a file."""

    def __init__(self, tmp: Path, name: str, *flags: str) -> None:
        self.port = free_port()
        self.record = tmp / f"{name}.jsonl"
        self.flags = flags
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def start(self) -> None:
        command = [sys.executable, "-m", "tests.support.webhooks", "--port", str(self.port)]
        self.process = subprocess.Popen(
            [*command, "--record", str(self.record), *self.flags], cwd=REPO
        )
        wait_for(self._listening, 10, f"receiver on {self.port}")

    def _listening(self) -> bool:
        try:
            httpx.post(self.url, content=b"{}", timeout=1)
        except httpx.TransportError:
            return False
        return True

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()

    def deliveries(self) -> list[Delivery]:
        return [d for d in recorded(self.record) if d.body != b"{}"]


def _follow(server: Server, after: str) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = []
    cursor = after
    while True:
        page = http_get(f"{server.url}/events", params={"after": cursor, "limit": 1000}).json()
        events += page["events"]
        if not page["events"]:
            return events
        cursor = page["next"]


async def _traffic(servers: list[Server], users: list[int], count: int, seed: int) -> None:
    """``count`` changes over the three instances, 16 at a time: deposits, withdrawals and
    transfers between the users. Answers may be 503 while PostgreSQL restarts."""
    rng = random.Random(seed)
    queue: asyncio.Queue[tuple[str, str, dict[str, Any]]] = asyncio.Queue()
    for i in range(count):
        base = servers[i % len(servers)].url
        a, b = rng.sample(users, 2)
        if i % 3 == 2:
            queue.put_nowait((base, "/transfers", {"fromUserId": a, "toUserId": b, "amount": 1}))
        else:
            queue.put_nowait(
                (base, "/balance/update", {"userId": a, "amount": rng.choice([-2, 3])})
            )

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            base, path, body = queue.get_nowait()
            try:
                answer = await client.post(base + path, json=body)
            except httpx.TransportError:
                continue  # the instance was killed: its change may or may not have committed
            assert answer.status_code < 500 or answer.status_code == 503, answer.text

    async with httpx.AsyncClient(headers=AUTH, timeout=30) as client:
        await asyncio.gather(*(worker(client) for _ in range(16)))


def _make_endpoint(server: Server, url: str) -> dict[str, Any]:
    made = http_post(f"{server.url}/webhook-endpoints", json={"url": url})
    assert made.status_code == 201, made.text
    endpoint: dict[str, Any] = made.json()
    return endpoint


def test_every_committed_event_reaches_the_receiver_through_crashes(
    pg: ThrowawayPostgres, pg_url: str, log_dir: Path, tmp_path: Path
) -> None:
    # 500 for one delivery in 20, no answer (past the 1 s deadline) for one in 200.
    flaky = ReceiverProcess(tmp_path, "flaky", "--fail", "0.05", "--hang", "0.005")
    refusing = ReceiverProcess(tmp_path, "refusing", "--fail", "1.0")
    down = ReceiverProcess(tmp_path, "down")  # never started: connections refused
    flaky.start()
    refusing.start()
    servers = start_servers(pg_url, log_dir, 3, extra_env=ENV)
    try:
        first = servers[0]
        users = [
            http_post(f"{first.url}/users", json={"balance": 1000}).json()["userId"]
            for _ in range(USERS)
        ]
        endpoint = _make_endpoint(first, flaky.url)
        failing = _make_endpoint(first, refusing.url)
        _make_endpoint(first, down.url)
        start = endpoint["cursor"]

        asyncio.run(_traffic(servers, users, 200, seed=1))
        # The delivery worker's instance killed mid-delivery.
        wait_for(lambda: task_owner(servers, RELAY_TASK) is not None, 20, "the worker runs")
        owner = task_owner(servers, RELAY_TASK)
        assert owner is not None
        owner.stop(signal.SIGKILL)
        live = [s for s in servers if s is not owner]
        asyncio.run(_traffic(live, users, 200, seed=2))
        # The receiver killed, and back a moment later.
        flaky.kill()
        asyncio.run(_traffic(live, users, 100, seed=3))
        flaky.start()
        # PostgreSQL restarted once, under traffic.
        pg.restart("fast")
        asyncio.run(_traffic(live, users, 200, seed=4))

        def caught_up() -> bool:
            shown = http_get(f"{live[0].url}/webhook-endpoints/{endpoint['id']}").json()
            return bool(shown["cursor"] == _stream_end(live[0], start))

        wait_for(caught_up, 90, "the flaky receiver caught up with the stream")
        stream = _follow(live[0], start)
        by_id = {e["id"]: e for e in stream}
        seen = flaky.deliveries()
        acknowledged = [d for d in seen if 200 <= d.status < 300]
        # Every committed event delivered (acknowledged) at least once, each delivery signed.
        assert set(by_id) <= {d.event["id"] for d in acknowledged}
        assert all(verified(d, endpoint["secret"]) for d in seen)
        # None that was never committed: each delivery is one of the stream's events, as the
        # pull API shows it.
        assert all(d.event == by_id.get(d.event["id"]) for d in seen)
        # First seen in cursor order: the pull API's order.
        assert list(dict.fromkeys(d.event["id"] for d in acknowledged)) == list(by_id)
        # The events rebuild every balance.
        assert _rebuilt(live[0], users) == {
            u: http_get(f"{live[0].url}/balance/{u}").json()["balance"] for u in users
        }

        # The endpoint answering 500 throughout: failing past the window, and exported.
        def failed() -> bool:
            shown = http_get(f"{live[0].url}/webhook-endpoints/{failing['id']}").json()
            return bool(shown["state"] == "failing" and shown["enabled"] is False)

        # The first retry after the window has passed marks it (backoff capped at the window).
        wait_for(failed, 4 * RETRY_WINDOW, "the refusing endpoint marked failing")
        wait_for(
            lambda: any(
                sample_sum(
                    http_get(f"{s.url}/metrics").text, "tandem_webhook_endpoints", state="failing"
                )
                for s in live
            ),
            20,
            "the failing endpoint is exported (alert TandemWebhookEndpointFailing)",
        )
        # The endpoint that was down held nothing up, and is failing too by now.
        assert down.deliveries() == []
        # A replay from a cursor (before the last 50 events) sends those again, in order.
        tail = stream[-50:]
        cursor = _cursor_before(live[0], start, len(stream) - len(tail))
        before = len(flaky.deliveries())
        replayed = http_post(
            f"{live[0].url}/webhook-endpoints/{endpoint['id']}/replay", json={"from": cursor}
        )
        assert replayed.status_code == 200, replayed.text

        def resent() -> list[str]:
            later = flaky.deliveries()[before:]
            return list(dict.fromkeys(d.event["id"] for d in later if d.status < 300))

        wait_for(lambda: len(resent()) >= len(tail), 60, "the replay")
        assert resent()[: len(tail)] == [e["id"] for e in tail]
    finally:
        for server in servers:
            server.stop(signal.SIGKILL)
        flaky.kill()
        refusing.kill()
    for server in servers:
        assert "internal_error" not in server.log(), server.log()[-3000:]


def _cursor_before(server: Server, start: str, count: int) -> str:
    """The cursor after the first ``count`` events following ``start``."""
    page = http_get(f"{server.url}/events", params={"after": start, "limit": count}).json()
    assert len(page["events"]) == count
    return str(page["next"])


def _stream_end(server: Server, start: str) -> str:
    """The cursor after every event committed so far."""
    cursor = start
    while True:
        page = http_get(f"{server.url}/events", params={"after": cursor, "limit": 1000}).json()
        if not page["events"]:
            return str(page["next"])
        cursor = page["next"]


def _rebuilt(server: Server, users: list[int]) -> dict[int, int]:
    """Each user's balance from the events alone (from the stream's start)."""
    balances: dict[int, int] = {}
    for event in _follow(server, "0"):
        data = event["data"]
        if event["type"] in ("user.created", "balance.updated"):
            balances[data["userId"]] = data["balance"]
        for leg in data.get("legs", ()):
            balances[leg["userId"]] = leg["balance"]
    return {u: balances[u] for u in users}
