"""The runs this instance holds: each one's task body, its timers, its end, and the fenced
write that records that end.

- A run never outlives its lease: each has a self-fencing timer, re-armed by every renewal
  the database applied, that cancels it a margin before the lease can expire, whatever the
  heartbeat or any database call is doing.
- A timeout is one more timer per run; a failed or timed-out attempt is retried through the
  same claim as any run (schedules.retry_after decides when), so a retry is as exclusive,
  fenced and fairly spread as the first attempt.
- Once the drain has begun no run starts here: ``start`` refuses, and a claim that comes back
  after that moment is handed back at once (``release``), as the same slot's next attempt.

Every write is one short statement of its own: no transaction is held while a body runs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from tandem.core.errors import DatabaseFailureError
from tandem.core.pool import ConnectionPool, PoolClosedError
from tandem.core.settings import Settings
from tandem.observability.metrics import (
    SCHEDULER_CLAIMS,
    SCHEDULER_FENCED_OUT,
    SCHEDULER_RECOVERIES,
    SCHEDULER_RUN_DURATION,
    SCHEDULER_RUNNING,
    SCHEDULER_RUNS,
    SCHEDULER_START_LAG,
)
from tandem.scheduler import repository
from tandem.scheduler.registry import TaskCancelledError, TaskContext, TaskDefinition
from tandem.scheduler.schedules import retry_after

log = logging.getLogger(__name__)

# What a database call of the scheduler's loops can raise when the database is away or
# refuses: logged and survived, never the end of a loop.
DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    DatabaseFailureError,
)

# The error recorded for a claim that came back after the drain began: its body never ran.
RELEASED_UNSTARTED = "cancelled: drained before its start"
# Why a run stopped for the next of its schedule (overlap cancel_other): not retried.
REPLACED = "replaced by a new run (overlap cancel_other)"


@dataclass
class Run:
    claim: repository.ClaimedRun
    ctx: TaskContext
    definition: TaskDefinition | None
    # The slot this run stands for, and the next one as planned (None: the task's row has it).
    slot: datetime
    next_slot: datetime | None
    task: asyncio.Task[None] | None = None
    # Why this instance stopped the run, if it did: "fenced" (taken over), "self_fenced" (its
    # timer), "session_lost" (the heartbeat session ended), "drained" (shutdown) or
    # "timed_out" (the task's timeout).
    stopped_because: str | None = None
    # The self-fencing timer (loop.time() deadline in ctx.held_until).
    timer: asyncio.TimerHandle | None = None
    timeout_timer: asyncio.TimerHandle | None = None
    # Its task has begun (_execute entered). A task cancelled before its first step never
    # runs its coroutine at all: no completion, and the run would stay running in the
    # database. So a run stopped before then is not cancelled; _execute sees it stopped.
    entered: bool = False


class LocalRuns:
    """The runs in progress in this process, by task id."""

    def __init__(self, settings: Settings, instance_id: str, pool: ConnectionPool) -> None:
        self.settings = settings
        self.instance_id = instance_id
        self._pool = pool
        self._runs: dict[int, Run] = {}
        self._draining = False
        # Set to make the claim loop poll now instead of at its next tick: by a wake-up from
        # the database (NOTIFY tandem_schedules, session.py), and by the end of a run whose
        # schedule may have one waiting (overlap buffer_one or cancel_other).
        self.wake = asyncio.Event()

    @property
    def running(self) -> dict[int, str]:
        """Task id -> name of the runs in progress here."""
        return {task_id: run.claim.name for task_id, run in self._runs.items()}

    @property
    def draining(self) -> bool:
        return self._draining

    def tasks(self) -> list[asyncio.Task[None]]:
        return [run.task for run in self._runs.values() if run.task is not None]

    # --- start and drain -----------------------------------------------------------------

    def start(
        self,
        claim: repository.ClaimedRun,
        sent: float,
        definition: TaskDefinition | None,
        slot: datetime,
        next_slot: datetime | None,
    ) -> Run | None:
        """Start the claimed run (``sent``: the local time the claim was sent), or None once
        the drain has begun: the caller then releases the claim. Synchronous, so no drain can
        begin between the check and the start."""
        if self._draining:
            return None
        logger = self._task_log(claim)
        ctx = TaskContext(
            name=claim.name,
            instance_id=self.instance_id,
            fence=claim.fence,
            time_scale=self.settings.scheduler_time_scale,
            log=logger,
            attempt=claim.attempt,
            task=claim.task,
            trigger=claim.trigger,
        )
        run = Run(claim, ctx, definition, slot, next_slot)
        self._runs[claim.task_id] = run
        # The lease began when the database ran the claim, after it was sent.
        self.arm(run, sent)
        if definition is not None and definition.timeout is not None:
            # From the sending of the claim: the run started no earlier.
            run.timeout_timer = asyncio.get_running_loop().call_at(
                sent + definition.timeout.total_seconds(), self._time_out, run
            )
        SCHEDULER_RUNNING.set(len(self._runs))
        SCHEDULER_CLAIMS.labels(claim.task).inc()
        if claim.recovers:
            SCHEDULER_RECOVERIES.labels(claim.task).inc()
        if claim.attempt == 1:  # a retry's lag is its backoff
            lag = (claim.started_at - slot).total_seconds()
            SCHEDULER_START_LAG.labels(claim.task).observe(max(lag, 0.0))
        run.task = asyncio.create_task(self._execute(run), name=ctx.run_id)
        return run

    def _task_log(self, claim: repository.ClaimedRun) -> TaskLog:
        return TaskLog(
            logging.getLogger(f"tandem.task.{claim.task}"),
            {"instance": self.instance_id, "run": f"{claim.name}#{claim.fence}"},
        )

    def drain(self) -> None:
        """From now on no run starts here; every run in progress is stopped (and released by
        its own completion, so another instance takes it within a poll)."""
        self._draining = True
        for run in list(self._runs.values()):
            self.stop(run, "drained")

    async def release(
        self, claim: repository.ClaimedRun, slot: datetime, next_slot: datetime | None
    ) -> None:
        """Hand back a claim that came back after the drain began, never started: recorded
        cancelled with its fence, and its slot retried at once as the next attempt, as a
        drained run's is."""
        SCHEDULER_CLAIMS.labels(claim.task).inc()
        SCHEDULER_RUNS.labels(claim.task, "cancelled").inc()
        logger = self._task_log(claim)
        logger.info("claimed as the drain began: released unstarted")
        retry = next_attempt(None, "cancelled", "drained", claim.attempt, slot, logger)
        if retry is not None:
            retry = retry._replace(params=claim.params)
        await self._complete(claim, logger, "cancelled", RELEASED_UNSTARTED, next_slot, retry)

    # --- stopping a run ------------------------------------------------------------------

    def stop(self, run: Run, reason: str) -> None:
        if run.stopped_because is None:
            run.stopped_because = reason
        run.ctx.cancelled.set()
        if run.task is not None and run.entered:
            run.task.cancel()

    def stop_all(self, reason: str, why: str) -> list[asyncio.Task[None]]:
        """Stop every run not stopped yet (``why`` for its log); returns every run's task."""
        for run in list(self._runs.values()):
            if run.stopped_because is None:
                SCHEDULER_FENCED_OUT.labels(reason).inc()
                run.ctx.log.warning("stopping: %s", why)
                self.stop(run, reason)
        return self.tasks()

    def replaceable(self) -> dict[int, int]:
        """Task id -> fence of the runs here whose schedule's overlap is cancel_other: a due
        slot or a run asked for replaces them (claims.Claimer asks the database which)."""
        return {
            task_id: run.claim.fence
            for task_id, run in self._runs.items()
            if run.claim.overlap == "cancel_other" and run.stopped_because is None
        }

    def replace(self, task_ids: list[int]) -> None:
        """Stop these runs: a new run of their schedule is due (overlap cancel_other). Each
        completes as cancelled, not retried, and the new one is claimed once it has."""
        for task_id in task_ids:
            run = self._runs.get(task_id)
            if run is not None and run.stopped_because is None:
                run.ctx.log.info("a new run is due: cancelling this one (overlap cancel_other)")
                self.stop(run, REPLACED)

    def _time_out(self, run: Run) -> None:
        if run.stopped_because is None:
            run.ctx.log.warning("timed out: cancelling the run")
            self.stop(run, "timed_out")

    # --- leases ----------------------------------------------------------------------------

    def renewable(self, sent: float, validity: float) -> dict[int, int]:
        """Task id -> fence of the runs to renew in a heartbeat sent at ``sent``: only runs
        not given up, and only while the renewal can land before their deadline."""
        return {
            task_id: run.claim.fence
            for task_id, run in self._runs.items()
            if run.stopped_because is None and sent + validity <= run.ctx.held_until
        }

    def renewed(self, held: dict[int, int], renewed: set[int], sent: float) -> None:
        """Apply a heartbeat's answer: the renewed runs' timers move on from ``sent``; a run
        held but not renewed was taken over by another instance and stops."""
        for task_id, fence in held.items():
            run = self._runs.get(task_id)
            if run is None or run.claim.fence != fence:
                continue
            if task_id in renewed:
                self.arm(run, sent)
            elif run.stopped_because is None:
                SCHEDULER_FENCED_OUT.labels("taken_over").inc()
                run.ctx.log.warning("lease lost to another instance: stopping this run")
                self.stop(run, "fenced")

    def arm(self, run: Run, sent: float) -> None:
        """(Re)start the run's self-fencing timer from ``sent``, the local time a claim or
        renewal that the database applied was sent (it was applied no earlier)."""
        deadline = sent + self.settings.scheduler_self_fence_after
        if deadline <= run.ctx.held_until:
            return
        run.ctx.held_until = deadline
        if run.timer is not None:
            run.timer.cancel()
        run.timer = asyncio.get_running_loop().call_at(deadline, self._self_fence, run)

    def _self_fence(self, run: Run) -> None:
        if run.stopped_because is None:
            SCHEDULER_FENCED_OUT.labels("self_fenced").inc()
            run.ctx.log.warning("self-fencing: no lease renewal for too long")
            self.stop(run, "self_fenced")

    # --- the body and its end ------------------------------------------------------------

    async def _execute(self, run: Run) -> None:
        run.entered = True
        started = time.monotonic()
        status, error = "succeeded", None
        definition = run.definition
        try:
            if run.stopped_because is not None:
                # Stopped before this task began (see Run.entered): completed as cancelled,
                # and released like any run given up.
                raise asyncio.CancelledError
            if definition is None:
                raise LookupError(f"no code registered for task {run.claim.task!r}")
            # Validated again here: the params were valid for the code that stored them.
            run.ctx.params = definition.parse_params(run.claim.params or {})
            await definition.function(run.ctx)
        except (TaskCancelledError, asyncio.CancelledError):
            if run.stopped_because == "timed_out" and definition and definition.timeout:
                timeout = definition.timeout.total_seconds()
                status, error = "timed_out", f"timed out after {timeout:g} s"
            else:
                status, error = "cancelled", f"cancelled: {run.stopped_because or 'shutdown'}"
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            run.ctx.log.exception("failed")
        finally:
            for timer in (run.timer, run.timeout_timer):
                if timer is not None:
                    timer.cancel()
            if self._runs.get(run.claim.task_id) is run:
                del self._runs[run.claim.task_id]
            SCHEDULER_RUNNING.set(len(self._runs))
        SCHEDULER_RUNS.labels(run.claim.task, status).inc()
        SCHEDULER_RUN_DURATION.labels(run.claim.task).observe(time.monotonic() - started)
        if run.stopped_because == "fenced":
            # Another instance holds the task: our write would be refused by the fence.
            return
        retry = next_attempt(
            run.definition, status, run.stopped_because, run.claim.attempt, run.slot, run.ctx.log
        )
        if retry is not None:
            retry = retry._replace(params=run.claim.params)
        await self._complete(run.claim, run.ctx.log, status, error, run.next_slot, retry)
        if run.claim.overlap != "skip":
            # A run asked for while this one went (or the slot that replaced it) is due now.
            self.wake.set()

    async def _complete(
        self,
        claim: repository.ClaimedRun,
        logger: logging.LoggerAdapter[logging.Logger],
        status: str,
        error: str | None,
        next_slot: datetime | None,
        retry: repository.Retry | None,
    ) -> None:
        for attempt in range(3):
            try:
                async with self._pool.acquire() as db:
                    held = await repository.complete_run(
                        db,
                        claim.task_id,
                        claim.fence,
                        status,
                        error,
                        next_slot=next_slot,
                        retry=retry,
                    )
            except PoolClosedError:
                # Shut down before the database answered (the drain time ran out): the lease
                # will expire and the run will be recorded as lost.
                return
            except DB_ERRORS as exc:
                logger.warning("completing failed (%r), attempt %d", exc, attempt)
                await asyncio.sleep(0.5)
                continue
            if not held:
                SCHEDULER_FENCED_OUT.labels("complete_refused").inc()
                logger.warning("fenced out: the run was taken over; its result is dropped")
            else:
                logger.info("recorded as %s", status)
            return
        # The lease will expire and the sweeper will record the run as lost.


def next_attempt(
    definition: TaskDefinition | None,
    status: str,
    stopped_because: str | None,
    attempt: int,
    slot: datetime,
    logger: logging.LoggerAdapter[logging.Logger],
) -> repository.Retry | None:
    """The retry of ``slot`` that the end of ``attempt`` gets, if any (schedules.retry_after;
    a task without code here has no retries of its own, but a run given up is still handed
    back): at once when this instance gave the run up, released if the database can be
    reached (the fence refusing it if another instance took the task meanwhile, else left to
    the lease)."""
    max_attempts, backoff, cap = 1, timedelta(0), timedelta(0)
    if definition is not None:
        max_attempts = definition.max_attempts
        backoff, cap = definition.retry_backoff, definition.retry_backoff_max
    delay = retry_after(
        status,
        stopped_because,
        attempt,
        max_attempts=max_attempts,
        backoff=backoff,
        backoff_max=cap,
    )
    if delay is None:
        return None
    if delay > timedelta(0):
        logger.info("attempt %d of %d in %.3g s", attempt + 1, max_attempts, delay.total_seconds())
    return repository.Retry(delay, slot, attempt)


class TaskLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every task log line with the task's run id and instance."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"[{extra.get('run')} on {extra.get('instance')}] {msg}", kwargs
