"""The runner's slow loop: forgetting instances silent for long, and the cluster-wide task
gauges (each task's interval and last success, what the "task not succeeding" alert reads).

Neither is safety: they run on a clock of their own, on the scheduler's pool, so a slow read
here never holds up a lease renewal on the heartbeat's connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tandem.observability.metrics import (
    SCHEDULER_TASK_INTERVAL,
    SCHEDULER_TASK_LAST_SUCCESS,
    SCHEDULER_TASK_PAUSED_SINCE,
)
from tandem.scheduler import repository
from tandem.scheduler.runs import DB_ERRORS

log = logging.getLogger(__name__)

# Instances silent this long are deleted from the membership table (their runs were swept
# long before), checked about once a minute.
FORGET_AFTER = 3600.0
FORGET_EVERY = 60.0
# The task gauges are read every this many heartbeat intervals (10 s at the default timings:
# alerts look at hours, not seconds).
GAUGES_EVERY_HEARTBEATS = 5


class Housekeeping:
    def __init__(
        self, settings: Settings, pool: ConnectionPool, known: list[str], watched: list[str]
    ) -> None:
        self.settings = settings
        self._pool = pool
        # The tasks this instance has code for, and those of them that are watched.
        self._known = known
        self._watched = watched
        self._last_forget: float | None = None
        self._gauge_tasks: set[str] = set()
        self._paused_tasks: set[str] = set()

    @property
    def period(self) -> float:
        return GAUGES_EVERY_HEARTBEATS * self.settings.scheduler_heartbeat_interval

    async def run(self) -> None:
        while True:
            try:
                await self.once()
            except Exception:
                # A bug must not end the loop (nor, through it, the runner's other loops).
                log.exception("scheduler housekeeping failed")
            await asyncio.sleep(self.period)

    async def once(self) -> None:
        """Forget old instances when a minute has passed since the last time, and refresh
        the task gauges. A database error skips the round: the next one tries again."""
        now = asyncio.get_running_loop().time()
        if self._last_forget is None or now - self._last_forget >= FORGET_EVERY:
            with contextlib.suppress(*DB_ERRORS):
                async with self._pool.acquire() as db:
                    await repository.forget_instances(db, FORGET_AFTER)
                self._last_forget = now
        try:
            async with self._pool.acquire() as db:
                health = await repository.task_health(db, self._known, self._watched)
        except DB_ERRORS as error:
            log.warning("reading the task gauges failed: %r", error)
            return
        self.set_task_gauges(health)

    def set_task_gauges(self, rows: list[asyncpg.Record]) -> None:
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
