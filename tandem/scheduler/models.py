"""The cluster cron's tables. The database itself refuses what must never happen: two runs
of one task overlapping in time (the exclusion constraint, which also refuses a second
running row: two open runs always overlap), a slot's attempt run twice (unique task, slot,
attempt), a running task without its holder and lease (ck_tasks_running_consistent).

The statements on them are the repository's SQL and the server-side functions in ``sql/``;
these models are the schema's readable truth (autogenerate compares them with the database).
Every timestamp is written by the database clock (``clock_timestamp()``).
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Interval,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB, ExcludeConstraint
from sqlalchemy.orm import Mapped, mapped_column

# Task actions are signed by API keys: their foreign key names api_keys, which the mapper
# must find on the metadata.
import tandem.access.models  # noqa: F401
from tandem.core.models import Base

INSTANCE_STATUSES = ("active", "draining", "stopped")
MISSED_POLICIES = ("coalesce", "skip", "catch_up")
OVERLAP_POLICIES = ("skip", "buffer_one", "cancel_other")
SOURCES = ("code", "api")
RUN_STATUSES = ("running", "succeeded", "failed", "lost", "cancelled", "timed_out", "skipped")
TRIGGERS = ("schedule", "manual", "retry")
TASK_ACTIONS = ("run", "pause", "resume", "create", "change", "delete")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Instance(Base):
    """A member of the cluster: live while its database session holds its lock (the
    ``instance_sessions`` view over pg_locks, keyed by ``session_key``) and its heartbeat is
    within the live window."""

    __tablename__ = "instances"
    __table_args__ = (CheckConstraint(_one_of("status", INSTANCE_STATUSES), name="status"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(Text, nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    heartbeat_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    status: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'active'"))
    # Runs claimed so far: what fair share compares.
    claims: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    # The key of its current database session's advisory lock (sequence instance_session_keys).
    session_key: Mapped[int | None] = mapped_column(Integer)
    # The schema revision its code was released with (core.migrations.head_revision; NULL:
    # a release before 0014): a contract migration waits until no live instance is older.
    revision: Mapped[str | None] = mapped_column(Text)
    # The task names its code has (NULL: a release before 0020): a schedule whose task no
    # live instance has is orphaned.
    tasks: Mapped[list[str] | None] = mapped_column(ARRAY(Text))


class Task(Base):
    """A schedule: a task (code) run on a spec (an interval, or a cron expression in a zone)
    with params and policies, from code (written at every start) or from the API, and its
    runtime state (never reset by a deploy): the run in progress, the next slot, the pending
    retry and manual run, the fence. The table keeps its name from before schedules were
    data: a rename would break the previous release's instances during a rolling deploy."""

    __tablename__ = "tasks"
    __table_args__ = (
        UniqueConstraint("name", name="uq_tasks_name"),
        CheckConstraint("\"interval\" > interval '0'", name="interval_positive"),
        CheckConstraint(
            "(is_running AND running_instance IS NOT NULL AND started_at IS NOT NULL "
            "AND lease_until IS NOT NULL) "
            "OR (NOT is_running AND running_instance IS NULL AND lease_until IS NULL)",
            name="running_consistent",
        ),
        CheckConstraint(_one_of("missed", MISSED_POLICIES), name="missed"),
        CheckConstraint("(schedule IS NULL) = (timezone IS NULL)", name="cron_zone"),
        CheckConstraint("timeout > interval '0'", name="timeout_positive"),
        CheckConstraint("max_attempts >= 1", name="max_attempts"),
        CheckConstraint(
            "(retry_at IS NULL) = (retry_slot IS NULL) "
            "AND (retry_at IS NULL) = (retry_attempt IS NULL)",
            name="retry_whole",
        ),
        CheckConstraint("retry_attempt >= 2", name="retry_attempt"),
        CheckConstraint(_one_of("source", SOURCES), name="source"),
        CheckConstraint(_one_of("overlap", OVERLAP_POLICIES), name="overlap"),
        CheckConstraint("version >= 1", name="version"),
        CheckConstraint("jsonb_typeof(params) = 'object'", name="params_object"),
        # A deleted schedule is never claimed again.
        CheckConstraint("deleted_at IS NULL OR NOT enabled", name="deleted_disabled"),
        # What the previous release's claim scans (tandem_claim_row_v1).
        Index(
            "ix_tasks_due",
            func.least(text("retry_at"), text("next_run_at")),
            postgresql_where=text("enabled AND NOT is_running"),
        ),
        # What the claim scans: the due ones, by when they are due (a retry, a run asked for,
        # the next slot).
        Index(
            "ix_tasks_due_v2",
            func.least(text("retry_at"), text("next_run_at"), text("manual_at")),
            postgresql_where=text("enabled AND NOT is_running"),
        ),
        # The running ones: the sweep, the heartbeat, an instance's running count.
        Index("ix_tasks_running", "running_instance", postgresql_where=text("is_running")),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    interval: Mapped[timedelta] = mapped_column(Interval, nullable=False)
    function_name: Mapped[str] = mapped_column(Text, nullable=False)
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    is_running: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("false"))
    running_instance: Mapped[str | None] = mapped_column(Text)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # NULL for a moment after the claim of a regular slot, until its claimer plans the next.
    next_run_at: Mapped[datetime | None] = mapped_column(
        DateTime(timezone=True), server_default=func.clock_timestamp()
    )
    lease_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    last_status: Mapped[str | None] = mapped_column(Text)
    last_finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    last_succeeded_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A cron task's expression and zone (NULL for an interval task).
    schedule: Mapped[str | None] = mapped_column(Text)
    timezone: Mapped[str | None] = mapped_column(Text)
    missed: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'coalesce'"))
    timeout: Mapped[timedelta | None] = mapped_column(Interval)
    max_attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    # The pending retry: attempt retry_attempt of slot retry_slot is due at retry_at.
    retry_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retry_slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retry_attempt: Mapped[int | None] = mapped_column(Integer)
    # The task (code) it runs; NULL on a row an earlier release wrote: its name.
    task: Mapped[str | None] = mapped_column(Text)
    # Validated against the task's params model; at most 16 KiB (the API's rule).
    params: Mapped[dict[str, object]] = mapped_column(
        JSONB, nullable=False, server_default=text("'{}'")
    )
    source: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'code'"))
    # +1 per change of spec, params or policies; 1 at creation.
    version: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    note: Mapped[str | None] = mapped_column(Text)
    created_by: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    updated_by: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    # The Idempotency-Key of the POST /schedules that made it: its retry answers it again.
    create_key: Mapped[str | None] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    # Soft delete: disabled and renamed "<name>/<id>" (no live name holds a "/"), its history
    # kept.
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # What a slot or a manual run does while a run is still going (OVERLAP_POLICIES).
    overlap: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'skip'"))
    # The policies the code held alone before 0020 (NULL: the defaults of registry.task).
    grace: Mapped[timedelta | None] = mapped_column(Interval)
    catch_up_limit: Mapped[int | None] = mapped_column(Integer)
    retry_backoff: Mapped[timedelta | None] = mapped_column(Interval)
    retry_backoff_max: Mapped[timedelta | None] = mapped_column(Interval)
    # A run asked for through the API: due at manual_at, with these params (NULL: the
    # schedule's).
    manual_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    manual_params: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    # The params of the pending retry (NULL: the schedule's): a manual run's retry keeps its own.
    retry_params: Mapped[dict[str, object] | None] = mapped_column(JSONB)


class TaskHistory(Base):
    """One attempt at one slot of one task, from its claim to its end."""

    __tablename__ = "task_history"
    __table_args__ = (
        UniqueConstraint("task_id", "fence", name="uq_task_history_task_id_fence"),
        UniqueConstraint(
            "task_id", "scheduled_for", "attempt", name="uq_task_history_task_slot_attempt"
        ),
        CheckConstraint(_one_of("status", RUN_STATUSES), name="status"),
        CheckConstraint(_one_of("trigger", TRIGGERS), name="trigger"),
        CheckConstraint("(status = 'running') = (finished_at IS NULL)", name="finished"),
        CheckConstraint("finished_at IS NULL OR finished_at >= started_at", name="order"),
        CheckConstraint("attempt >= 1", name="attempt"),
        # The built-in range GiST opclasses: no btree_gist extension needed.
        ExcludeConstraint(
            (text("int8range(task_id, task_id, '[]')"), "&&"),
            (text("tstzrange(started_at, COALESCE(finished_at, 'infinity'), '[)')"), "&&"),
            name="ex_task_history_no_overlap",
            using="gist",
        ),
        # A task's runs, newest first (the API's history, the recent runs' lateral scan).
        Index("ix_task_history_task_started", "task_id", text("started_at DESC")),
        # Pruning finished runs past their retention, in batches.
        Index(
            "ix_task_history_finished_at",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
    )
    instance_id: Mapped[str] = mapped_column(Text, nullable=False)
    fence: Mapped[int] = mapped_column(BigInteger, nullable=False)
    scheduled_for: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    started_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    status: Mapped[str] = mapped_column(Text, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("1"))
    # What ran (NULL on an earlier release's rows): the schedule's version, the params, and
    # why (TRIGGERS).
    schedule_version: Mapped[int | None] = mapped_column(Integer)
    params: Mapped[dict[str, object] | None] = mapped_column(JSONB)
    trigger: Mapped[str | None] = mapped_column(Text)


class TaskAction(Base):
    """Who created, changed, deleted, ran, paused or resumed a schedule through the API, with
    a note (a pause's reason; what a change dropped)."""

    __tablename__ = "task_actions"
    __table_args__ = (
        CheckConstraint(_one_of("action", TASK_ACTIONS), name="action"),
        Index("ix_task_actions_task_id", "task_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    task_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("tasks.id", ondelete="CASCADE"), nullable=False
    )
    action: Mapped[str] = mapped_column(Text, nullable=False)
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    note: Mapped[str | None] = mapped_column(Text)
