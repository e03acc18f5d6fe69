"""What the status page shows, read through the scheduler's service (no SQL of its own)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta

from sqlalchemy.ext.asyncio import AsyncSession

from tandem.scheduler import service as scheduler
from tandem.scheduler.schemas import Instances, RecentRuns, SchedulesSummary, TasksOverview

# The schedules the page lists (there may be thousands: /schedules pages through them all).
SCHEDULES_SHOWN = 50


@dataclass(frozen=True)
class Snapshot:
    """Tasks, live instances and recent runs as of one database snapshot."""

    tasks: TasksOverview
    instances: Instances
    recent: RecentRuns
    schedules: SchedulesSummary


async def read_snapshot(
    session: AsyncSession, live_window: timedelta, history_limit: int
) -> Snapshot:
    """Read everything from one snapshot, so the page never contradicts itself: an instance's
    running count always equals its rows in the running table, a task is never both running
    and pending. Must be the first use of the session's transaction (it sets the isolation).
    A read-only REPEATABLE READ transaction never fails with a serialization error."""
    await session.connection(
        execution_options={"isolation_level": "REPEATABLE READ", "postgresql_readonly": True}
    )
    recent = await scheduler.recent_runs(session, history_limit)
    tasks = await scheduler.overview(session)
    instances = await scheduler.live_instances(session, live_window)
    schedules = await scheduler.schedules_summary(session, SCHEDULES_SHOWN)
    return Snapshot(tasks=tasks, instances=instances, recent=recent, schedules=schedules)
