"""The loop every instance runs: claim due tasks (fair share), run them, renew their leases,
finish them with their fence, sweep expired leases, and drain on shutdown.

Written here rather than taken from APScheduler, procrastinate or similar: none of them gives
fencing tokens on every write, fair-share claiming across instances, database-clock-only
timing and lost-run recovery within one lease (see ../shared/design/scheduler.md).

Transactions are short (one claim, one renewal, one completion); none is held while a task
body runs.
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
)
from tandem.scheduler import repository
from tandem.scheduler.registry import Registry, TaskCancelledError, TaskContext, TaskDefinition

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
    task: asyncio.Task[None] | None = None
    # Why this instance stopped the run, if it did: "fenced", "self_fenced" or "drained".
    stopped_because: str | None = None


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
        self._heartbeat_conn: asyncpg.Connection | None = None
        self._runs: dict[int, _Run] = {}
        self._loops: list[asyncio.Task[None]] = []
        self._stopping = asyncio.Event()
        self._last_renewal = time.monotonic()
        self._last_forget = 0.0
        self._heartbeats = 0
        self._gauge_tasks: set[str] = set()
        self._known = [definition.name for definition in registry.all()]

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
            except (*_DB_ERRORS, TimeoutError) as error:
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
            for definition in self.registry.all():
                interval = definition.interval * self.settings.scheduler_time_scale
                await repository.upsert_task(
                    db, definition.name, interval, definition.function_name
                )
        self._last_renewal = time.monotonic()
        log.info("scheduler started as instance %s on %s", self.instance_id, self.hostname)

    async def stop(self) -> None:
        """Drain: stop claiming, cancel local runs, release them so another instance takes
        them within a poll, and leave the membership list."""
        self._stopping.set()
        for loop in self._loops:
            loop.cancel()
        await asyncio.gather(*self._loops, return_exceptions=True)
        runs = list(self._runs.values())
        for run in runs:
            self._stop_run(run, "drained")
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
        if self._heartbeat_conn is not None:
            with contextlib.suppress(*_DB_ERRORS):
                await self._heartbeat_conn.close(timeout=self.settings.db_close_timeout)
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
            if self._stopping.is_set():
                break
            # One claim, one transaction (the pool owns it): if the connection breaks at
            # COMMIT, the claim may stand without this instance knowing; its lease expires
            # and the sweeper records the run as lost.
            async with self._pool.transaction() as db:
                claim = await repository.claim_due_task(
                    db,
                    self.instance_id,
                    settings.scheduler_lease,
                    # Fair share counts instances seen within a lease. (A shorter window
                    # frees the others sooner when one dies, but a heartbeat late under load
                    # then drops a live instance from the count: spread got worse, 1.26-1.36.)
                    settings.scheduler_lease,
                    settings.scheduler_steal_after,
                    known=self._known,
                )
            if claim is None:
                break
            self._start_run(claim)

    def _start_run(self, claim: repository.ClaimedRun) -> None:
        definition = self.registry.get(claim.name)
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
        )
        run = _Run(claim, ctx)
        self._runs[claim.task_id] = run
        SCHEDULER_RUNNING.set(len(self._runs))
        SCHEDULER_CLAIMS.labels(claim.name).inc()
        if claim.recovers:
            SCHEDULER_RECOVERIES.labels(claim.name).inc()
        lag = (claim.started_at - claim.scheduled_for).total_seconds()
        SCHEDULER_START_LAG.labels(claim.name).observe(max(lag, 0.0))
        run.task = asyncio.create_task(self._execute(run, definition), name=ctx.run_id)

    async def _execute(self, run: _Run, definition: TaskDefinition | None) -> None:
        started = time.monotonic()
        status, error = "succeeded", None
        try:
            if definition is None:
                raise LookupError(f"no code registered for task {run.claim.name!r}")
            await definition.function(run.ctx)
        except (TaskCancelledError, asyncio.CancelledError):
            status, error = "cancelled", f"cancelled: {run.stopped_because or 'shutdown'}"
        except Exception as exc:
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            run.ctx.log.exception("failed")
        finally:
            self._runs.pop(run.claim.task_id, None)
            SCHEDULER_RUNNING.set(len(self._runs))
        SCHEDULER_RUNS.labels(run.claim.name, status).inc()
        SCHEDULER_RUN_DURATION.labels(run.claim.name).observe(time.monotonic() - started)
        if run.stopped_because in ("fenced", "self_fenced"):
            # Another instance holds (or will hold) the task: our write would be refused by
            # the fence anyway; do not even try.
            return
        await self._complete(run, status, error, due_again=run.stopped_because == "drained")

    async def _complete(
        self, run: _Run, status: str, error: str | None, *, due_again: bool
    ) -> None:
        assert self._pool is not None
        for attempt in range(3):
            try:
                async with self._pool.acquire() as db:
                    held = await repository.complete_run(
                        db, run.claim.task_id, run.claim.fence, status, error, due_again=due_again
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

    # --- leases ------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        settings = self.settings
        while not self._stopping.is_set():
            try:
                await self.heartbeat_once()
            except _DB_ERRORS as error:
                log.warning("heartbeat failed: %r", error)
                if self._heartbeat_conn is not None:
                    self._heartbeat_conn.terminate()
                    self._heartbeat_conn = None
            if time.monotonic() - self._last_renewal > settings.scheduler_self_fence_after:
                # Cut off from the database for most of a lease: another instance may take
                # our tasks any moment now, so stop them first (self-fencing).
                for run in list(self._runs.values()):
                    if run.stopped_because is None:
                        SCHEDULER_FENCED_OUT.labels("self_fenced").inc()
                        run.ctx.log.warning("self-fencing: no lease renewal for too long")
                        self._stop_run(run, "self_fenced")
            await asyncio.sleep(settings.scheduler_heartbeat_interval)

    async def heartbeat_once(self) -> None:
        """Refresh membership and renew the leases of the runs this instance holds; stop the
        runs whose lease another instance has taken over."""
        if self._heartbeat_conn is None or self._heartbeat_conn.is_closed():
            self._heartbeat_conn = await self._database.connect("tandem-heartbeat")
        db = self._heartbeat_conn
        held = {run.claim.task_id: run.claim.fence for run in self._runs.values()}
        async with asyncio.timeout(max(self.settings.scheduler_heartbeat_interval, 1.0)):
            await repository.heartbeat_instance(db, self.instance_id, "active")
            renewed = await repository.renew_leases(
                db, self.instance_id, self.settings.scheduler_lease, list(held.items())
            )
            live = await repository.count_live_instances(db, self.settings.scheduler_lease)
        self._last_renewal = time.monotonic()
        SCHEDULER_LIVE_INSTANCES.set(live)
        for task_id, fence in held.items():
            run = self._runs.get(task_id)
            if task_id not in renewed and run is not None and run.claim.fence == fence:
                SCHEDULER_FENCED_OUT.labels("taken_over").inc()
                run.ctx.log.warning("lease lost to another instance: stopping this run")
                self._stop_run(run, "fenced")
        if time.monotonic() - self._last_forget > _FORGET_EVERY:
            # Housekeeping, not safety: once a minute is plenty (it was 1 in 4 idle statements).
            with contextlib.suppress(*_DB_ERRORS):
                await repository.forget_instances(db, _FORGET_AFTER)
            self._last_forget = time.monotonic()
        if self._heartbeats % _TASK_GAUGES_EVERY == 0:
            with contextlib.suppress(*_DB_ERRORS):
                self._set_task_gauges(await repository.task_health(db, self._known))
        self._heartbeats += 1

    def _set_task_gauges(self, rows: list[asyncpg.Record]) -> None:
        """Export the interval and last success of every enabled task this instance has code
        for; drop the series of tasks paused since, so an alert never fires on a task nobody
        expects to run."""
        names = set()
        for row in rows:
            names.add(row["name"])
            SCHEDULER_TASK_INTERVAL.labels(row["name"]).set(row["interval_seconds"])
            SCHEDULER_TASK_LAST_SUCCESS.labels(row["name"]).set(row["last_success"])
        for gone in self._gauge_tasks - names:
            SCHEDULER_TASK_INTERVAL.remove(gone)
            SCHEDULER_TASK_LAST_SUCCESS.remove(gone)
        self._gauge_tasks = names


class _TaskLog(logging.LoggerAdapter[logging.Logger]):
    """Prefixes every task log line with the task's run id and instance."""

    def process(
        self, msg: Any, kwargs: MutableMapping[str, Any]
    ) -> tuple[Any, MutableMapping[str, Any]]:
        extra = self.extra or {}
        return f"[{extra.get('run')} on {extra.get('instance')}] {msg}", kwargs
