"""Cluster cron HTTP endpoints."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from tandem.core.dependencies import Session
from tandem.scheduler import service
from tandem.scheduler.schemas import Instances, TaskCommandResult, TaskHistory, TasksOverview

router = APIRouter(tags=["cluster cron"])

_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"description": "`task_not_found`: no task has this name."}
}


@router.get(
    "/tasks",
    response_model=TasksOverview,
    summary="Every task's state, and the tasks waiting for their next run",
    description=(
        "For each task: whether it runs, on which instance, for how long (database time), "
        "its next slot and last outcome. `pending` lists the tasks not running, soonest first."
    ),
)
async def list_tasks(session: Session) -> TasksOverview:
    return await service.overview(session)


@router.get(
    "/tasks/{name}/history",
    response_model=TaskHistory,
    summary="A task's runs, newest first",
    responses=_NOT_FOUND,
)
async def task_history(
    session: Session, name: str, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> TaskHistory:
    return await service.history(session, name, limit)


@router.get("/instances", response_model=Instances, summary="Live instances and their load")
async def list_instances(request: Request, session: Session) -> Instances:
    lease = request.app.state.resources.settings.scheduler_lease
    return await service.live_instances(session, timedelta(seconds=lease))


@router.post(
    "/tasks/{name}/run",
    response_model=TaskCommandResult,
    summary="Run a task now (after its current run, if one is in progress)",
    responses=_NOT_FOUND,
)
async def run_task_now(session: Session, name: str) -> TaskCommandResult:
    return await service.run_now(session, name)


@router.post(
    "/tasks/{name}/pause",
    response_model=TaskCommandResult,
    summary="Stop scheduling a task (a run in progress finishes)",
    responses=_NOT_FOUND,
)
async def pause_task(session: Session, name: str) -> TaskCommandResult:
    return await service.pause(session, name)


@router.post(
    "/tasks/{name}/resume",
    response_model=TaskCommandResult,
    summary="Schedule a paused task again, from its next slot (no burst of missed runs)",
    responses=_NOT_FOUND,
)
async def resume_task(session: Session, name: str) -> TaskCommandResult:
    return await service.resume(session, name)
