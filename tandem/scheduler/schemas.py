"""Shapes of the cluster cron's API."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field


class TaskState(BaseModel):
    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "TestTask1",
                    "interval_seconds": 300.0,
                    "function_name": "tandem.scheduler.demo_tasks.demo_task",
                    "enabled": True,
                    "is_running": True,
                    "running_instance": "3f2a9c0d1e4b",
                    "started_at": "2026-11-28T15:00:00.012345Z",
                    "elapsed_seconds": 42.5,
                    "next_run_at": "2026-11-28T15:05:00Z",
                    "last_status": "succeeded",
                    "last_finished_at": "2026-11-28T14:57:00.1Z",
                }
            ]
        }
    )

    name: str
    interval_seconds: float
    function_name: str
    enabled: bool
    is_running: bool
    running_instance: str | None
    started_at: datetime | None
    elapsed_seconds: float | None = Field(description="Database time since the run started.")
    next_run_at: datetime
    last_status: str | None
    last_finished_at: datetime | None


class PendingTask(BaseModel):
    name: str
    next_run_at: datetime
    due_in_seconds: float = Field(description="Negative when overdue (waiting for a claimer).")


class TasksOverview(BaseModel):
    tasks: list[TaskState]
    pending: list[PendingTask] = Field(
        description="Tasks waiting for their next run, soonest first."
    )


class Run(BaseModel):
    id: int
    instance_id: str
    fence: int
    scheduled_for: datetime
    started_at: datetime
    finished_at: datetime | None
    status: str = Field(description="running, succeeded, failed, lost or cancelled")
    error: str | None


class TaskAction(BaseModel):
    action: str = Field(description="run, pause or resume")
    api_key: str | None = Field(
        description="The name of the API key that did it (null: authentication disabled)."
    )
    at: datetime


class TaskHistory(BaseModel):
    name: str
    runs: list[Run]
    actions: list[TaskAction] = Field(
        description="Who ran, paused or resumed the task through the API, newest first."
    )


class TaskRun(Run):
    """A run with its task's name, for views across all tasks."""

    task: str
    duration_seconds: float = Field(
        description="Database time from start to end, or to now while running."
    )
    age_seconds: float = Field(description="Database time since the run started.")


class RecentRuns(BaseModel):
    as_of: datetime = Field(description="The database clock when the runs were read.")
    runs: list[TaskRun] = Field(description="Newest first, across all tasks.")


class Instance(BaseModel):
    id: str
    hostname: str
    pid: int
    started_at: datetime
    status: str
    heartbeat_age_seconds: float
    running: int


class Instances(BaseModel):
    instances: list[Instance]


class TaskCommandResult(BaseModel):
    name: str
    enabled: bool
    next_run_at: datetime
