"""The delivery worker: the sequencer's rounds, then each webhook endpoint's deliveries.

It runs as a task of the cluster cron that never ends (``tandem.events.relay``, wired in
tandem/maintenance.py): one instance at a time runs it, fenced like every run (renewed by its
instance's heartbeat, self-fenced when it cannot renew; if its instance dies, the run is swept
as lost and another instance claims it within a poll). Every cursor write carries the run's
fence (repository.RECORD_DELIVERIES), so a worker that was taken over cannot move a cursor.

- **Stamping**: ``tandem_stamp_events_v1`` in a loop, on a connection of its own: at once
  again while a round was full, else every TANDEM_EVENTS_POLL_INTERVAL.
- **Deliveries**: one coroutine per enabled endpoint, so a slow or dead endpoint holds up only
  itself. Each reads its next events (after its cursor, of its types), sends them one at a
  time in cursor order, the next only after the previous was answered 2xx, and records the
  acknowledged ones and its cursor in one transaction per batch (a crash re-sends at most that
  batch). A failure is recorded with the next attempt's time: the cron's retry arithmetic
  (``retry_delay``: exponential, equal jitter) from TANDEM_WEBHOOKS_RETRY_BASE; past
  TANDEM_WEBHOOKS_RETRY_WINDOW since the first failure the endpoint is marked failing and
  disabled.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import timedelta

import asyncpg

from tandem.core.database import Database
from tandem.core.errors import DatabaseFailureError
from tandem.events import delivery, repository
from tandem.events.repository import Attempt, Endpoint
from tandem.events.service import StreamWatch
from tandem.observability.metrics import (
    EVENTS_LAG,
    EVENTS_STAMPED,
    WEBHOOK_DELIVERIES,
    WEBHOOK_ENDPOINTS,
)

log = logging.getLogger(__name__)

RELAY_TASK = "tandem.events.relay"
# Events stamped per round (one short transaction).
STAMP_BATCH = 5000
# Events an endpoint's worker reads at a time; acknowledged ones are recorded together.
DELIVERY_BATCH = 100
# The longest wait between two attempts at one event (seconds): a receiver back after a day
# down waits at most this long, not days.
RETRY_CAP = 3600.0
# How often the worker looks for endpoints made, changed or deleted (seconds).
ENDPOINTS_REFRESH = 1.0


class Relay:
    """One run of the delivery worker: ``run`` until cancelled."""

    def __init__(
        self,
        database: Database,
        watch: StreamWatch | None,
        fence: int,
        check: Callable[[], None],
        retry_delay: Callable[[int, timedelta, timedelta], timedelta],
    ) -> None:
        self._database = database
        self._settings = database.settings
        self._watch = watch
        self._fence = (RELAY_TASK, fence)
        self._check = check
        self._retry_delay = retry_delay
        self._last_position = 0
        # The endpoints' coroutines wait here for the stream to pass what they have read.
        self._stream = StreamWatch(lambda: database.pool, poll=False)
        self._workers: dict[int, tuple[Endpoint, asyncio.Task[None]]] = {}

    async def run(self) -> None:
        try:
            async with asyncio.TaskGroup() as group:
                group.create_task(self._stamp())
                group.create_task(self._endpoints(group))
        finally:
            # Another instance's worker exports them from now on.
            EVENTS_LAG.clear()
            WEBHOOK_ENDPOINTS.clear()

    async def _stamp(self) -> None:
        """The sequencer's rounds, on a connection of its own; a database failure is waited
        out (the run goes on: a relay that failed would be a failed run a second)."""
        poll = self._settings.events_poll_interval
        conn: asyncpg.Connection | None = None
        try:
            while True:
                self._check()
                try:
                    if conn is None or conn.is_closed():
                        conn = await self._database.connect("tandem-relay")
                    stamped, last = await repository.stamp_events(conn, STAMP_BATCH)
                except (
                    OSError,
                    asyncpg.PostgresError,
                    asyncpg.InterfaceError,
                    DatabaseFailureError,
                ) as error:
                    log.warning("the sequencer could not stamp events: %r", error)
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(1.0)
                    continue
                self._stamped(stamped, last)
                if stamped < STAMP_BATCH:
                    await asyncio.sleep(poll)
        finally:
            if conn is not None:
                await conn.close(timeout=self._settings.db_close_timeout)

    def _stamped(self, stamped: int, last: int | None) -> None:
        if stamped:
            EVENTS_STAMPED.inc(stamped)
        if last is not None and last > self._last_position:
            self._last_position = last
            self._stream.moved(last)
            if self._watch is not None:
                self._watch.moved(last)

    async def _endpoints(self, group: asyncio.TaskGroup) -> None:
        """Starts a worker per enabled endpoint, restarts it when the endpoint changed (a
        replay, a new URL or types), stops it when disabled or deleted."""
        while True:
            self._check()
            try:
                listed = await repository.list_endpoints(self._database.pool)
            except (OSError, asyncpg.PostgresError, DatabaseFailureError) as error:
                log.warning("webhook endpoints could not be read: %r", error)
                await asyncio.sleep(ENDPOINTS_REFRESH)
                continue
            found = {e.id: e for e in listed}
            states: dict[str, int] = {"active": 0, "failing": 0, "disabled": 0}
            for endpoint in found.values():
                states[
                    "failing"
                    if endpoint.state == "failing"
                    else "active"
                    if endpoint.enabled
                    else "disabled"
                ] += 1
            for state, count in states.items():
                WEBHOOK_ENDPOINTS.labels(state).set(count)
            for endpoint_id, (running, task) in list(self._workers.items()):
                now = found.get(endpoint_id)
                if (
                    now is None
                    or not now.enabled
                    or now.generation != running.generation
                    or task.done()
                ):
                    task.cancel()
                    del self._workers[endpoint_id]
                    with contextlib.suppress(KeyError):
                        EVENTS_LAG.remove(str(endpoint_id))
            for endpoint in found.values():
                if endpoint.enabled and endpoint.id not in self._workers:
                    task = group.create_task(self._deliver(endpoint))
                    self._workers[endpoint.id] = (endpoint, task)
            await asyncio.sleep(ENDPOINTS_REFRESH)

    async def _deliver(self, endpoint: Endpoint) -> None:
        """One endpoint's deliveries, in cursor order, until cancelled or refused."""
        sender = delivery.Sender(self._settings.webhooks_allow_private)
        try:
            await self._deliver_until_refused(endpoint, sender)
        except asyncio.CancelledError:
            raise
        except Exception:
            # The endpoints' loop starts it again (a database failure, say).
            log.exception("webhook endpoint %d: delivery stopped", endpoint.id)
            await asyncio.sleep(1.0)
        finally:
            sender.close()

    async def _deliver_until_refused(self, endpoint: Endpoint, sender: delivery.Sender) -> None:
        settings = self._settings
        pool = self._database.pool
        position = endpoint.position
        attempts = endpoint.attempts
        # Scanned through here: events of no type this endpoint takes are not read twice.
        scanned = position
        if endpoint.next_attempt_at is not None:
            await _sleep_until(endpoint.next_attempt_at.timestamp())
        while True:
            # Committed (the stamper's own last round said so): a bound that skips nothing.
            through = self._stream.last_position
            pending, pruned = await repository.pending_events(
                pool, max(position, scanned), endpoint.types, DELIVERY_BATCH, through
            )
            if position < pruned:
                await repository.expire_endpoint(pool, endpoint, self._fence)
                log.error(
                    "webhook endpoint %d: the events after its cursor %d were deleted past "
                    "the retention (through %d) before it received them; marked failing "
                    "(replay it from a kept cursor)",
                    endpoint.id,
                    position,
                    pruned,
                )
                return
            if not pending:
                scanned = max(scanned, through)
                EVENTS_LAG.labels(str(endpoint.id)).set(0)
                await self._stream.wait_past(through, settings.events_poll_interval * 10)
                continue
            EVENTS_LAG.labels(str(endpoint.id)).set(
                max(0.0, time.time() - pending[0].created_at.timestamp())
            )
            secrets = await repository.endpoint_secrets(pool, endpoint.id)
            if secrets is None:
                return  # deleted
            acknowledged: list[Attempt] = []
            failed: tuple[Attempt, delivery.Answer] | None = None
            for event in pending:
                self._check()
                answer = await self._send(sender, endpoint, secrets, event)
                attempt = Attempt(
                    event.event_id,
                    event.position,
                    attempts + 1,
                    "delivered" if answer.delivered else "failed",
                    answer.status or None,
                    answer.duration_ms,
                    answer.error,
                )
                WEBHOOK_DELIVERIES.labels(attempt.outcome).inc()
                if not answer.delivered:
                    failed = (attempt, answer)
                    break
                acknowledged.append(attempt)
                attempts = 0
            if failed is None and len(pending) < DELIVERY_BATCH:
                # Every event of its types through ``through`` was just delivered.
                scanned = max(scanned, through)
            if acknowledged:
                position = acknowledged[-1].position
                recorded = await repository.record_deliveries(
                    pool, endpoint, self._fence, position, True, 0, 0, acknowledged
                )
                if recorded is None:
                    return  # fenced: replayed, changed, or this run was taken over
            if failed is not None:
                attempt, answer = failed
                attempts += 1
                delay = self._retry_delay(
                    attempts,
                    timedelta(seconds=settings.webhooks_retry_base),
                    timedelta(seconds=min(settings.webhooks_retry_window, RETRY_CAP)),
                ).total_seconds()
                recorded = await repository.record_deliveries(
                    pool,
                    endpoint,
                    self._fence,
                    position,
                    False,
                    delay,
                    settings.webhooks_retry_window,
                    [attempt],
                )
                if recorded is None:
                    return
                state, enabled = recorded
                if not enabled:
                    log.error(
                        "webhook endpoint %d is %s: failing for longer than the retry window "
                        "(%g s), disabled; last error: %s",
                        endpoint.id,
                        state,
                        settings.webhooks_retry_window,
                        answer.error,
                    )
                    return
                await asyncio.sleep(delay)

    async def _send(
        self,
        sender: delivery.Sender,
        endpoint: Endpoint,
        secrets: repository.Secrets,
        event: repository.Pending,
    ) -> delivery.Answer:
        settings = self._settings
        body = event.body.encode()
        message_id = f"evt_{event.event_id}"
        timestamp = int(time.time())
        live = [secrets.current] + ([secrets.previous] if secrets.previous else [])
        headers = {
            "Content-Type": "application/json",
            "User-Agent": "tandem-webhooks",
            "webhook-id": message_id,
            "webhook-timestamp": str(timestamp),
            "webhook-signature": delivery.signature_header(live, message_id, timestamp, body),
        }
        try:
            target = delivery.parse_url(endpoint.url)
        except delivery.TargetRefusedError as error:
            return delivery.Answer(0, 0, str(error)[: delivery.ERROR_CAP])
        return await sender.post(target, headers, body, settings.webhooks_timeout)


async def _sleep_until(moment: float) -> None:
    """Sleeps until ``moment`` (seconds since the epoch, the database's clock as read)."""
    await asyncio.sleep(max(0.0, moment - time.time()))
