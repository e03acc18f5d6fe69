"""The change stream's routes: ``GET /events`` (webhook endpoints: webhooks.py)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, FastAPI, Query, Request, Response

from tandem.core.dependencies import CurrentCaller, Db
from tandem.core.errors import ValidationError
from tandem.core.ids import id_in
from tandem.core.openapi import DATABASE_UNAVAILABLE, error_responses
from tandem.events import service
from tandem.events.models import EVENT_TYPES
from tandem.events.schemas import EventPage
from tandem.events.service import StreamWatch

router = APIRouter(tags=["events"])


def stream_watch_of(app: FastAPI) -> StreamWatch:
    """The process's watch of the stream's end (create_app attaches it)."""
    watch = app.state.events_watch
    assert isinstance(watch, StreamWatch), "create_app() attaches it"
    return watch


@router.get(
    "/events",
    response_model=EventPage,
    summary="The change stream, after a cursor",
    description=(
        "Every committed change of money and every failed cron run, in one order shared by "
        "every reader (each user's events in that user's order), never skipping one. Pass "
        "`next` as `after` for what follows; without `after` the oldest kept event comes "
        "first. `types` (comma-separated) and `userId` filter. With `wait` (seconds, up to "
        "30) the answer waits until an event arrives. A key bound to users reads only their "
        f"events, and of a transfer only its own leg. Types: {', '.join(EVENT_TYPES)}."
    ),
    responses=error_responses(
        (400, "invalid_cursor", "a cursor this stream did not give"),
        (404, "user_not_found", "a userId the key is not bound to"),
        (410, "cursor_expired", "the events after the cursor were deleted (retention)"),
        (422, "unknown_event_type", "an unknown type in `types`"),
        (422, "validation_error", "bad limit, wait or userId"),
        (503, "events_unavailable", "the database is below the change stream's migration"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_events(
    request: Request,
    db: Db,
    caller: CurrentCaller,
    after: Annotated[str | None, Query(description="A cursor: the `next` of a page.")] = None,
    types: Annotated[str | None, Query(description="Event types, comma-separated.")] = None,
    user_id: Annotated[str | None, Query(alias="userId")] = None,
    limit: Annotated[int, Query(ge=1, le=service.PAGE_MAX, strict=False)] = service.PAGE_DEFAULT,
    wait: Annotated[float, Query(ge=0, le=service.WAIT_MAX, allow_inf_nan=False)] = 0,
) -> Response:
    cursor = None if after is None else service.parse_cursor(after)
    wanted = service.parse_types(types)
    user = None
    if user_id is not None:
        user = id_in(user_id)
        if user is None:
            raise ValidationError(
                "userId must be a positive 64-bit integer",
                details=[{"field": "userId", "type": "int_type", "message": "invalid userId"}],
            )
    if wait > 0:
        watch = stream_watch_of(request.app)
        page = await service.wait_for_events(
            db.pool, watch, caller, cursor, wanted, user, limit, wait
        )
    else:
        page = await service.read_events(db.pool, caller, cursor, wanted, user, limit)
    return Response(page.to_json_bytes(), media_type="application/json")
