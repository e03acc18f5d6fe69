"""``POST /keys``: a service (an unbound key with ``keys:write``) mints a key bound to its end
user's account, for that user's own client. The owner's function decides what it may be
(tandem/access/sql/create_bound_key_v1.sql); the token is shown once."""

from __future__ import annotations

from fastapi import APIRouter, Request, status
from fastapi.responses import JSONResponse

from tandem.access import service
from tandem.access.errors import REFUSALS
from tandem.access.schemas import BoundKey, BoundKeyCreate
from tandem.core.dependencies import CurrentCaller, CurrentInstance
from tandem.core.openapi import (
    DATABASE_UNAVAILABLE,
    OUTCOME_UNKNOWN,
    error_responses,
    json_request_body,
)

# The wallet's strict JSON body parser (415, 413, 422 as for every body the API takes).
from tandem.wallet.schemas import (
    BODY_NOT_JSON,
    BODY_TOO_LARGE,
    content_type_of,
    parse_body,
    read_body,
)

router = APIRouter(tags=["keys"])


@router.post(
    "/keys",
    response_model=BoundKey,
    status_code=status.HTTP_201_CREATED,
    summary="Make a key bound to users (for an end user's client)",
    description=(
        "A key that may touch only `userIds`' money, with scopes among `wallet:read` and "
        "`wallet:write` and within the calling key's, for at most 24 hours (`expiresIn`, "
        "seconds; default 86400). The token is in this answer only. Every instance accepts "
        "it at once. Revoke it with `tandem keys revoke NAME`."
    ),
    responses=error_responses(
        # Every refusal of the owner's function, as the client is told it.
        *((error.status_code, error.code, message) for error, message in REFUSALS.values()),
        (422, "validation_error", "malformed input"),
        BODY_NOT_JSON,
        BODY_TOO_LARGE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(BoundKeyCreate),
)
async def create_key(
    request: Request, instance: CurrentInstance, caller: CurrentCaller
) -> JSONResponse:
    asked = parse_body(
        BoundKeyCreate,
        await read_body(request.stream()),
        content_type_of(request.headers.getlist("content-type")),
        "key",
    )
    made = await service.create_bound_key(
        instance.database.pool,
        caller,
        asked.name,
        asked.scopes,
        asked.user_ids,
        asked.expires_in,
    )
    body = BoundKey(
        name=made.name,
        token=made.token,
        scopes=made.scopes,
        user_ids=made.users,
        expires_at=made.expires_at,
    )
    # The token is a secret: no cache may keep this answer.
    return JSONResponse(
        body.model_dump(mode="json", by_alias=True),
        status_code=201,
        headers={"Cache-Control": "no-store"},
    )
