"""The loop every instance runs: claim due tasks (fair share), run them, renew their leases,
finish them with their fence, sweep expired leases, and drain on shutdown.

Written here rather than taken from APScheduler, procrastinate or similar: none of them gives
fencing tokens on every write, fair-share claiming across instances, database-clock-only
timing and lost-run recovery within one lease (see ../shared/design/scheduler.md).

Every statement is short and stands alone (one claim, one heartbeat, one completion): no
transaction is held while a task body runs, and none waits on this process between
statements. The promises under faults, and the arithmetic behind them
(Settings.check_scheduler_timings):
- a crash is noticed by the database: this instance's session lock lives on its direct
  heartbeat connection, and when the process dies the sweep of any other instance records its
  runs lost within a poll;
- a run never outlives its lease: each has a timer of its own, re-armed by every successful
  renewal, that cancels it a margin before the lease can expire, whatever the heartbeat or
  any database call is doing (self-fencing);
- losing the heartbeat session (closed, broken, or not holding the lock) cancels every run at
  once: other instances may already be sweeping them.

The claim of a regular slot leaves the next slot to the claimer (a cron expression is
evaluated here, not in SQL): it plans it from the claim's database time with the task's
missed-slot policy (schedules.plan) and writes it, fenced, before the run starts. A timeout
is one more timer per run; a failed or timed-out attempt is retried through the same claim,
so a retry is as exclusive, fenced and fairly spread as any run.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import socket
import time
from collections.abc import MutableMapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from tandem.core.database import Database
from tandem.core.errors import DatabaseFailureError
from tandem.core.hotpool import HotPool, PoolClosedError
from tandem.core.settings import Settings
from tandem.observability.metrics import (
    SCHEDULER_CLAIMS,
    SCHEDULER_FENCED_OUT,
    SCHEDULER_LIVE_INSTANCES,
    SCHEDULER_LOST_LEASES,
    SCHEDULER_RECOVERIES,
    SCHEDULER_RUN_DURATION,
    SCHEDULER_RUNNING,
    SCHEDULER_RUNS,
    SCHEDULER_START_LAG,
    SCHEDULER_TASK_INTERVAL,
    SCHEDULER_TASK_LAST_SUCCESS,
    SCHEDULER_TASK_PAUSED_SINCE,
)
from tandem.scheduler import repository
from tandem.scheduler.registry import Registry, TaskCancelledError, TaskContext, TaskDefinition
from tandem.scheduler.schedules import Cron, Plan, plan, retry_delay

log = logging.getLogger(__name__)

_DB_ERRORS = (
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    DatabaseFailureError,
)
# Instances silent this long are deleted from the membership table.
_FORGET_AFTER = 3600.0
_FORGET_EVERY = 60.0
# The cluster-wide task gauges (interval, last success) are read every this many heartbeats
# (10 s at the default timings: alerts look at hours, not seconds).
_TASK_GAUGES_EVERY = 5


@dataclass
class _Run:
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


@dataclass
class _Session:
    """This instance's database session: the direct connection holding its lock, and the
    last database clock reading with the local time it was received (the anchor that dates
    renewals on the database's clock)."""

    conn: asyncpg.Connection
    key: int
    anchor_db: datetime
    anchor_local: float


class Runner:
    def __init__(
        self,
        settings: Settings,
        registry: Registry,
        database: Database,
        instance_id: str,
    ) -> None:
        self.settings = settings
        self.registry = registry
        self._database = database
        self.instance_id = instance_id
        self.hostname = socket.gethostname()
        self._pool: HotPool | None = None
        self._session: _Session | None = None
        self._runs: dict[int, _Run] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._last_forget = 0.0
        self._heartbeats = 0
        self._gauge_tasks: set[str] = set()
        self._paused_tasks: set[str] = set()
        # Intervals, timeouts and backoffs in this process's (possibly compressed) time.
        self._definitions = {
            d.name: d.scaled(settings.scheduler_time_scale) for d in registry.all()
        }
        self._known = list(self._definitions)
        self._watched = [d.name for d in self._definitions.values() if d.watched]

    @property
    def running(self) -> dict[int, str]:
        """Task id -> name of the runs in progress here."""
        return {task_id: run.claim.name for task_id, run in self._runs.items()}

    async def start(self) -> None:
        """Start in the background: joining waits (retrying) until the database answers and
        the schema exists, so an instance can come up before its migrations have run."""
        self._loops = [asyncio.create_task(self._main(), name="scheduler")]

    async def _main(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._join()
                break
            # RuntimeError: a session connection that cannot hold its lock (a pooler).
            except (*_DB_ERRORS, TimeoutError, RuntimeError) as error:
                log.warning("scheduler cannot join yet (%r); retry in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        # Instances started together (a deploy, `tandem cluster`) all join before the first
        # claim, so the first to come up does not take every task due at start.
        await asyncio.sleep(self.settings.scheduler_heartbeat_interval)
        await asyncio.gather(self._poll_loop(), self._heartbeat_loop())

    async def _join(self) -> None:
        if self._pool is None:
            self._pool = await self._database.open_pool(
                "tandem-scheduler", self.settings.scheduler_pool_size
            )
        async with self._pool.acquire() as db:
            await repository.register_instance(db, self.instance_id, self.hostname, os.getpid())
            now = await repository.database_now(db)
            for definition in self._definitions.values():
                await repository.upsert_task(db, task_row(definition, now))
        await self._open_session()
        log.info("scheduler started as instance %s on %s", self.instance_id, self.hostname)

    async def stop(self) -> None:
        """Drain: stop claiming, cancel local runs, release them so another instance takes
        them within a poll, and leave the membership list."""
        self._stopping.set()
        runs = list(self._runs.values())
        for run in runs:
            self._stop_run(run, "drained")
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        tasks = [run.task for run in runs if run.task is not None]
        deadline = time.monotonic() + self.settings.scheduler_drain_timeout
        if tasks:
            await asyncio.wait(tasks, timeout=self.settings.scheduler_drain_timeout)
        if self._pool is not None:
            # Leaving the membership list is a courtesy (the heartbeat window expires anyway):
            # with the database unreachable it must not hold the shutdown for the pool's
            # acquire timeout (60 s, past a container's stop grace). TimeoutError is an OSError.
            with contextlib.suppress(*_DB_ERRORS):
                async with asyncio.timeout(max(deadline - time.monotonic(), 1.0)):
                    async with self._pool.acquire() as db:
                        await repository.stop_instance(db, self.instance_id)
            await self._pool.close(self.settings.db_close_timeout)
        # Last: the session vouches for this instance's runs until they are released.
        await self._close_session()
        SCHEDULER_RUNNING.set(0)
        log.info("scheduler of instance %s stopped", self.instance_id)

    # --- claiming ----------------------------------------------------------------------

    async def _poll_loop(self) -> None:
        settings = self.settings
        while not self._stopping.is_set():
            try:
                await self.poll_once()
            except _DB_ERRORS as error:
                log.warning("scheduler poll failed: %r", error)
            except Exception:
                # A bug must not end the loop while the other one goes on.
                log.exception("scheduler poll failed")
            jitter = random.uniform(0.8, 1.2)
            await asyncio.sleep(settings.scheduler_poll_interval * jitter)

    async def poll_once(self) -> None:
        """One poll: sweep expired leases, then claim due tasks while the fair share allows."""
        if self._pool is None:
            return
        settings = self.settings
        async with self._pool.acquire() as db:
            lost = await repository.sweep_expired(db)
        if lost:
            SCHEDULER_LOST_LEASES.inc(lost)
            log.warning("recorded %d lost run(s) whose lease expired", lost)
        for _ in range(settings.scheduler_claims_per_poll):
            session = self._session
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
                        live_window=repository.live_window(settings.scheduler_lease),
                        steal_after=settings.scheduler_steal_after,
                        # Fresh enough to be given a steal: two heartbeats.
                        fresh_window=2 * settings.scheduler_heartbeat_interval,
                        lock_timeout=settings.scheduler_claim_lock_timeout,
                        known=self._known,
                    ),
                )
            if claim is None:
                break
            definition = self._definitions.get(claim.name)
            planned = plan_claim(claim, definition)
            if planned is not None and planned.run_slot is None:
                await self._skip(claim, planned)
                continue
            slot = claim.scheduled_for
            if planned is not None:
                slot = planned.run_slot or slot
                with contextlib.suppress(*_DB_ERRORS):
                    # Lost, the completion writes the next slot instead.
                    async with self._pool.acquire() as db:
                        await repository.plan_run(
                            db, claim.task_id, claim.fence, planned.next_slot, slot
                        )
            self._start_run(claim, sent, definition, slot, planned)
            if self._session is not session:
                # The session was lost while the claim was on its way back: other instances
                # may be sweeping this run already.
                self._stop_run(self._runs[claim.task_id], "session_lost")

    async def _skip(self, claim: repository.ClaimedRun, planned: Plan) -> None:
        """Policy skip, every due slot missed: the claim is recorded as one skipped run."""
        assert self._pool is not None
        SCHEDULER_RUNS.labels(claim.name, "skipped").inc()
        with contextlib.suppress(*_DB_ERRORS):
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

    def _start_run(
        self,
        claim: repository.ClaimedRun,
        sent: float,
        definition: TaskDefinition | None,
        slot: datetime,
        planned: Plan | None,
    ) -> None:
        logger = _TaskLog(
            logging.getLogger(f"tandem.task.{claim.name}"),
            {"instance": self.instance_id, "run": f"{claim.name}#{claim.fence}"},
        )
        ctx = TaskContext(
            name=claim.name,
            instance_id=self.instance_id,
            fence=claim.fence,
            time_scale=self.settings.scheduler_time_scale,
            log=logger,
            attempt=claim.attempt,
        )
        next_slot = planned.next_slot if planned is not None else None
        run = _Run(claim, ctx, definition, slot, next_slot)
        self._runs[claim.task_id] = run
        # The lease began when the database ran the claim, after it was sent.
        self._arm(run, sent)
        if definition is not None and definition.timeout is not None:
            # From the sending of the claim: the run started no earlier.
            run.timeout_timer = asyncio.get_running_loop().call_at(
                sent + definition.timeout.total_seconds(), self._time_out, run
            )
        SCHEDULER_RUNNING.set(len(self._runs))
        SCHEDULER_CLAIMS.labels(claim.name).inc()
        if claim.recovers:
            SCHEDULER_RECOVERIES.labels(claim.name).inc()
        if claim.attempt == 1:  # a retry's lag is its backoff
            lag = (claim.started_at - slot).total_seconds()
            SCHEDULER_START_LAG.labels(claim.name).observe(max(lag, 0.0))
        run.task = asyncio.create_task(self._execute(run), name=ctx.run_id)

    def _time_out(self, run: _Run) -> None:
        if run.stopped_because is None:
            run.ctx.log.warning("timed out: cancelling the run")
            self._stop_run(run, "timed_out")

    async def _execute(self, run: _Run) -> None:
        started = time.monotonic()
        status, error = "succeeded", None
        definition = run.definition
        try:
            if definition is None:
                raise LookupError(f"no code registered for task {run.claim.name!r}")
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
        SCHEDULER_RUNS.labels(run.claim.name, status).inc()
        SCHEDULER_RUN_DURATION.labels(run.claim.name).observe(time.monotonic() - started)
        if run.stopped_because == "fenced":
            # Another instance holds the task: our write would be refused by the fence.
            return
        await self._complete(run, status, error, self._retry(run, status))

    @staticmethod
    def _retry(run: _Run, status: str) -> repository.Retry | None:
        """The next attempt at the run's slot, if it gets one: at once when this instance
        gave the run up (drained, or stopped by itself: released at once if the database can
        be reached, the fence refusing it if another instance took the task meanwhile, else
        left to the lease); after a backoff when it failed or timed out with attempts left."""
        attempt, definition = run.claim.attempt, run.definition
        if status == "succeeded":  # a body that finished although it was asked to stop
            return None
        if run.stopped_because in ("drained", "self_fenced", "session_lost"):
            return repository.Retry(timedelta(0), run.slot, attempt)
        if status not in ("failed", "timed_out") or definition is None:
            return None
        if attempt >= definition.max_attempts:
            return None
        delay = retry_delay(attempt, definition.retry_backoff, definition.retry_backoff_max)
        run.ctx.log.info(
            "attempt %d of %d in %.3g s",
            attempt + 1,
            definition.max_attempts,
            delay.total_seconds(),
        )
        return repository.Retry(delay, run.slot, attempt)

    async def _complete(
        self, run: _Run, status: str, error: str | None, retry: repository.Retry | None
    ) -> None:
        assert self._pool is not None
        for attempt in range(3):
            try:
                async with self._pool.acquire() as db:
                    held = await repository.complete_run(
                        db,
                        run.claim.task_id,
                        run.claim.fence,
                        status,
                        error,
                        next_slot=run.next_slot,
                        retry=retry,
                    )
            except PoolClosedError:
                # Shut down before the database answered (the drain time ran out): the lease
                # will expire and the run will be recorded as lost.
                return
            except _DB_ERRORS as exc:
                log.warning("completing %s failed (%r), attempt %d", run.ctx.run_id, exc, attempt)
                await asyncio.sleep(0.5)
                continue
            if not held:
                SCHEDULER_FENCED_OUT.labels("complete_refused").inc()
                run.ctx.log.warning("fenced out: the run was taken over; its result is dropped")
            else:
                run.ctx.log.info("recorded as %s", status)
            return
        # The lease will expire and the sweeper will record the run as lost.

    def _stop_run(self, run: _Run, reason: str) -> None:
        if run.stopped_because is None:
            run.stopped_because = reason
        run.ctx.cancelled.set()
        if run.task is not None:
            run.task.cancel()

    # --- the session and the leases ------------------------------------------------------

    def _arm(self, run: _Run, sent: float) -> None:
        """(Re)start the run's self-fencing timer from ``sent``, the local time a claim or
        renewal that the database applied was sent (it was applied no earlier)."""
        deadline = sent + self.settings.scheduler_self_fence_after
        if deadline <= run.ctx.held_until:
            return
        run.ctx.held_until = deadline
        if run.timer is not None:
            run.timer.cancel()
        run.timer = asyncio.get_running_loop().call_at(deadline, self._self_fence, run)

    def _self_fence(self, run: _Run) -> None:
        if run.stopped_because is None:
            SCHEDULER_FENCED_OUT.labels("self_fenced").inc()
            run.ctx.log.warning("self-fencing: no lease renewal for too long")
            self._stop_run(run, "self_fenced")

    async def _open_session(self) -> None:
        conn = await self._database.connect("tandem-heartbeat", direct=True)
        try:
            session = await repository.open_session(
                conn, self.instance_id, self.settings.scheduler_lease
            )
            if session is None:  # forgotten after a long silence: join again
                await repository.register_instance(
                    conn, self.instance_id, self.hostname, os.getpid()
                )
                session = await repository.open_session(
                    conn, self.instance_id, self.settings.scheduler_lease
                )
            assert session is not None
            if not await repository.holds_session(conn, session.key):
                raise RuntimeError(
                    "the scheduler's session connection does not hold its lock: it must reach "
                    "PostgreSQL directly, not through a transaction pooler (set "
                    "TANDEM_DATABASE_DIRECT_URL)"
                )
        except BaseException:
            conn.terminate()
            raise
        self._session = _Session(conn, session.key, session.db_now, self._now())
        conn.add_termination_listener(self._on_session_closed)

    def _on_session_closed(self, conn: object) -> None:
        if self._session is not None and self._session.conn is conn:
            self._lose_session("the database session closed")

    def _lose_session(self, why: str) -> list[asyncio.Task[None]]:
        """The session lock is gone or going: other instances may sweep this instance's
        runs any moment now, so every run stops first. Returns the runs' tasks."""
        session, self._session = self._session, None
        for run in list(self._runs.values()):
            if run.stopped_because is None:
                SCHEDULER_FENCED_OUT.labels("session_lost").inc()
                run.ctx.log.warning("stopping: %s", why)
                self._stop_run(run, "session_lost")
        if session is not None:
            session.conn.remove_termination_listener(self._on_session_closed)
            log.warning("scheduler session lost (%s): runs stopped, reconnecting", why)
        return [run.task for run in self._runs.values() if run.task is not None]

    async def _drop_session(self, why: str) -> None:
        """Give the session up on purpose: its end frees this instance's runs for others, so
        the runs stop before it is closed (for at most the margin they have anyway)."""
        session = self._session
        tasks = self._lose_session(why)
        if tasks:
            margin = self.settings.scheduler_lease - self.settings.scheduler_self_fence_after
            await asyncio.wait(tasks, timeout=margin)
        if session is not None:
            session.conn.terminate()

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is not None:
            session.conn.remove_termination_listener(self._on_session_closed)
            with contextlib.suppress(*_DB_ERRORS):
                await session.conn.close(timeout=self.settings.db_close_timeout)

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def _heartbeat_loop(self) -> None:
        settings = self.settings
        while not self._stopping.is_set():
            started = self._now()
            try:
                await self.heartbeat_once()
            except _DB_ERRORS as error:
                log.warning("heartbeat failed: %r", error)
                await self._drop_session(f"heartbeat failed: {error!r}")
            except Exception as error:
                log.exception("heartbeat failed")
                await self._drop_session(f"heartbeat failed: {error!r}")
            # A fixed rate, however long the heartbeat took.
            elapsed = self._now() - started
            await asyncio.sleep(max(settings.scheduler_heartbeat_interval - elapsed, 0))

    async def heartbeat_once(self) -> None:
        """Refresh membership and renew the leases of the runs this instance holds; stop the
        runs whose lease another instance has taken over."""
        settings = self.settings
        if self._session is None:
            await self._open_session()
        session = self._session
        assert session is not None
        sent = self._now()
        validity = settings.scheduler_renewal_validity
        # Only runs not given up, and only while the renewal can land before their deadline.
        held = {
            task_id: run.claim.fence
            for task_id, run in self._runs.items()
            if run.stopped_because is None and sent + validity <= run.ctx.held_until
        }
        # Past self_fence_after every run has self-fenced: time to drop the session and
        # start anew (TimeoutError is an OSError: the loop drops it).
        async with asyncio.timeout(settings.scheduler_self_fence_after):
            beat = await repository.heartbeat(
                session.conn,
                self.instance_id,
                session.key,
                settings.scheduler_lease,
                list(held.items()),
                session.anchor_db,
                # The database refuses the heartbeat once its clock passes this: no later
                # than `validity` after sending, since the anchor was read before it was
                # received.
                sent - session.anchor_local + validity,
                settings.scheduler_lease,
            )
        if self._session is session:
            # Every answer is a fresh reading of the database clock (a stale one too: were the
            # anchor kept, a step of that clock could make every later heartbeat stale).
            session.anchor_db, session.anchor_local = beat.db_now, self._now()
        if beat.outcome == "stale":
            log.warning("heartbeat reached the database too late: nothing renewed")
            return
        if beat.outcome != "renewed":
            # "no_session": this connection does not hold the lock it took, as behind a pooler
            # in transaction mode.
            await self._drop_session(f"heartbeat answered {beat.outcome}")
            if beat.outcome == "no_session":
                log.error(
                    "the scheduler's heartbeat connection does not hold its session lock: it "
                    "must reach PostgreSQL directly, not through a transaction pooler (set "
                    "TANDEM_DATABASE_DIRECT_URL)"
                )
            return
        if beat.live is not None:
            SCHEDULER_LIVE_INSTANCES.set(beat.live)
        for task_id, fence in held.items():
            run = self._runs.get(task_id)
            if run is None or run.claim.fence != fence:
                continue
            if task_id in beat.renewed:
                self._arm(run, sent)
            elif run.stopped_because is None:
                SCHEDULER_FENCED_OUT.labels("taken_over").inc()
                run.ctx.log.warning("lease lost to another instance: stopping this run")
                self._stop_run(run, "fenced")
        db = session.conn
        if self._now() - self._last_forget > _FORGET_EVERY:
            # Housekeeping, not safety: once a minute is plenty (it was 1 in 4 idle statements).
            with contextlib.suppress(*_DB_ERRORS):
                await repository.forget_instances(db, _FORGET_AFTER)
            self._last_forget = self._now()
        if self._heartbeats % _TASK_GAUGES_EVERY == 0:
            with contextlib.suppress(*_DB_ERRORS):
                health = await repository.task_health(db, self._known, self._watched)
                self._set_task_gauges(health)
        self._heartbeats += 1

    def _set_task_gauges(self, rows: list[asyncpg.Record]) -> None:
        """Export the interval and last success of every enabled task this instance has code
        for; drop the series of tasks paused since, so an alert never fires on a task nobody
        expects to run, except watched (housekeeping) tasks: they keep theirs, and say since
        when they are paused."""
        names, paused = set(), set()
        for row in rows:
            names.add(row["name"])
            SCHEDULER_TASK_INTERVAL.labels(row["name"]).set(row["interval_seconds"])
            SCHEDULER_TASK_LAST_SUCCESS.labels(row["name"]).set(row["last_success"])
            if row["paused_since"] is not None:
                paused.add(row["name"])
                SCHEDULER_TASK_PAUSED_SINCE.labels(row["name"]).set(row["paused_since"])
        for gone in self._gauge_tasks - names:
            SCHEDULER_TASK_INTERVAL.remove(gone)
            SCHEDULER_TASK_LAST_SUCCESS.remove(gone)
        for resumed in self._paused_tasks - paused:
            SCHEDULER_TASK_PAUSED_SINCE.remove(resumed)
        self._gauge_tasks, self._paused_tasks = names, paused


class _TaskLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every task log line with the task's run id and instance."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"[{extra.get('run')} on {extra.get('instance')}] {msg}", kwargs


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
        # claim would have run after it (a catch-up's), else the plan's next.
        following = decided.run_slot
        if following is None or following <= claim.scheduled_for:
            following = decided.next_slot
        return Plan(claim.scheduled_for, following)
    if decided.note is not None:
        log.warning("task %s: %s", claim.name, decided.note)
    return decided


def task_row(definition: TaskDefinition, now: datetime) -> repository.TaskRow:
    """The row a definition is stored as; ``now``: the database clock, for a cron task's
    first slot."""
    schedule = definition.schedule
    cron = schedule if isinstance(schedule, Cron) else None
    return repository.TaskRow(
        name=definition.name,
        interval=schedule.nominal_interval,
        function_name=definition.function_name,
        schedule=cron.expression if cron else None,
        timezone=cron.timezone if cron else None,
        missed=definition.missed.value,
        timeout=definition.timeout,
        max_attempts=definition.max_attempts,
        first_run=cron.first_after(now) if cron else None,
    )
