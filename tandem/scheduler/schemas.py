"""Shapes of the cluster cron's API."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tandem.core.text import FREE_TEXT


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


# --- schedules as data (/schedules) ------------------------------------------------------

_STRICT = ConfigDict(strict=True, extra="forbid")
# A schedule's name: a path segment, never holding the "/" of a deleted one's row.
SCHEDULE_NAME = r"^[A-Za-z0-9._-]{1,100}$"
MissedPolicy = Literal["coalesce", "skip", "catch_up"]
OverlapPolicy = Literal["skip", "buffer_one", "cancel_other"]
Note = Annotated[str, Field(max_length=500, description="Free text for people."), FREE_TEXT]
# Seconds: finite, at least 1 for an interval (a shorter one is a loop, not a schedule), at
# most a year.
_YEAR = 366 * 86_400


class _ScheduleFields(BaseModel):
    model_config = _STRICT

    params: dict[str, Any] | None = Field(
        default=None, description="Validated against the task's params model (at most 16 KiB)."
    )
    every: float | None = Field(
        default=None, ge=1, le=_YEAR, allow_inf_nan=False, description="Seconds between slots."
    )
    cron: str | None = Field(
        default=None, min_length=1, max_length=200, description="A cron expression (5 or 6 fields)."
    )
    tz: str | None = Field(
        default=None, min_length=1, max_length=64, description="The cron expression's zone."
    )
    missed: MissedPolicy | None = Field(default=None, description="Missed slots (coalesce).")
    overlap: OverlapPolicy | None = Field(
        default=None, description="A slot or a manual run while a run is going (skip)."
    )
    timeout: float | None = Field(default=None, gt=0, le=_YEAR, allow_inf_nan=False)
    max_attempts: int | None = Field(default=None, ge=1, le=100)
    retry_backoff: float | None = Field(default=None, gt=0, le=_YEAR, allow_inf_nan=False)
    retry_backoff_max: float | None = Field(default=None, gt=0, le=_YEAR, allow_inf_nan=False)
    note: Note | None = None


class ScheduleCreate(_ScheduleFields):
    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [
                {
                    "name": "echo-every-minute",
                    "task": "demo.echo",
                    "params": {"message": "hello", "seconds": 1},
                    "every": 60,
                }
            ]
        },
    )

    name: str = Field(pattern=SCHEDULE_NAME)
    task: str = Field(min_length=1, max_length=200)
    enabled: bool = True


class SchedulePatch(_ScheduleFields):
    """Only the fields given change; `every` and `cron` replace each other."""

    task: str | None = Field(default=None, min_length=1, max_length=200)


class ScheduleRun(BaseModel):
    model_config = _STRICT

    params: dict[str, Any] | None = Field(
        default=None, description="This run's params (null: the schedule's)."
    )


class SchedulePause(BaseModel):
    model_config = _STRICT

    note: str | None = Field(
        default=None, max_length=500, description="Why (the history shows it)."
    )


class Schedule(BaseModel):
    name: str
    task: str
    params: dict[str, Any]
    every: float | None = Field(description="Seconds between slots (null: cron).")
    cron: str | None
    tz: str | None
    missed: str
    overlap: str
    timeout: float | None
    max_attempts: int
    retry_backoff: float | None
    retry_backoff_max: float | None
    enabled: bool
    state: str = Field(description="active, paused, or orphaned (no live instance has its task).")
    note: str | None
    pause_note: str | None = Field(description="The last pause's note.")
    source: str = Field(description="code (registry.task) or api.")
    version: int = Field(description="1 at creation, +1 per change: PATCH's If-Match.")
    is_running: bool
    running_instance: str | None
    next_run_at: datetime | None
    retry_at: datetime | None
    manual_at: datetime | None = Field(description="A run asked for, not started yet.")
    last_status: str | None
    last_finished_at: datetime | None
    created_at: datetime
    updated_at: datetime
    created_by: str | None = Field(description="The API key's name (null: code).")
    updated_by: str | None


class ScheduleList(BaseModel):
    schedules: list[Schedule]
    next: str | None = Field(description="Pass as `after` for the next page (null: the last).")


class ScheduleRunRecord(BaseModel):
    id: int
    instance_id: str
    started_at: datetime
    finished_at: datetime | None
    status: str
    attempt: int
    scheduled_for: datetime
    schedule_version: int | None
    params: dict[str, Any] | None
    trigger: str | None = Field(description="schedule, manual or retry.")
    error: str | None


class ScheduleAction(BaseModel):
    action: str
    api_key: str | None
    at: datetime
    note: str | None


class ScheduleHistory(BaseModel):
    name: str
    runs: list[ScheduleRunRecord]
    actions: list[ScheduleAction]


class ScheduleSummary(BaseModel):
    """A schedule as the status page lists it."""

    name: str
    task: str
    source: str
    version: int
    enabled: bool
    note: str | None
    pause_note: str | None


class SchedulesSummary(BaseModel):
    schedules: list[ScheduleSummary]
    total: int = Field(description="Every live schedule; `schedules` holds the first ones.")
