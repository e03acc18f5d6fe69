"""Cluster cron reads and commands for the API. All times are computed by the database, so
every instance answers alike."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from tandem.core.callers import Caller
from tandem.core.errors import ConflictError, NotFoundError
from tandem.scheduler import repository
from tandem.scheduler.catalog import needs_schedules
from tandem.scheduler.schedules import schedule_of
from tandem.scheduler.schemas import (
    Instance,
    Instances,
    PendingTask,
    RecentRuns,
    Run,
    SchedulesSummary,
    ScheduleSummary,
    TaskAction,
    TaskCommandResult,
    TaskHistory,
    TaskRun,
    TasksOverview,
    TaskState,
)


class TaskNotFoundError(NotFoundError):
    code = "task_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no task named {name!r}")


class TaskRunningError(ConflictError):
    code = "task_running"

    def __init__(self, name: str) -> None:
        super().__init__(f"task {name!r} is running: ask again once its run has ended")


@needs_schedules
async def overview(session: AsyncSession) -> TasksOverview:
    rows = (await session.execute(text(repository.LIST_TASKS))).mappings().all()
    tasks = [TaskState.model_validate(dict(row)) for row in rows]
    pending = sorted(
        (
            PendingTask(
                name=row["name"],
                next_run_at=row["due_at"],
                due_in_seconds=float(row["due_in_seconds"]),
                attempt=row["retry_attempt"] if row["due_at"] == row["retry_at"] else 1,
            )
            for row in rows
            if row["enabled"] and not row["is_running"] and row["due_at"] is not None
        ),
        key=lambda p: p.next_run_at,
    )
    return TasksOverview(tasks=tasks, pending=pending)


async def history(session: AsyncSession, name: str, limit: int) -> TaskHistory:
    """Raises TaskNotFoundError."""
    if (await session.execute(text(repository.TASK_EXISTS), {"name": name})).first() is None:
        raise TaskNotFoundError(name)
    rows = await session.execute(text(repository.TASK_HISTORY), {"name": name, "limit": limit})
    runs = [Run.model_validate(dict(r)) for r in rows.mappings()]
    rows = await session.execute(text(repository.TASK_ACTIONS), {"name": name, "limit": limit})
    actions = [TaskAction.model_validate(dict(r)) for r in rows.mappings()]
    return TaskHistory(name=name, runs=runs, actions=actions)


async def recent_runs(session: AsyncSession, limit: int) -> RecentRuns:
    """The newest ``limit`` runs of any task, newest first, running ones included; the cost
    grows with the number of tasks, not with the length of the history."""
    as_of = (await session.execute(text(repository.DATABASE_NOW))).scalar_one()
    rows = await session.execute(text(repository.RECENT_RUNS), {"limit": limit})
    return RecentRuns(as_of=as_of, runs=[TaskRun.model_validate(dict(r)) for r in rows.mappings()])


@needs_schedules
async def schedules_summary(session: AsyncSession, limit: int) -> SchedulesSummary:
    """The first ``limit`` schedules (code first, then by name) and how many there are."""
    rows = (await session.execute(text(repository.SCHEDULES_SUMMARY), {"limit": limit})).mappings()
    found = [dict(r) for r in rows]
    total = int(found[0]["total"]) if found else 0
    return SchedulesSummary(
        schedules=[ScheduleSummary.model_validate(r) for r in found], total=total
    )


async def live_instances(session: AsyncSession, window: timedelta) -> Instances:
    rows = await session.execute(text(repository.LIVE_INSTANCES), {"window": window})
    return Instances(instances=[Instance.model_validate(dict(r)) for r in rows.mappings()])


async def _command(
    session: AsyncSession,
    statement: str,
    action: str,
    name: str,
    caller: Caller,
    values: dict[str, object] | None = None,
) -> TaskCommandResult:
    """The command and its audit row (who did it), in one transaction."""
    found = (await session.execute(text(statement), {"name": name, **(values or {})})).first()
    if found is None:
        raise TaskNotFoundError(name)
    task_id = found[0]
    await session.execute(
        text(repository.RECORD_ACTION),
        {"task_id": task_id, "action": action, "api_key_id": caller.api_key_id, "note": None},
    )
    row = (await session.execute(text(repository.COMMAND_RESULT), {"task_id": task_id})).one()
    return TaskCommandResult(name=row.name, enabled=row.enabled, next_run_at=row.next_run_at)


async def run_now(session: AsyncSession, name: str, caller: Caller) -> TaskCommandResult:
    """Make the task due now. Raises TaskNotFoundError, and TaskRunningError while a run
    is in progress (nothing is queued behind it)."""
    try:
        return await _command(session, repository.RUN_NOW, "run", name, caller)
    except TaskNotFoundError:
        if (await session.execute(text(repository.TASK_EXISTS), {"name": name})).first():
            raise TaskRunningError(name) from None
        raise


async def pause(session: AsyncSession, name: str, caller: Caller) -> TaskCommandResult:
    """No new runs until resumed; a run in progress finishes. Raises TaskNotFoundError."""
    return await _command(session, repository.PAUSE, "pause", name, caller)


async def resume(session: AsyncSession, name: str, caller: Caller) -> TaskCommandResult:
    """Runs again from the next slot of its schedule, without replaying missed ones (nor a
    retry pending since before the pause). Raises TaskNotFoundError."""
    task = (await session.execute(text(repository.RESUME_READ), {"name": name})).first()
    if task is None:
        raise TaskNotFoundError(name)
    schedule = schedule_of(task.interval, task.schedule, task.timezone)
    next_run_at = task.next_run_at
    if next_run_at is None:
        # A claimer died before it planned the next slot, and the retry that would have
        # planned it is dropped here: the schedule's next slot after now.
        next_run_at = schedule.first_after(task.now, task.now)
    elif next_run_at < task.now:
        next_run_at = schedule.first_after(task.now, next_run_at)
    values = {"task_id": task.id, "next_run_at": next_run_at}
    return await _command(session, repository.RESUME, "resume", name, caller, values)
