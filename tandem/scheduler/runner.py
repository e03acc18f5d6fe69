"""The cluster cron of one instance: join the cluster, run its loops, drain on shutdown.

The work is split by job, one module each:
- session.py: the database session whose lock says this instance is alive, and the heartbeat
  that renews it and the leases of the local runs (nothing else runs on its clock);
- runs.py: the local runs: their task bodies, self-fencing and timeout timers, and the fenced
  completion that records each end (and its retry, schedules.retry_after);
- claims.py: the claim loop (sweep, claim within fair share, plan the slot, start or release);
- housekeeping.py: the slow loop that forgets old instances and refreshes the task gauges.

Written here rather than taken from APScheduler, procrastinate or similar: none of them gives
fencing tokens on every write, fair-share claiming across instances, database-clock-only
timing and lost-run recovery within one lease.

Every statement is short and stands alone (one claim, one heartbeat, one completion): no
transaction is held while a task body runs, and none waits on this process between
statements. The arithmetic that keeps a run inside its lease is
Settings.check_scheduler_timings.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from datetime import datetime

from tandem.core.database import Database
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tandem.observability.metrics import SCHEDULER_RUNNING
from tandem.scheduler import repository
from tandem.scheduler.claims import Claimer, plan_claim
from tandem.scheduler.housekeeping import Housekeeping
from tandem.scheduler.registry import Registry, TaskDefinition
from tandem.scheduler.runs import DB_ERRORS, LocalRuns
from tandem.scheduler.schedules import Cron
from tandem.scheduler.session import HeartbeatSession

# plan_claim lives with the claim loop (claims.py); named here too for the code that imported
# it from the runner before the split.
__all__ = ["Runner", "plan_claim", "task_row"]

log = logging.getLogger(__name__)


class Runner:
    """The wiring: joins (retrying until the database and its schema answer), then runs the
    claim, heartbeat and housekeeping loops until ``stop``."""

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
        # Intervals, timeouts and backoffs in this process's (possibly compressed) time.
        self._definitions = {
            d.name: d.scaled(settings.scheduler_time_scale) for d in registry.all()
        }
        self._stopping = asyncio.Event()
        self._main: asyncio.Task[None] | None = None
        self._claiming: asyncio.Task[None] | None = None
        # Made by the join, in this order (each needs the ones before).
        self._pool: ConnectionPool | None = None
        self._runs: LocalRuns | None = None
        self._session: HeartbeatSession | None = None
        self._claimer: Claimer | None = None
        self._housekeeping: Housekeeping | None = None

    @property
    def running(self) -> dict[int, str]:
        """Task id -> name of the runs in progress here."""
        return {} if self._runs is None else self._runs.running

    @property
    def draining(self) -> bool:
        """The drain has begun: no run starts here any more."""
        return self._stopping.is_set()

    async def start(self) -> None:
        """Start in the background: joining waits (retrying) until the database answers and
        the schema exists, so an instance can come up before its migrations have run."""
        self._main = asyncio.create_task(self._run(), name="scheduler")

    async def _run(self) -> None:
        delay = 0.5
        while not self._stopping.is_set():
            try:
                await self._join()
                break
            # RuntimeError: a session connection that cannot hold its lock (a pooler).
            except (*DB_ERRORS, TimeoutError, RuntimeError) as error:
                log.warning("scheduler cannot join yet (%r); retry in %.1fs", error, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 10.0)
        # Instances started together (a deploy, `tandem cluster`) all join before the first
        # claim, so the first to come up does not take every task due at start.
        await asyncio.sleep(self.settings.scheduler_heartbeat_interval)
        if self._stopping.is_set():
            return
        assert self._claimer is not None
        assert self._session is not None
        assert self._housekeeping is not None
        self._claiming = asyncio.create_task(self._claimer.run(), name="scheduler-claims")
        await asyncio.gather(self._claiming, self._session.run(), self._housekeeping.run())

    async def _join(self) -> None:
        if self._pool is None:
            self._pool = await self._database.open_pool(
                "tandem-scheduler", self.settings.scheduler_pool_size
            )
        pool = self._pool
        async with pool.acquire() as db:
            await repository.register_instance(
                db, self.instance_id, self.hostname, os.getpid(), list(self._definitions)
            )
            now = await repository.database_now(db)
            for definition in self._definitions.values():
                if definition.schedule is not None:
                    upserted = await repository.upsert_task(db, task_row(definition, now))
                    _say_upserted(definition.name, upserted)
        if self._runs is None:
            self._runs = LocalRuns(self.settings, self.instance_id, pool)
            self._session = HeartbeatSession(
                self.settings,
                self._database,
                self.instance_id,
                self.hostname,
                self._runs,
                list(self._definitions),
            )
            self._claimer = Claimer(
                self.settings,
                pool,
                self.instance_id,
                self._definitions,
                self._session,
                self._runs,
                self._stopping,
            )
            known = [d.name for d in self._definitions.values() if d.schedule is not None]
            watched = [d.name for d in self._definitions.values() if d.watched]
            self._housekeeping = Housekeeping(self.settings, pool, known, watched)
        assert self._session is not None
        await self._session.open()
        log.info("scheduler started as instance %s on %s", self.instance_id, self.hostname)

    async def stop(self) -> None:
        """Drain: from this moment no run starts here; every local run is stopped and released
        so another instance takes it within a poll; then leave the membership list.

        The claim loop is not cancelled while a claim is on its way: a claim is one statement
        that may stand whether or not its answer arrives, and one cancelled in flight would be
        left running in the database with nobody to release it (until a sweep, which never
        comes when the whole cluster stops). It ends after its statement in flight instead,
        and a claim that comes back after the drain began is released unstarted."""
        self._stopping.set()
        deadline = time.monotonic() + self.settings.scheduler_drain_timeout
        log.info("scheduler of instance %s draining", self.instance_id)
        if self._runs is not None:
            self._runs.drain()
        if self._claiming is not None:
            await asyncio.wait({self._claiming}, timeout=_left(deadline))
        if self._main is not None:
            # The claim loop has ended (or the database held it past the drain time: its claim
            # in flight, if it stands, is left to its lease and the sweep); the other loops
            # hold nothing that needs finishing.
            self._main.cancel()
            await asyncio.gather(self._main, return_exceptions=True)
        tasks = [] if self._runs is None else self._runs.tasks()
        if tasks:
            await asyncio.wait(tasks, timeout=_left(deadline))
        if self._pool is not None:
            # Leaving the membership list is a courtesy (the heartbeat window expires anyway):
            # with the database unreachable it must not hold the shutdown for the pool's
            # acquire timeout (60 s, past a container's stop grace). TimeoutError is an OSError.
            with contextlib.suppress(*DB_ERRORS):
                async with asyncio.timeout(max(_left(deadline), 1.0)):
                    async with self._pool.acquire() as db:
                        await repository.stop_instance(db, self.instance_id)
            await self._pool.close(self.settings.db_close_timeout)
        # Last: the session vouches for this instance's runs until they are released.
        if self._session is not None:
            await self._session.close()
        SCHEDULER_RUNNING.set(0)
        log.info("scheduler of instance %s stopped", self.instance_id)

    async def poll_once(self) -> None:
        """One poll: sweep expired leases, then claim due tasks while the fair share allows
        (nothing before the join)."""
        if self._claimer is not None:
            await self._claimer.poll_once()

    async def heartbeat_once(self) -> None:
        """One heartbeat: refresh membership and renew the leases of the local runs."""
        if self._session is not None:
            await self._session.heartbeat_once()


def _left(deadline: float) -> float:
    return max(deadline - time.monotonic(), 0.0)


def _say_upserted(name: str, upserted: repository.Upserted | None) -> None:
    if upserted is None:
        log.warning(
            "code schedule %s is not written: a schedule made through the API has its name "
            "(delete or rename that one to schedule it from code)",
            name,
        )
    elif upserted.old_version is not None and upserted.version != upserted.old_version:
        log.info(
            "code schedule %s changed: version %d%s",
            name,
            upserted.version,
            ", its pending retry dropped" if upserted.dropped_retry else "",
        )


def task_row(definition: TaskDefinition, now: datetime) -> repository.TaskRow:
    """The row a code schedule is stored as; ``now``: the database clock, for a cron
    schedule's first slot."""
    schedule = definition.schedule
    assert schedule is not None, "a task without a code schedule has no row"
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
        grace=definition.grace,
        catch_up_limit=definition.catch_up_limit,
        retry_backoff=definition.retry_backoff,
        retry_backoff_max=definition.retry_backoff_max,
        overlap=definition.overlap,
        first_run=cron.first_after(now) if cron else None,
    )
