"""``/schedules``: schedules as data over HTTP (their rules in catalog.py)."""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated, Any, TypeVar

from fastapi import APIRouter, FastAPI, Header, Path, Query, Request, Response
from pydantic import BaseModel

from tandem.core.dependencies import CurrentCaller, CurrentInstance
from tandem.core.openapi import (
    DATABASE_UNAVAILABLE,
    OUTCOME_UNKNOWN,
    error_responses,
    json_request_body,
)
from tandem.scheduler import catalog
from tandem.scheduler.registry import Registry
from tandem.scheduler.schemas import (
    Schedule,
    ScheduleAction,
    ScheduleCreate,
    ScheduleHistory,
    ScheduleList,
    SchedulePatch,
    SchedulePause,
    ScheduleRun,
    ScheduleRunRecord,
)
from tandem.wallet.schemas import (
    BODY_NOT_JSON,
    BODY_TOO_LARGE,
    IDEMPOTENCY_KEY_HEADER,
    parse_idempotency_key,
    parse_request_body,
)

ModelT = TypeVar("ModelT", bound=BaseModel)
# The largest body of a schedule route: 16 KiB of params and the rest of a schedule.
SCHEDULE_BODY_MAX = 20 * 1024

router = APIRouter(tags=["schedules"])

_NAME = Path(description="A schedule's name.", max_length=200)
_BODY_ERRORS = (BODY_NOT_JSON, BODY_TOO_LARGE, (422, "validation_error", "malformed input"))
_NOT_FOUND = (404, "schedule_not_found", "no schedule has this name")
_UNBOUND = (403, "forbidden", "a key bound to users, or without the scope")
_UNAVAILABLE = (503, "schedules_unavailable", "the database is below migration 0020")
_SPEC_ERRORS = (
    (422, "unknown_task", "no task of that name in this release's code"),
    (422, "invalid_params", "params the task's model refuses (field paths in details)"),
    (422, "invalid_schedule", "not one of every and cron, a bad cron expression or zone"),
)


def registry_of(app: FastAPI) -> Registry:
    """The tasks this process has code for (create_app attaches them)."""
    registry = app.state.task_registry
    assert isinstance(registry, Registry), "create_app() attaches it"
    return registry


def _window(instance: CurrentInstance) -> timedelta:
    return timedelta(seconds=instance.settings.scheduler_live_window)


async def _body(
    request: Request, model: type[ModelT], what: str, *, optional: bool = False
) -> ModelT:
    return await parse_request_body(
        request.stream(),
        request.headers.getlist("content-type"),
        model,
        what,
        SCHEDULE_BODY_MAX,
        optional=optional,
    )


def _shown(found: dict[str, Any]) -> Schedule:
    return Schedule.model_validate(found)


@router.post(
    "/schedules",
    response_model=Schedule,
    status_code=201,
    summary="Create a schedule of a task, with its params",
    description=(
        "Runs `task` with `params` (validated by the task's model) every `every` seconds, or "
        "at the times of `cron` in `tz`. Due at once (every) or at its first slot (cron); "
        "every instance's claimer is woken. Names: `[A-Za-z0-9._-]{1,100}`. With an "
        "`Idempotency-Key`, a retry of the create that made the schedule answers 201 with it "
        "again (as it is now)."
    ),
    responses=error_responses(
        (409, "schedule_exists", "a schedule of this name exists (code or API)"),
        *_SPEC_ERRORS,
        _UNBOUND,
        *_BODY_ERRORS,
        _UNAVAILABLE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(ScheduleCreate),
)
async def create_schedule(
    request: Request, instance: CurrentInstance, caller: CurrentCaller
) -> Schedule:
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    asked = await _body(request, ScheduleCreate, "schedule")
    made = await catalog.create(
        instance.database.pool, registry_of(request.app), caller, asked, _window(instance), key
    )
    return _shown(made)


@router.get(
    "/schedules",
    response_model=ScheduleList,
    summary="Schedules (code and API), by name",
    responses=error_responses(
        (422, "validation_error", "bad limit or filter"),
        _UNBOUND,
        _UNAVAILABLE,
        DATABASE_UNAVAILABLE,
    ),
)
async def list_schedules(
    instance: CurrentInstance,
    task: Annotated[str | None, Query(max_length=200)] = None,
    source: Annotated[str | None, Query(pattern="^(code|api)$")] = None,
    enabled: Annotated[bool | None, Query()] = None,
    after: Annotated[str | None, Query(max_length=200, description="`next` of a page.")] = None,
    limit: Annotated[int, Query(ge=1, le=catalog.PAGE_MAX)] = 50,
) -> ScheduleList:
    found, following = await catalog.listing(
        instance.database.pool, _window(instance), task, source, enabled, after, limit
    )
    return ScheduleList(schedules=[_shown(f) for f in found], next=following)


@router.get(
    "/schedules/{name}",
    response_model=Schedule,
    summary="A schedule",
    responses=error_responses(_NOT_FOUND, _UNBOUND, _UNAVAILABLE, DATABASE_UNAVAILABLE),
)
async def read_schedule(instance: CurrentInstance, name: Annotated[str, _NAME]) -> Schedule:
    return _shown(await catalog.read(instance.database.pool, name, _window(instance)))


@router.patch(
    "/schedules/{name}",
    response_model=Schedule,
    summary="Change a schedule (If-Match: its version)",
    description=(
        "Only the fields given change (`every` and `cron` replace each other); the version "
        "goes up by one. A change of spec replans the next slot; a change of spec or params "
        "drops a pending retry of the old version (the history's actions say so)."
    ),
    responses=error_responses(
        _NOT_FOUND,
        (409, "managed_by_code", "a code schedule: change it in code"),
        (412, "version_mismatch", "another change came first: read it again"),
        (428, "version_required", "no If-Match, or not a version"),
        *_SPEC_ERRORS,
        _UNBOUND,
        *_BODY_ERRORS,
        _UNAVAILABLE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(SchedulePatch),
)
async def change_schedule(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    name: Annotated[str, _NAME],
    if_match: Annotated[str | None, Header(description="The version changed.")] = None,
) -> Schedule:
    version = catalog.parse_version(if_match)
    asked = await _body(request, SchedulePatch, "change")
    changed = await catalog.change(
        instance.database.pool,
        registry_of(request.app),
        caller,
        name,
        version,
        asked,
        _window(instance),
    )
    return _shown(changed)


@router.delete(
    "/schedules/{name}",
    status_code=204,
    summary="Delete a schedule: no new run; a run going finishes; its history stays",
    responses=error_responses(
        _NOT_FOUND,
        (409, "managed_by_code", "a code schedule: remove it from the code"),
        (412, "version_mismatch", "If-Match given, and another change came first"),
        (428, "version_required", "If-Match given, but not a version"),
        _UNBOUND,
        _UNAVAILABLE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
)
async def delete_schedule(
    instance: CurrentInstance,
    caller: CurrentCaller,
    name: Annotated[str, _NAME],
    if_match: Annotated[str | None, Header()] = None,
) -> Response:
    version = None if if_match is None else catalog.parse_version(if_match)
    await catalog.delete(instance.database.pool, caller, name, version)
    return Response(status_code=204)


@router.get(
    "/schedules/{name}/history",
    response_model=ScheduleHistory,
    summary="A schedule's runs and the commands sent to it, newest first (a deleted one's too)",
    responses=error_responses(_NOT_FOUND, _UNBOUND, _UNAVAILABLE, DATABASE_UNAVAILABLE),
)
async def schedule_history(
    instance: CurrentInstance,
    name: Annotated[str, _NAME],
    limit: Annotated[int, Query(ge=1, le=200)] = 50,
) -> ScheduleHistory:
    runs, actions = await catalog.history(instance.database.pool, name, limit)
    return ScheduleHistory(
        name=name,
        runs=[ScheduleRunRecord.model_validate(r) for r in runs],
        actions=[ScheduleAction.model_validate(a) for a in actions],
    )


@router.post(
    "/schedules/{name}/pause",
    response_model=Schedule,
    summary="No new runs until resumed (a run going finishes); the note goes to the history",
    responses=error_responses(
        _NOT_FOUND, _UNBOUND, *_BODY_ERRORS, _UNAVAILABLE, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN
    ),
    openapi_extra=json_request_body(SchedulePause, required=False),
)
async def pause_schedule(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    name: Annotated[str, _NAME],
) -> Schedule:
    asked = await _body(request, SchedulePause, "pause", optional=True)
    paused = await catalog.pause(
        instance.database.pool, caller, name, asked.note, _window(instance)
    )
    return _shown(paused)


@router.post(
    "/schedules/{name}/resume",
    response_model=Schedule,
    summary="Run again from the next slot (no burst of missed runs)",
    responses=error_responses(
        _NOT_FOUND, _UNBOUND, _UNAVAILABLE, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN
    ),
)
async def resume_schedule(
    instance: CurrentInstance, caller: CurrentCaller, name: Annotated[str, _NAME]
) -> Schedule:
    return _shown(await catalog.resume(instance.database.pool, caller, name, _window(instance)))


@router.post(
    "/schedules/{name}/run",
    response_model=Schedule,
    summary="Run now, with these params (null: the schedule's)",
    description=(
        "While a run is going: overlap `skip` answers 409 already_running; `buffer_one` runs "
        "once right after (a second run-now: 409 already_buffered); `cancel_other` stops the "
        "running one and starts once it has stopped. Never two at once."
    ),
    responses=error_responses(
        _NOT_FOUND,
        (409, "already_running", "a run is going and the overlap policy is skip"),
        (409, "already_buffered", "a run asked for earlier has not started yet"),
        (409, "schedule_paused", "resume it first"),
        (422, "invalid_params", "params the task's model refuses (field paths in details)"),
        _UNBOUND,
        *_BODY_ERRORS,
        _UNAVAILABLE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(ScheduleRun, required=False),
)
async def run_schedule(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    name: Annotated[str, _NAME],
) -> Schedule:
    asked = await _body(request, ScheduleRun, "run", optional=True)
    ran = await catalog.run_now(
        instance.database.pool,
        registry_of(request.app),
        caller,
        name,
        asked.params,
        _window(instance),
    )
    return _shown(ran)
