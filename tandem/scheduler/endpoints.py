"""Cluster cron HTTP endpoints."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

from fastapi import APIRouter, Query

from tandem.core.dependencies import CurrentCaller, CurrentInstance, Db
from tandem.core.openapi import DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN, error_responses
from tandem.scheduler import service
from tandem.scheduler.schemas import Instances, TaskCommandResult, TaskHistory, TasksOverview

router = APIRouter(tags=["cluster cron"])

_NOT_FOUND_CODE = (404, "task_not_found", "no task has this name")
_READ = error_responses(DATABASE_UNAVAILABLE)
_READ_TASK = error_responses(_NOT_FOUND_CODE, DATABASE_UNAVAILABLE)
# A command is one UPDATE; its outcome is unknown only if the connection broke at COMMIT.
_COMMAND = error_responses(_NOT_FOUND_CODE, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN)


@router.get(
    "/tasks",
    response_model=TasksOverview,
    responses=_READ,
    summary="Every task's state, and the tasks waiting for their next run",
    description=(
        "For each task: whether it runs, on which instance, for how long (database time), "
        "its next slot and last outcome. `pending` lists the tasks not running, soonest first."
    ),
)
async def list_tasks(db: Db) -> TasksOverview:
    return await db.transact(service.overview, writes=False)


@router.get(
    "/tasks/{name}/history",
    response_model=TaskHistory,
    summary="A task's runs, newest first",
    responses=_READ_TASK,
)
async def task_history(
    db: Db, name: str, limit: Annotated[int, Query(ge=1, le=200)] = 50
) -> TaskHistory:
    return await db.transact(lambda session: service.history(session, name, limit), writes=False)


@router.get(
    "/instances",
    response_model=Instances,
    summary="Live instances and their load",
    responses=_READ,
)
async def list_instances(instance: CurrentInstance) -> Instances:
    window = timedelta(seconds=instance.settings.scheduler_live_window)
    return await instance.database.transact(
        lambda session: service.live_instances(session, window), writes=False
    )


@router.post(
    "/tasks/{name}/run",
    response_model=TaskCommandResult,
    summary="Run a task now (refused while a run of it is in progress)",
    responses=error_responses(
        _NOT_FOUND_CODE,
        (409, "task_running", "a run of this task is in progress (nothing is queued)"),
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
)
async def run_task_now(db: Db, name: str, caller: CurrentCaller) -> TaskCommandResult:
    return await db.transact(lambda session: service.run_now(session, name, caller))


@router.post(
    "/tasks/{name}/pause",
    response_model=TaskCommandResult,
    summary="Stop scheduling a task (a run in progress finishes)",
    responses=_COMMAND,
)
async def pause_task(db: Db, name: str, caller: CurrentCaller) -> TaskCommandResult:
    return await db.transact(lambda session: service.pause(session, name, caller))


@router.post(
    "/tasks/{name}/resume",
    response_model=TaskCommandResult,
    summary="Schedule a paused task again, from its next slot (no burst of missed runs)",
    responses=_COMMAND,
)
async def resume_task(db: Db, name: str, caller: CurrentCaller) -> TaskCommandResult:
    return await db.transact(lambda session: service.resume(session, name, caller))
