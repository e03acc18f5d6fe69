"""The change stream's routes: ``GET /events`` and the webhook endpoints' (their rules in
webhooks.py)."""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import APIRouter, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from tandem.core.dependencies import CurrentCaller, CurrentInstance, Db
from tandem.core.errors import ValidationError
from tandem.core.ids import INT64_MAX, id_in
from tandem.core.openapi import (
    DATABASE_UNAVAILABLE,
    OUTCOME_UNKNOWN,
    error_responses,
    json_request_body,
)
from tandem.events import service, webhooks
from tandem.events.models import EVENT_TYPES
from tandem.events.repository import Endpoint
from tandem.events.schemas import (
    EndpointCreate,
    EndpointUpdate,
    EventPage,
    Replay,
    SecretRotation,
    WebhookDelivery,
    WebhookDeliveryList,
    WebhookEndpoint,
    WebhookEndpointList,
)
from tandem.events.service import StreamWatch

# The wallet's strict JSON body parser (415, 413, 422 as for every body the API takes).
from tandem.wallet.schemas import BODY_NOT_JSON, BODY_TOO_LARGE, parse_request_body

ModelT = TypeVar("ModelT", bound=BaseModel)
# The largest body of a webhook route: a URL of the longest (2048 characters, each up to
# twelve bytes as JSON escapes: a surrogate pair) and the longest list of types fit; anything
# larger is 413.
WEBHOOK_BODY_MAX = 32 * 1024
# The largest page of delivery records.
DELIVERIES_PAGE_MAX = 200

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
        "30, or TANDEM_EVENTS_WAIT_MAX) the answer waits until an event arrives. A key bound "
        "to users reads only their events, and of a transfer only its own leg. Types: "
        f"{', '.join(EVENT_TYPES)}."
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
    instance: CurrentInstance,
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
    wait = min(wait, instance.settings.events_wait_max)
    if wait > 0:
        watch = stream_watch_of(request.app)
        page = await service.wait_for_events(
            instance.database.pool, watch, caller, cursor, wanted, user, limit, wait
        )
    else:
        page = await service.read_events(
            instance.database.pool, caller, cursor, wanted, user, limit
        )
    return Response(page.to_json_bytes(), media_type="application/json")


# --- webhook endpoints -------------------------------------------------------------------

_ENDPOINT_ID = Path(alias="endpointId", description="A webhook endpoint's id.")
_BODY_ERRORS = (BODY_NOT_JSON, BODY_TOO_LARGE, (422, "validation_error", "malformed input"))
_NOT_FOUND = (404, "webhook_endpoint_not_found", "no such endpoint")
_UNBOUND = (403, "forbidden", "a key bound to users, or without the scope")


def _endpoint_id(raw: str) -> int:
    parsed = id_in(raw)
    if parsed is None:
        raise ValidationError(
            "endpointId must be a positive 64-bit integer",
            details=[{"field": "endpointId", "type": "int_type", "message": "invalid id"}],
        )
    return parsed


async def _body(request: Request, model: type[ModelT], what: str) -> ModelT:
    return await parse_request_body(
        request.stream(), request.headers.getlist("content-type"), model, what, WEBHOOK_BODY_MAX
    )


def _shown(found: Endpoint, secret: str | None = None) -> WebhookEndpoint:
    return WebhookEndpoint(
        id=found.id,
        url=found.url,
        types=found.types,
        enabled=found.enabled,
        state=found.state,
        cursor=str(found.position),
        attempts=found.attempts,
        failing_since=found.failing_since,
        next_attempt_at=found.next_attempt_at,
        created_at=found.created_at,
        updated_at=found.updated_at,
        previous_secret_until=found.previous_secret_until,
        secret=secret,
    )


def _secret_answer(found: Endpoint, secret: str, status_code: int) -> JSONResponse:
    # The secret is shown once: no cache may keep this answer.
    return JSONResponse(
        _shown(found, secret).model_dump(mode="json", by_alias=True),
        status_code=status_code,
        headers={"Cache-Control": "no-store"},
    )


@router.post(
    "/webhook-endpoints",
    response_model=WebhookEndpoint,
    status_code=201,
    summary="Subscribe a URL to the change stream",
    description=(
        "Events committed after it was created are sent to `url` (POST, JSON, signed as the "
        "Standard Webhooks specification says: `webhook-id`, `webhook-timestamp`, "
        "`webhook-signature`), in stream order, each once acknowledged (2xx) before the next; "
        "retried with backoff. The signing `secret` is in this answer only. Loopback, "
        "link-local and private targets are refused unless TANDEM_WEBHOOKS_ALLOW_PRIVATE."
    ),
    responses=error_responses(
        (422, "webhook_url_refused", "not http(s), credentials, or a private target"),
        (422, "unknown_event_type", "an unknown type in `types`"),
        _UNBOUND,
        *_BODY_ERRORS,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(EndpointCreate),
)
async def create_endpoint(
    request: Request, instance: CurrentInstance, caller: CurrentCaller
) -> JSONResponse:
    asked = await _body(request, EndpointCreate, "webhook endpoint")
    made, secret = await webhooks.create_endpoint(
        instance.database.pool, instance.settings, caller, asked.url, asked.types
    )
    return _secret_answer(made, secret, 201)


@router.get(
    "/webhook-endpoints",
    response_model=WebhookEndpointList,
    summary="Every webhook endpoint",
    responses=error_responses(_UNBOUND, DATABASE_UNAVAILABLE),
)
async def list_endpoints(db: Db, caller: CurrentCaller) -> WebhookEndpointList:
    found = await webhooks.list_endpoints(db.pool, caller)
    return WebhookEndpointList(endpoints=[_shown(e) for e in found])


@router.get(
    "/webhook-endpoints/{endpointId}",
    response_model=WebhookEndpoint,
    summary="A webhook endpoint",
    responses=error_responses(_NOT_FOUND, _UNBOUND, DATABASE_UNAVAILABLE),
)
async def read_endpoint(
    db: Db, caller: CurrentCaller, endpoint_id: Annotated[str, _ENDPOINT_ID]
) -> WebhookEndpoint:
    return _shown(await webhooks.get_endpoint(db.pool, caller, _endpoint_id(endpoint_id)))


@router.patch(
    "/webhook-endpoints/{endpointId}",
    response_model=WebhookEndpoint,
    summary="Change an endpoint's URL or types, or disable or enable it",
    description="Enabling a failing endpoint starts it afresh from its cursor.",
    responses=error_responses(
        _NOT_FOUND,
        (422, "webhook_url_refused", "not http(s), credentials, or a private target"),
        (422, "unknown_event_type", "an unknown type in `types`"),
        _UNBOUND,
        *_BODY_ERRORS,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(EndpointUpdate),
)
async def update_endpoint(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    endpoint_id: Annotated[str, _ENDPOINT_ID],
) -> WebhookEndpoint:
    endpoint = _endpoint_id(endpoint_id)
    asked = await _body(request, EndpointUpdate, "change")
    found = await webhooks.update_endpoint(
        instance.database.pool,
        instance.settings,
        caller,
        endpoint,
        asked.url,
        "types" in asked.model_fields_set,
        asked.types,
        asked.enabled,
    )
    return _shown(found)


@router.delete(
    "/webhook-endpoints/{endpointId}",
    status_code=204,
    summary="Delete an endpoint (its delivery records with it)",
    responses=error_responses(_NOT_FOUND, _UNBOUND, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN),
)
async def delete_endpoint(
    db: Db, caller: CurrentCaller, endpoint_id: Annotated[str, _ENDPOINT_ID]
) -> Response:
    await webhooks.delete_endpoint(db.pool, caller, _endpoint_id(endpoint_id))
    return Response(status_code=204)


@router.post(
    "/webhook-endpoints/{endpointId}/rotate-secret",
    response_model=WebhookEndpoint,
    summary="A new signing secret; the old one keeps signing for `overlap` seconds",
    description=(
        "During the overlap each delivery carries both signatures in `webhook-signature` "
        "(space-separated), so receivers can switch secrets without losing one."
    ),
    responses=error_responses(
        _NOT_FOUND, _UNBOUND, *_BODY_ERRORS, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN
    ),
    openapi_extra=json_request_body(SecretRotation),
)
async def rotate_secret(
    request: Request,
    db: Db,
    caller: CurrentCaller,
    endpoint_id: Annotated[str, _ENDPOINT_ID],
) -> JSONResponse:
    endpoint = _endpoint_id(endpoint_id)
    asked = await _body(request, SecretRotation, "rotation")
    found, secret = await webhooks.rotate_secret(db.pool, caller, endpoint, asked.overlap)
    return _secret_answer(found, secret, 200)


@router.post(
    "/webhook-endpoints/{endpointId}/replay",
    response_model=WebhookEndpoint,
    summary="Send the endpoint's events again, from after a cursor",
    description=(
        "Sets the endpoint's cursor to `from` (a cursor of GET /events) and enables it: its "
        "events after that are sent again, in order (receivers dedupe by `webhook-id`)."
    ),
    responses=error_responses(
        _NOT_FOUND,
        (400, "invalid_cursor", "a cursor this stream did not give"),
        (410, "cursor_expired", "the events after the cursor were deleted (retention)"),
        _UNBOUND,
        *_BODY_ERRORS,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(Replay),
)
async def replay(
    request: Request,
    db: Db,
    caller: CurrentCaller,
    endpoint_id: Annotated[str, _ENDPOINT_ID],
) -> WebhookEndpoint:
    endpoint = _endpoint_id(endpoint_id)
    asked = await _body(request, Replay, "replay")
    return _shown(await webhooks.replay(db.pool, caller, endpoint, asked.from_))


@router.get(
    "/webhook-endpoints/{endpointId}/deliveries",
    response_model=WebhookDeliveryList,
    summary="An endpoint's delivery attempts, newest first",
    responses=error_responses(
        _NOT_FOUND, (422, "validation_error", "bad limit or before"), DATABASE_UNAVAILABLE
    ),
)
async def list_deliveries(
    db: Db,
    caller: CurrentCaller,
    endpoint_id: Annotated[str, _ENDPOINT_ID],
    limit: Annotated[int, Query(ge=1, le=DELIVERIES_PAGE_MAX, strict=False)] = 50,
    before: Annotated[int | None, Query(ge=1, le=INT64_MAX, strict=False)] = None,
) -> WebhookDeliveryList:
    page, next_before = await webhooks.list_deliveries(
        db.pool, caller, _endpoint_id(endpoint_id), before, limit
    )
    return WebhookDeliveryList(
        deliveries=[
            WebhookDelivery(
                id=d.id,
                event_id=d.event_id,
                cursor=str(d.position),
                attempt=d.attempt,
                outcome=d.outcome,
                status_code=d.status_code,
                duration_ms=d.duration_ms,
                error=d.error,
                created_at=d.created_at,
            )
            for d in page
        ],
        next_before=next_before,
    )
