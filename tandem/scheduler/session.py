"""This instance's database session and its heartbeat: the direct connection whose
session-level lock tells every other instance that this one is alive, and the renewal of
the leases of the runs it holds.

- A crash is noticed by the database: the lock lives on this connection, and when the
  process dies the sweep of any other instance records its runs lost within a poll.
- Losing the session (closed, broken, or not holding the lock) stops every local run at once:
  other instances may already be sweeping them.
- A renewal is dated by the database's clock (the anchor below) and refused whole when it
  arrives later than it may, so a slow network never extends a lease its run has given up.

Only renewals run on the heartbeat's clock: the housekeeping (forgetting old instances, the
task gauges) has a loop of its own (housekeeping.py), so a slow read there never delays a
renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from tandem.core.database import Database
from tandem.core.settings import Settings
from tandem.observability.metrics import SCHEDULER_LIVE_INSTANCES
from tandem.scheduler import repository
from tandem.scheduler.catalog_repository import WAKE_CHANNEL
from tandem.scheduler.runs import DB_ERRORS, LocalRuns

log = logging.getLogger(__name__)

_POOLER_HINT = (
    "it must reach PostgreSQL directly, not through a transaction pooler (set "
    "TANDEM_DATABASE_DIRECT_URL)"
)


@dataclass
class Session:
    """The direct connection holding this instance's lock, and the last database clock
    reading with the local time it was received (the anchor that dates renewals on the
    database's clock)."""

    conn: asyncpg.Connection
    key: int
    anchor_db: datetime
    anchor_local: float


class HeartbeatSession:
    """Opens the session, renews it and the leases of the local runs at a fixed rate, and
    gives it up when it cannot be trusted."""

    def __init__(
        self,
        settings: Settings,
        database: Database,
        instance_id: str,
        hostname: str,
        runs: LocalRuns,
        tasks: list[str] | None = None,
    ) -> None:
        self.settings = settings
        # The task names this instance's code has (said again if it must join again).
        self._tasks = tasks
        self._database = database
        self.instance_id = instance_id
        self.hostname = hostname
        self._runs = runs
        # None while there is none: claims wait for the next one.
        self.current: Session | None = None

    @staticmethod
    def _now() -> float:
        return asyncio.get_running_loop().time()

    async def open(self) -> None:
        conn = await self._database.connect("tandem-heartbeat", direct=True)
        try:
            session = await repository.open_session(
                conn, self.instance_id, self.settings.scheduler_lease
            )
            if session is None:  # forgotten after a long silence: join again
                await repository.register_instance(
                    conn, self.instance_id, self.hostname, os.getpid(), self._tasks
                )
                session = await repository.open_session(
                    conn, self.instance_id, self.settings.scheduler_lease
                )
            assert session is not None
            if not await repository.holds_session(conn, session.key):
                raise RuntimeError(
                    f"the scheduler's session connection does not hold its lock: {_POOLER_HINT}"
                )
            # Wake-ups on the direct connection this instance holds anyway (a LISTEN cannot
            # go through a transaction pooler): a schedule made, resumed or run now starts
            # within milliseconds, not at the next poll. Lost with the connection (a new
            # session listens again); the poll stays the fallback.
            await conn.add_listener(WAKE_CHANNEL, self._woken)
        except BaseException:
            conn.terminate()
            raise
        self.current = Session(conn, session.key, session.db_now, self._now())
        conn.add_termination_listener(self._on_closed)

    def _woken(self, *_: object) -> None:
        self._runs.wake.set()

    def _on_closed(self, conn: object) -> None:
        if self.current is not None and self.current.conn is conn:
            self.lose("the database session closed")

    def lose(self, why: str) -> list[asyncio.Task[None]]:
        """The session lock is gone or going: other instances may sweep this instance's
        runs any moment now, so every run stops first. Returns the runs' tasks."""
        session, self.current = self.current, None
        tasks = self._runs.stop_all("session_lost", why)
        if session is not None:
            session.conn.remove_termination_listener(self._on_closed)
            log.warning("scheduler session lost (%s): runs stopped, reconnecting", why)
        return tasks

    async def drop(self, why: str) -> None:
        """Give the session up on purpose: its end frees this instance's runs for others, so
        the runs stop before it is closed (for at most the margin they have anyway)."""
        session = self.current
        tasks = self.lose(why)
        if tasks:
            margin = self.settings.scheduler_lease - self.settings.scheduler_self_fence_after
            await asyncio.wait(tasks, timeout=margin)
        if session is not None:
            session.conn.terminate()

    async def close(self) -> None:
        session, self.current = self.current, None
        if session is not None:
            session.conn.remove_termination_listener(self._on_closed)
            with contextlib.suppress(*DB_ERRORS):
                await session.conn.close(timeout=self.settings.db_close_timeout)

    async def run(self) -> None:
        """Heartbeats at a fixed rate, however long each took; a failed one drops the session
        (the next opens a new one)."""
        settings = self.settings
        while True:
            started = self._now()
            try:
                await self.heartbeat_once()
            except DB_ERRORS as error:
                log.warning("heartbeat failed: %r", error)
                await self.drop(f"heartbeat failed: {error!r}")
            except Exception as error:
                log.exception("heartbeat failed")
                await self.drop(f"heartbeat failed: {error!r}")
            elapsed = self._now() - started
            await asyncio.sleep(max(settings.scheduler_heartbeat_interval - elapsed, 0))

    async def heartbeat_once(self) -> None:
        """Refresh membership and renew the leases of the runs this instance holds; stop the
        runs whose lease another instance has taken over."""
        settings = self.settings
        if self.current is None:
            await self.open()
        session = self.current
        assert session is not None
        sent = self._now()
        validity = settings.scheduler_renewal_validity
        held = self._runs.renewable(sent, validity)
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
                settings.scheduler_live_window,
            )
        if self.current is session:
            # Every answer is a fresh reading of the database clock (a stale one too: were the
            # anchor kept, a step of that clock could make every later heartbeat stale).
            session.anchor_db, session.anchor_local = beat.db_now, self._now()
        if beat.outcome == "stale":
            log.warning("heartbeat reached the database too late: nothing renewed")
            return
        if beat.outcome != "renewed":
            # "no_session": this connection does not hold the lock it took, as behind a pooler
            # in transaction mode.
            await self.drop(f"heartbeat answered {beat.outcome}")
            if beat.outcome == "no_session":
                log.error(
                    "the scheduler's heartbeat connection does not hold its session lock: %s",
                    _POOLER_HINT,
                )
            return
        if beat.live is not None:
            SCHEDULER_LIVE_INSTANCES.set(beat.live)
        self._runs.renewed(held, beat.renewed, sent)
