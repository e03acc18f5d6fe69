"""Schedules as data: the rules of ``/schedules`` (create, change, delete, pause, resume, run
now, read), over catalog_repository's SQL, each command one transaction that locks the
schedule's row first.

- A schedule names a task this instance has code for (its params model validates the params:
  data only, never code or an import path); a code schedule (``registry.task(..., every=)``)
  may be paused, resumed and run, never changed or deleted here (409 ``managed_by_code``).
- A change needs the version it was based on (``If-Match``): 412 when another change came
  first. A change of spec replans the next slot; a change of spec or params drops a pending
  retry of the old version, and the audit row says so.
- A run asked for while one is going follows the schedule's overlap policy: ``skip`` refuses
  (409 ``already_running``), ``buffer_one`` keeps one to run right after (a second: 409
  ``already_buffered``), ``cancel_other`` asks the running one to stop (its owner stops it at
  its next poll, claims.Claimer) and runs once it has.
- Commands that make a schedule due wake every claimer (NOTIFY at commit).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import asyncpg
import sqlalchemy.exc

from tandem.core.callers import Caller
from tandem.core.errors import AppError, ConflictError, NotFoundError, ServiceUnavailableError
from tandem.core.pool import ConnectionPool
from tandem.scheduler import catalog_repository as repository
from tandem.scheduler.registry import ParamsError, Registry, TaskDefinition
from tandem.scheduler.schedules import Cron, Every, Schedule, ScheduleError, default_grace
from tandem.scheduler.schemas import ScheduleCreate, SchedulePatch

# The largest params object, as stored (compact JSON, UTF-8).
PARAMS_MAX_BYTES = 16 * 1024
PAGE_MAX = 200

P = ParamSpec("P")
R = TypeVar("R")


class ScheduleNotFoundError(NotFoundError):
    code = "schedule_not_found"

    def __init__(self, name: str) -> None:
        super().__init__(f"no schedule named {name!r}")


class ScheduleExistsError(ConflictError):
    code = "schedule_exists"

    def __init__(self, name: str) -> None:
        super().__init__(f"a schedule named {name!r} exists")


class ManagedByCodeError(ConflictError):
    code = "managed_by_code"

    def __init__(self, name: str) -> None:
        super().__init__(
            f"schedule {name!r} is defined in code (registry.task): change it in code and deploy; "
            "it may be paused, resumed and run here"
        )


class VersionMismatchError(AppError):
    status_code = 412
    code = "version_mismatch"

    def __init__(self, name: str, asked: int, current: int) -> None:
        super().__init__(
            f"schedule {name!r} is at version {current}, not {asked}: read it again and "
            "apply the change to that version"
        )


class VersionRequiredError(AppError):
    status_code = 428
    code = "version_required"

    def __init__(self) -> None:
        super().__init__("a change needs If-Match: the version it was based on (an integer)")


class AlreadyRunningError(ConflictError):
    code = "already_running"

    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} has a run going (overlap skip: nothing is queued)")


class AlreadyBufferedError(ConflictError):
    code = "already_buffered"

    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} has a run asked for already, not started yet")


class SchedulePausedError(ConflictError):
    code = "schedule_paused"

    def __init__(self, name: str) -> None:
        super().__init__(f"schedule {name!r} is paused: resume it first")


class UnknownTaskError(AppError):
    status_code = 422
    code = "unknown_task"

    def __init__(self, task: str, known: list[str]) -> None:
        listed = ", ".join(known[:20])
        super().__init__(f"no task named {task[:200]!r} in this release's code; tasks: {listed}")


class InvalidParamsError(AppError):
    status_code = 422
    code = "invalid_params"


class InvalidScheduleError(AppError):
    status_code = 422
    code = "invalid_schedule"


class SchedulesUnavailableError(ServiceUnavailableError):
    code = "schedules_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "schedules are not available yet: the database is below migration 0020 (run "
            "`tandem migrate` once no older instance is live)"
        )


# What a statement of this release gets on a database below 0020: a column or a function
# missing (asyncpg's errors, or SQLAlchemy's carrying the SQLSTATE).
_BELOW_0020 = frozenset({"42703", "42883"})


def needs_schedules(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``function``, answering 503 schedules_unavailable while the database is below
    migration 0020 (during a rolling deploy) instead of failing."""

    async def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await function(*args, **kwargs)
        except (asyncpg.UndefinedColumnError, asyncpg.UndefinedFunctionError) as error:
            raise SchedulesUnavailableError() from error
        except sqlalchemy.exc.DBAPIError as error:
            if getattr(error.orig, "sqlstate", None) in _BELOW_0020:
                raise SchedulesUnavailableError() from error
            raise

    checked.__doc__, checked.__name__ = function.__doc__, function.__name__
    return checked


def parse_version(raw: str | None) -> int:
    """If-Match: the version as is, or quoted (an ETag's spelling)."""
    if raw is None:
        raise VersionRequiredError()
    text = raw.strip()
    if len(text) >= 2 and text[0] == text[-1] == '"':
        text = text[1:-1]
    if not (text.isascii() and text.isdigit()) or len(text) > 9:
        raise VersionRequiredError()
    return int(text)


def _task(registry: Registry, name: str) -> TaskDefinition:
    found = registry.get(name)
    if found is None:
        raise UnknownTaskError(name, sorted(d.name for d in registry.all()))
    return found


def _params(definition: TaskDefinition, raw: dict[str, Any] | None) -> dict[str, Any]:
    try:
        stored = definition.stored_params({} if raw is None else raw)
    except ParamsError as error:
        details = [
            {
                "field": ".".join(["params", *(str(p) for p in e["loc"])]),
                "type": e["type"],
                "message": e["msg"],
            }
            for e in error.errors
        ]
        raise InvalidParamsError(str(error), details=details) from None
    size = len(json.dumps(stored, separators=(",", ":"), ensure_ascii=False).encode())
    if size > PARAMS_MAX_BYTES:
        raise InvalidParamsError(f"params take {size} bytes as JSON; at most {PARAMS_MAX_BYTES}")
    return stored


def _schedule(every: float | None, cron: str | None, tz: str | None) -> Schedule:
    if (every is None) == (cron is None):
        raise InvalidScheduleError("a schedule takes exactly one of every and cron")
    if every is not None and tz is not None:
        raise InvalidScheduleError("tz goes with cron, not every")
    try:
        return (
            Every(timedelta(seconds=every)) if every is not None else Cron(cron or "", tz or "UTC")
        )
    except ScheduleError as error:
        raise InvalidScheduleError(str(error)) from None


def _seconds(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def _spec(
    definition: TaskDefinition,
    schedule: Schedule,
    params: dict[str, Any],
    fields: dict[str, Any],
    note: str | None,
) -> repository.Spec:
    """The row's spec: ``fields`` (the API's names) over registry.task's defaults."""
    cron = schedule if isinstance(schedule, Cron) else None
    backoff = _seconds(fields.get("retry_backoff")) or timedelta(seconds=10)
    backoff_max = _seconds(fields.get("retry_backoff_max")) or timedelta(hours=1)
    return repository.Spec(
        task=definition.name,
        params=params,
        interval=schedule.nominal_interval,
        function_name=definition.function_name,
        schedule=cron.expression if cron else None,
        timezone=cron.timezone if cron else None,
        missed=fields.get("missed") or "coalesce",
        overlap=fields.get("overlap") or "skip",
        timeout=_seconds(fields.get("timeout")),
        max_attempts=fields.get("max_attempts") or 1,
        retry_backoff=backoff,
        retry_backoff_max=max(backoff, backoff_max),
        grace=default_grace(schedule),
        note=note,
    )


def _first_run(schedule: Schedule, now: datetime) -> datetime | None:
    """A cron schedule's first slot after now; None: an interval one is due at once."""
    return schedule.first_after(now) if isinstance(schedule, Cron) else None


async def _shown(db: asyncpg.Connection, name: str, live_window: timedelta) -> dict[str, Any]:
    found = await repository.get_schedule(db, name, live_window)
    if found is None:
        raise ScheduleNotFoundError(name)
    return _state(found)


def _state(found: dict[str, Any]) -> dict[str, Any]:
    found["state"] = (
        "paused" if not found["enabled"] else "orphaned" if found["orphaned"] else "active"
    )
    if found["cron"] is not None:
        found["every"] = None
    return found


@needs_schedules
async def create(
    pool: ConnectionPool,
    registry: Registry,
    caller: Caller,
    asked: ScheduleCreate,
    live_window: timedelta,
    create_key: str | None = None,
) -> dict[str, Any]:
    """The schedule made; with ``create_key`` (Idempotency-Key), a retry of the create that
    made it answers it again (as it is now) instead of 409."""
    definition = _task(registry, asked.task)
    params = _params(definition, asked.params)
    schedule = _schedule(asked.every, asked.cron, asked.tz)
    spec = _spec(definition, schedule, params, asked.model_dump(), asked.note)
    async with pool.transaction() as db:
        now = await repository.database_now(db)
        made = await repository.create_schedule(
            db,
            asked.name,
            spec,
            _first_run(schedule, now),
            asked.enabled,
            caller.api_key_id,
            create_key,
        )
        if made is None:
            if create_key is not None and await repository.made_with_key(
                db, asked.name, caller.api_key_id, create_key
            ):
                return await _shown(db, asked.name, live_window)
            raise ScheduleExistsError(asked.name)
        await repository.record_action(db, made, "create", caller.api_key_id, asked.note)
        await repository.wake(db)
        return await _shown(db, asked.name, live_window)


@needs_schedules
async def read(pool: ConnectionPool, name: str, live_window: timedelta) -> dict[str, Any]:
    async with pool.transaction() as db:
        return await _shown(db, name, live_window)


@needs_schedules
async def listing(
    pool: ConnectionPool,
    live_window: timedelta,
    task: str | None,
    source: str | None,
    enabled: bool | None,
    after: str | None,
    limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    async with pool.transaction() as db:
        rows = await repository.list_schedules(db, live_window, task, source, enabled, after, limit)
    found = [_state(r) for r in rows]
    return found, found[-1]["name"] if len(found) == limit else None


async def _locked(db: asyncpg.Connection, name: str) -> repository.Locked:
    found = await repository.lock_schedule(db, name)
    if found is None:
        raise ScheduleNotFoundError(name)
    return found


@needs_schedules
async def change(
    pool: ConnectionPool,
    registry: Registry,
    caller: Caller,
    name: str,
    version: int,
    asked: SchedulePatch,
    live_window: timedelta,
) -> dict[str, Any]:
    given = asked.model_fields_set
    async with pool.transaction() as db:
        row = await _locked(db, name)
        if row.source == "code":
            raise ManagedByCodeError(name)
        if row.version != version:
            raise VersionMismatchError(name, version, row.version)
        current = await _shown(db, name, live_window)
        fields = {**current, **asked.model_dump(exclude_unset=True)}
        if "every" in given and asked.every is not None:
            fields["cron"] = fields["tz"] = None
        elif "cron" in given and asked.cron is not None:
            fields["every"] = None
            fields["tz"] = asked.tz if "tz" in given else current["tz"]
        definition = _task(registry, fields["task"])
        params = _params(definition, fields["params"])
        schedule = _schedule(fields["every"], fields["cron"], fields["tz"])
        spec = _spec(definition, schedule, params, fields, fields["note"])
        replan = (spec.interval, spec.schedule, spec.timezone) != (
            row.interval,
            row.schedule,
            row.timezone,
        )
        dropped = (replan or params != current["params"] or spec.task != row.task) and (
            row.retry_at is not None
        )
        await repository.change_schedule(
            db,
            row.id,
            spec,
            replan=replan,
            first_run=_first_run(schedule, row.now),
            drop_retry=dropped,
            api_key=caller.api_key_id,
        )
        note = f"version {row.version + 1}"
        if dropped:
            note += (
                f": dropped the pending retry (attempt {row.retry_attempt} of the slot "
                f"{row.retry_slot.isoformat() if row.retry_slot else '?'}) of version {row.version}"
            )
        await repository.record_action(db, row.id, "change", caller.api_key_id, note)
        await repository.wake(db)
        return await _shown(db, name, live_window)


@needs_schedules
async def delete(pool: ConnectionPool, caller: Caller, name: str, version: int | None) -> None:
    async with pool.transaction() as db:
        row = await _locked(db, name)
        if row.source == "code":
            raise ManagedByCodeError(name)
        if version is not None and row.version != version:
            raise VersionMismatchError(name, version, row.version)
        await repository.delete_schedule(db, row.id, caller.api_key_id)
        await repository.record_action(db, row.id, "delete", caller.api_key_id, None)


@needs_schedules
async def pause(
    pool: ConnectionPool, caller: Caller, name: str, note: str | None, live_window: timedelta
) -> dict[str, Any]:
    async with pool.transaction() as db:
        row = await _locked(db, name)
        await repository.pause_schedule(db, row.id)
        await repository.record_action(db, row.id, "pause", caller.api_key_id, note)
        return await _shown(db, name, live_window)


@needs_schedules
async def resume(
    pool: ConnectionPool, caller: Caller, name: str, live_window: timedelta
) -> dict[str, Any]:
    """From the next slot of its schedule, without replaying missed ones (nor a retry
    pending from before the pause)."""
    async with pool.transaction() as db:
        row = await _locked(db, name)
        schedule = _schedule_of_row(row)
        next_run_at = row.next_run_at
        if next_run_at is None:
            next_run_at = schedule.first_after(row.now, row.now)
        elif next_run_at < row.now:
            next_run_at = schedule.first_after(row.now, next_run_at)
        await repository.resume_schedule(db, row.id, next_run_at)
        await repository.record_action(db, row.id, "resume", caller.api_key_id, None)
        await repository.wake(db)
        return await _shown(db, name, live_window)


def _schedule_of_row(row: repository.Locked) -> Schedule:
    if row.schedule is None:
        return Every(row.interval)
    return Cron(row.schedule, row.timezone or "UTC")


@needs_schedules
async def run_now(
    pool: ConnectionPool,
    registry: Registry,
    caller: Caller,
    name: str,
    params: dict[str, Any] | None,
    live_window: timedelta,
) -> dict[str, Any]:
    async with pool.transaction() as db:
        row = await _locked(db, name)
        checked = None if params is None else _params(_task(registry, row.task), params)
        if not row.enabled:
            raise SchedulePausedError(name)
        if row.manual_at is not None:
            raise AlreadyBufferedError(name)
        if row.is_running and row.overlap == "skip":
            raise AlreadyRunningError(name)
        await repository.run_schedule(db, row.id, checked)
        note = None if checked is None else json.dumps(checked, separators=(",", ":"))[:500]
        await repository.record_action(db, row.id, "run", caller.api_key_id, note)
        await repository.wake(db)
        return await _shown(db, name, live_window)


@needs_schedules
async def history(
    pool: ConnectionPool, name: str, limit: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    async with pool.transaction() as db:
        found = await repository.schedule_history(db, name, limit)
    if found is None:
        raise ScheduleNotFoundError(name)
    return found
