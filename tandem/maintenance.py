"""Housekeeping, run by the cluster cron itself: one instance at a time, with history, in
``GET /tasks`` and on the status page like any task.

- ``tandem.prune_task_history``: deletes finished runs older than TANDEM_HISTORY_RETENTION.
- ``tandem.prune_idempotency_keys``: deletes keys older than TANDEM_IDEMPOTENCY_RETENTION,
  and the browser sessions ended or expired over a day ago (``SESSION_RETENTION``).
- ``tandem.verify_ledger``: checks the ledger's invariants (``tandem ledger verify``: balances,
  the journal's chain, holds) and exports the mismatches it finds as
  ``tandem_ledger_mismatches`` (alert TandemLedgerMismatch); skipped, with a warning, while
  another verification runs (one at a time in the database), each statement within
  TANDEM_LEDGER_VERIFY_TIMEOUT.
- ``tandem.events.relay``: the change stream's delivery worker (tandem/events/relay.py), a
  run that never ends: one instance at a time stamps the events and delivers the webhooks.
- ``tandem.prune_events``: deletes events older than their retention (TANDEM_EVENTS_RETENTION,
  by default the webhooks' retry window plus 7 days) and delivery records as old.
- ``tandem.expire_holds``: every 5 s, releases the holds past their expiry, in batches of
  users (``SKIP LOCKED``: a user busy spending is left to its own spending, which releases its
  overdue holds first, or to the next run), and exports the hold gauges
  (``tandem_wallet_holds``, ``tandem_wallet_holds_overdue_age_seconds``: alert
  TandemHoldsNotExpiring).

Wiring, like main.py: it joins each domain's named pruning statement to the scheduler's
registry, so neither the wallet nor the scheduler imports the other. Each run deletes (or
releases) in batches (one short transaction each: TANDEM_MAINTENANCE_BATCH rows, or the
payers of EXPIRE_HOLDS_BATCH due holds) on a connection of its own, never the requests'
pool, and stops between batches when cancelled; the hold gauges' one read is a pool's
retried read.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg

from tandem.access import repository as access_repository
from tandem.core.database import Database
from tandem.events import repository as events_repository
from tandem.events.relay import RELAY_TASK, Relay
from tandem.events.service import StreamWatch
from tandem.observability.metrics import (
    HOLD_STATES,
    LEDGER_MISMATCHES,
    LEDGER_VERIFIED,
    WALLET_HOLDS,
    WALLET_HOLDS_EXPIRED,
    WALLET_HOLDS_OBSERVED,
    WALLET_HOLDS_OVERDUE_AGE,
)
from tandem.scheduler import repository as scheduler_repository
from tandem.scheduler.registry import Registry, TaskContext
from tandem.scheduler.schedules import retry_delay
from tandem.wallet import repository as wallet_repository

PRUNE_HISTORY_TASK = "tandem.prune_task_history"
PRUNE_KEYS_TASK = "tandem.prune_idempotency_keys"
VERIFY_LEDGER_TASK = "tandem.verify_ledger"
EXPIRE_HOLDS_TASK = "tandem.expire_holds"
PRUNE_EVENTS_TASK = "tandem.prune_events"
# The delivery worker is due every second: a run lost with its instance is claimed again
# within a poll, and while one runs (it never ends) the next slots are skipped.
RELAY_EVERY = 1.0

# Holds are released at most about this long after their expiry while the cron keeps up
# (seconds, times TANDEM_SCHEDULER_TIME_SCALE): the task's interval.
EXPIRE_HOLDS_EVERY = 5.0
# One statement (one short transaction) releases every due hold of the payers of this many
# holds due first; one run makes at most so many statements: a run stays short however much
# has piled up, and the next run goes on where it stopped.
EXPIRE_HOLDS_BATCH = 500
EXPIRE_HOLDS_BATCHES_PER_RUN = 20

# Ended and expired browser sessions are kept this long (seconds), then deleted.
SESSION_RETENTION = 86400.0

PruneBatch = Callable[[asyncpg.Connection, timedelta, int], Awaitable[int]]


async def _prune(
    ctx: TaskContext, database: Database, prune: PruneBatch, older_than: float, what: str
) -> None:
    # Repositories straight from here, no service in between: this module is wiring (the
    # task body is the service), and each statement is one domain's own named SQL.
    settings = database.settings
    conn = await database.connect("tandem-maintenance")
    try:
        total = 0
        while True:
            ctx.check()
            deleted = await prune(conn, timedelta(seconds=older_than), settings.maintenance_batch)
            total += deleted
            if deleted < settings.maintenance_batch:
                break
    finally:
        await conn.close(timeout=settings.db_close_timeout)
    ctx.log.info("deleted %d %s older than %s", total, what, timedelta(seconds=older_than))


async def _expire_holds(ctx: TaskContext, database: Database) -> int:
    """Releases overdue holds, a batch per statement, until a batch comes back short (nothing
    more is due, or what is left belongs to payers busy spending right now) or the run's
    budget of batches is spent; returns how many holds it released."""
    settings = database.settings
    conn = await database.connect("tandem-maintenance")
    try:
        total = 0
        for _ in range(EXPIRE_HOLDS_BATCHES_PER_RUN):
            ctx.check()
            released = await wallet_repository.expire_holds(conn, EXPIRE_HOLDS_BATCH)
            total += released
            WALLET_HOLDS_EXPIRED.inc(released)
            if released < EXPIRE_HOLDS_BATCH:
                break
    finally:
        await conn.close(timeout=settings.db_close_timeout)
    return total


def export_hold_stats(stats: wallet_repository.HoldStats) -> None:
    """The hold gauges from one reading of the database, stamped with the time of reading."""
    for state in HOLD_STATES:
        WALLET_HOLDS.labels(state).set(
            stats.overdue if state == "overdue" else stats.counts.get(state, 0)
        )
    WALLET_HOLDS_OVERDUE_AGE.set(stats.oldest_overdue_seconds)
    WALLET_HOLDS_OBSERVED.set_to_current_time()


def maintenance_registry(database: Database, watch: StreamWatch | None = None) -> Registry:
    """The housekeeping tasks, due every TANDEM_MAINTENANCE_INTERVAL, bound to the app's
    database and its settings (not whatever the environment says), and the change stream's
    delivery worker (``watch``: this process's waiting readers, woken by its stamping)."""
    settings = database.settings

    async def prune_task_history(ctx: TaskContext) -> None:
        history = scheduler_repository.prune_history
        await _prune(ctx, database, history, settings.history_retention, "finished task runs")

    async def prune_idempotency_keys(ctx: TaskContext) -> None:
        keys = wallet_repository.prune_idempotency_keys
        await _prune(ctx, database, keys, settings.idempotency_retention, "idempotency keys")
        sessions = access_repository.prune_sessions
        await _prune(ctx, database, sessions, SESSION_RETENTION, "ended browser sessions")

    async def verify_ledger(ctx: TaskContext) -> None:
        # A full scan: as long as the ledger is big, up to its own deadline (server-side; no
        # client deadline per statement).
        conn = await database.connect("tandem-maintenance", statement_deadline=False)
        try:
            found = await wallet_repository.verify_ledger(conn, settings.ledger_verify_timeout)
        finally:
            await conn.close(timeout=settings.db_close_timeout)
        if found is None:
            # Never two full scans at once: this run adds nothing to the one in progress.
            ctx.log.warning(
                "ledger verification skipped: another one is running (tandem ledger verify, "
                "or this task on an instance that lost it)"
            )
            return
        LEDGER_MISMATCHES.set(found.mismatches)
        LEDGER_VERIFIED.set_to_current_time()
        if found.mismatches:
            ctx.log.error(
                "ledger: %d mismatches over %d users, %d entries and %d holds (tandem ledger "
                "verify lists them)",
                found.mismatches,
                found.users,
                found.entries,
                found.holds_checked,
            )
        else:
            ctx.log.info(
                "ledger verified: %d users, %d entries, %d holds",
                found.users,
                found.entries,
                found.holds_checked,
            )

    async def expire_holds(ctx: TaskContext) -> None:
        # Read before releasing: the age exported is how late this run's releases are, and a
        # run whose releases fail still refreshes it, so the alert sees the backlog grow.
        export_hold_stats(await wallet_repository.hold_stats(database.pool))
        released = await _expire_holds(ctx, database)
        if released:
            ctx.log.info("released %d expired holds", released)

    async def relay(ctx: TaskContext) -> None:
        await Relay(database, watch, ctx.fence, ctx.check, retry_delay).run()

    async def prune_events(ctx: TaskContext) -> None:
        keep = settings.events_keep
        await _prune(ctx, database, events_repository.prune_events, keep, "events")
        deliveries = events_repository.prune_deliveries
        await _prune(ctx, database, deliveries, keep, "webhook delivery records")

    registry = Registry()
    registry.task(RELAY_TASK, timedelta(seconds=RELAY_EVERY), watched=True)(relay)
    every = timedelta(seconds=settings.maintenance_interval)
    registry.task(EXPIRE_HOLDS_TASK, timedelta(seconds=EXPIRE_HOLDS_EVERY), watched=True)(
        expire_holds
    )
    registry.task(VERIFY_LEDGER_TASK, every, watched=True)(verify_ledger)
    registry.task(PRUNE_HISTORY_TASK, every, watched=True)(prune_task_history)
    registry.task(PRUNE_KEYS_TASK, every, watched=True)(prune_idempotency_keys)
    registry.task(PRUNE_EVENTS_TASK, every, watched=True)(prune_events)
    return registry
