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
                    "schedule": None,
                    "timezone": None,
                    "missed_slots": "coalesce",
                    "timeout_seconds": None,
                    "max_attempts": 1,
                    "function_name": "tandem.scheduler.demo_tasks.demo_task",
                    "enabled": True,
                    "is_running": True,
                    "running_instance": "3f2a9c0d1e4b",
                    "started_at": "2026-11-28T15:00:00.012345Z",
                    "elapsed_seconds": 42.5,
                    "next_run_at": "2026-11-28T15:05:00Z",
                    "retry_at": None,
                    "retry_attempt": None,
                    "last_status": "succeeded",
                    "last_finished_at": "2026-11-28T14:57:00.1Z",
                }
            ]
        }
    )

    name: str
    interval_seconds: float = Field(
        description="The interval; for a cron task, the longest gap between its slots."
    )
    schedule: str | None = Field(description="The cron expression (null: every interval).")
    timezone: str | None = Field(description="The cron expression's IANA time zone.")
    missed_slots: str = Field(description="coalesce, skip or catch_up")
    timeout_seconds: float | None = Field(description="A run is cancelled after this long.")
    max_attempts: int = Field(description="Attempts per slot (1: no retries).")
    function_name: str
    enabled: bool
    is_running: bool
    running_instance: str | None
    started_at: datetime | None
    elapsed_seconds: float | None = Field(description="Database time since the run started.")
    next_run_at: datetime | None = Field(
        description="The next slot (null for a moment while a claim plans it)."
    )
    retry_at: datetime | None = Field(description="When the pending retry is due.")
    retry_attempt: int | None = Field(description="The pending retry's attempt number.")
    last_status: str | None
    last_finished_at: datetime | None


class PendingTask(BaseModel):
    name: str
    next_run_at: datetime = Field(description="The next start: a slot or a retry.")
    due_in_seconds: float = Field(description="Negative when overdue (waiting for a claimer).")
    attempt: int = Field(description="1 for a slot's first run, more for a retry.")


class TasksOverview(BaseModel):
    tasks: list[TaskState]
    pending: list[PendingTask] = Field(
        description="Tasks waiting for their next run, soonest first."
    )


class Run(BaseModel):
    id: int
    instance_id: str
    fence: int
    scheduled_for: datetime = Field(description="The slot this run stands for.")
    attempt: int = Field(description="1 for the slot's first run, then each retry's number.")
    started_at: datetime
    finished_at: datetime | None
    status: str = Field(
        description="running, succeeded, failed, timed_out, lost, cancelled or skipped "
        "(missed slots passed over: error says which)"
    )
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
    next_run_at: datetime | None
