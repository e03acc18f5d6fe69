"""Claiming: each poll sweeps the runs whose owner is gone, then claims due runs in batches
while fair share allows, plans each claimed slot (schedules.plan, from the claim's database
time) and hands the run to LocalRuns.

A run goes by the spec, params and policies read from the row its claim locked
(``effective_definition``), never by a copy this instance kept: a change through the API, or a
deploy, is live at the next claim on every instance. Only the task's code comes from here.

The claim of a regular slot leaves the next slot to the claimer (a cron expression is
evaluated here, not in SQL): it plans it with the task's missed-slot policy and writes it,
fenced, before the run starts. A claim is one statement: once sent, it may stand whether or
not its answer arrives, so the claim loop is never cancelled while one is on its way; when
the drain begins, the loop ends after the statement in flight, and a claim that comes back
then is released at once instead of started.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import random
from collections.abc import Mapping
from dataclasses import replace
from datetime import timedelta

from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tandem.observability.metrics import SCHEDULER_LOST_LEASES, SCHEDULER_RUNS
from tandem.scheduler import repository
from tandem.scheduler.registry import TaskDefinition
from tandem.scheduler.runs import DB_ERRORS, LocalRuns
from tandem.scheduler.schedules import MissedSlots, Plan, Schedule, default_grace, plan, schedule_of
from tandem.scheduler.session import HeartbeatSession, Session

log = logging.getLogger(__name__)


@functools.lru_cache(maxsize=4096)
def _schedule(interval: timedelta, expression: str | None, timezone: str | None) -> Schedule:
    # A cron expression is parsed and checked once per process, not per claim.
    return schedule_of(interval, expression, timezone)


def effective_definition(
    claim: repository.ClaimedRun, code: TaskDefinition | None
) -> TaskDefinition | None:
    """The task's code with the spec and policies of the claimed row; None without code."""
    if code is None:
        return None
    schedule = _schedule(claim.interval, claim.schedule, claim.timezone)
    return replace(
        code,
        name=claim.name,
        schedule=schedule,
        missed=MissedSlots(claim.missed),
        grace=default_grace(schedule) if claim.grace is None else claim.grace,
        catch_up_limit=claim.catch_up_limit or 10,
        timeout=claim.timeout,
        max_attempts=claim.max_attempts,
        retry_backoff=claim.retry_backoff or timedelta(seconds=10),
        retry_backoff_max=claim.retry_backoff_max or timedelta(hours=1),
        overlap=claim.overlap,
    )


def plan_claim(claim: repository.ClaimedRun, definition: TaskDefinition | None) -> Plan | None:
    """The next slot (and, for a regular slot, the one this run stands for) when the
    claim left it to this instance; None when the task's row has it already."""
    if not claim.plan_next or definition is None or definition.schedule is None:
        return None
    if claim.overlapped and definition.overlap == "skip" and claim.attempt == 1:
        # The slot came due while the previous run was going: skipped, and the next one is
        # the first after now (buffer_one runs it now; cancel_other stopped that run).
        return Plan(
            None,
            definition.schedule.first_after(claim.started_at, claim.scheduled_for),
            "skipped: the previous run was still going at this slot (overlap skip)",
        )
    decided = plan(
        definition.schedule,
        definition.missed,
        claim.scheduled_for,
        claim.started_at,
        grace=definition.grace,
        catch_up_limit=definition.catch_up_limit,
    )
    if claim.attempt > 1:
        # A retry runs its own slot; only the next one was missing: the first slot this
        # claim would have run after it (a catch-up's), else `plan`'s next.
        following = decided.run_slot
        if following is None or following <= claim.scheduled_for:
            following = decided.next_slot
        return Plan(claim.scheduled_for, following)
    if decided.note is not None:
        log.warning("task %s: %s", claim.name, decided.note)
    return decided


async def _first(*events: asyncio.Event) -> None:
    """Until one of ``events`` is set."""
    waiters = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for waiter in waiters:
            waiter.cancel()


class Claimer:
    """The claim loop of one instance."""

    def __init__(
        self,
        settings: Settings,
        pool: ConnectionPool,
        instance_id: str,
        definitions: Mapping[str, TaskDefinition],
        session: HeartbeatSession,
        runs: LocalRuns,
        stopping: asyncio.Event,
    ) -> None:
        self.settings = settings
        self._pool = pool
        self.instance_id = instance_id
        self._definitions = definitions
        # An instance claims only schedules whose task it has code for, so during a rolling
        # deploy an old instance never claims one only new code knows.
        self._known = list(definitions)
        self._session = session
        self._runs = runs
        self._stopping = stopping

    async def run(self) -> None:
        """Poll until the drain begins; returns (is not cancelled) after the poll in flight,
        so every claim made is either started or released."""
        while not self._stopping.is_set():
            try:
                await self.poll_once()
            except DB_ERRORS as error:
                log.warning("scheduler poll failed: %r", error)
            except Exception:
                # A bug must not end the loop while the heartbeat goes on.
                log.exception("scheduler poll failed")
            pause = self.settings.scheduler_poll_interval * random.uniform(0.8, 1.2)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await _first(self._stopping, self._runs.wake)

    async def poll_once(self) -> None:
        """One poll: sweep expired leases, stop the runs a due one replaces (overlap
        cancel_other), then claim due runs while the fair share allows."""
        settings = self.settings
        # Cleared first: a wake-up arriving during this poll makes the next one at once.
        self._runs.wake.clear()
        async with self._pool.acquire() as db:
            lost = await repository.sweep_expired(db)
            replaceable = self._runs.replaceable()
            if replaceable:
                # Only on an instance running such a run: an idle one pays nothing.
                self._runs.replace(
                    await repository.replaced_runs(db, self.instance_id, replaceable)
                )
        if lost:
            SCHEDULER_LOST_LEASES.inc(lost)
            log.warning("recorded %d lost run(s) whose lease expired", lost)
        claimed = 0
        while claimed < settings.scheduler_claims_per_poll:
            session = self._session.current
            if self._stopping.is_set() or session is None:
                # Without a session the database would not count this instance as live.
                break
            batch = min(
                settings.scheduler_claim_batch, settings.scheduler_claims_per_poll - claimed
            )
            # One statement: if the connection breaks before the answer, the claims may stand
            # without this instance knowing; their leases expire and a sweep records them lost.
            sent = asyncio.get_running_loop().time()
            async with self._pool.acquire() as db:
                claims = await repository.claim_due_runs(
                    db,
                    repository.ClaimParams(
                        self.instance_id,
                        session.key,
                        lease=settings.scheduler_lease,
                        live_window=settings.scheduler_live_window,
                        steal_after=settings.scheduler_steal_after,
                        # Fresh enough to be given a steal: two heartbeats.
                        fresh_window=2 * settings.scheduler_heartbeat_interval,
                        lock_timeout=settings.scheduler_claim_lock_timeout,
                        known=self._known,
                    ),
                    batch,
                )
            for claim in claims:
                await self._take(claim, sent, session)
            claimed += len(claims)
            if len(claims) < batch:
                break

    async def _take(self, claim: repository.ClaimedRun, sent: float, session: Session) -> None:
        """Plan the claimed slot, then start the run, or release it when the drain began
        while the claim was on its way back."""
        definition = effective_definition(claim, self._definitions.get(claim.task))
        planned = plan_claim(claim, definition)
        if planned is not None and planned.run_slot is None:
            await self._skip(claim, planned)
            return
        slot, next_slot = claim.scheduled_for, None
        if planned is not None:
            slot, next_slot = planned.run_slot or slot, planned.next_slot
            with contextlib.suppress(*DB_ERRORS):
                # Lost, the completion writes the next slot instead.
                async with self._pool.acquire() as db:
                    await repository.plan_run(
                        db, claim.task_id, claim.fence, planned.next_slot, slot
                    )
        run = self._runs.start(claim, sent, definition, slot, next_slot)
        if run is None:
            await self._runs.release(claim, slot, next_slot)
        elif self._session.current is not session:
            # The session was lost while the claim was on its way back: other instances
            # may be sweeping this run already.
            self._runs.stop(run, "session_lost")

    async def _skip(self, claim: repository.ClaimedRun, planned: Plan) -> None:
        """Policy skip, every due slot missed: the claim is recorded as one skipped run."""
        SCHEDULER_RUNS.labels(claim.task, "skipped").inc()
        with contextlib.suppress(*DB_ERRORS):
            # Lost, the lease expires and the sweep retries the slot: one late run.
            async with self._pool.acquire() as db:
                await repository.complete_run(
                    db,
                    claim.task_id,
                    claim.fence,
                    "skipped",
                    planned.note,
                    next_slot=planned.next_slot,
                )
