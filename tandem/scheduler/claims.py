"""Claiming: each poll sweeps the runs whose owner is gone, then claims due tasks while fair
share allows, plans each claimed slot (schedules.plan, from the claim's database time) and
hands the run to LocalRuns.

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
import logging
import random
from collections.abc import Mapping

from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tandem.observability.metrics import SCHEDULER_LOST_LEASES, SCHEDULER_RUNS
from tandem.scheduler import repository
from tandem.scheduler.registry import TaskDefinition
from tandem.scheduler.runs import DB_ERRORS, LocalRuns
from tandem.scheduler.schedules import Plan, plan
from tandem.scheduler.session import HeartbeatSession, Session

log = logging.getLogger(__name__)


def plan_claim(claim: repository.ClaimedRun, definition: TaskDefinition | None) -> Plan | None:
    """The next slot (and, for a regular slot, the one this run stands for) when the
    claim left it to this instance; None when the task's row has it already."""
    if not claim.plan_next or definition is None:
        return None
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
        # An instance claims only tasks it has code for, so during a rolling deploy an old
        # instance never claims a task only new code knows.
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
                    await self._stopping.wait()

    async def poll_once(self) -> None:
        """One poll: sweep expired leases, then claim due tasks while the fair share allows."""
        settings = self.settings
        async with self._pool.acquire() as db:
            lost = await repository.sweep_expired(db)
        if lost:
            SCHEDULER_LOST_LEASES.inc(lost)
            log.warning("recorded %d lost run(s) whose lease expired", lost)
        for _ in range(settings.scheduler_claims_per_poll):
            session = self._session.current
            if self._stopping.is_set() or session is None:
                # Without a session the database would not count this instance as live.
                break
            # One statement: if the connection breaks before the answer, the claim may stand
            # without this instance knowing; its lease expires and a sweep records it lost.
            sent = asyncio.get_running_loop().time()
            async with self._pool.acquire() as db:
                claim = await repository.claim_due_task(
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
                )
            if claim is None:
                break
            await self._take(claim, sent, session)

    async def _take(self, claim: repository.ClaimedRun, sent: float, session: Session) -> None:
        """Plan the claimed slot, then start the run, or release it when the drain began
        while the claim was on its way back."""
        definition = self._definitions.get(claim.name)
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
        SCHEDULER_RUNS.labels(claim.name, "skipped").inc()
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
