"""Wallet HTTP endpoints.

The two hot endpoints have one implementation (``serve_*`` below) reached two ways: the lean
ASGI path in ``fastpath.py`` (the default) and the FastAPI routes here, which also document
them in the OpenAPI schema. Both parse with the same strict model, raise the same errors and
count the same metrics; the API tests run against both.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Header, Path, Request, Response, status

from tandem.core.dependencies import Db
from tandem.core.errors import AppError
from tandem.core.hotpool import HotPool
from tandem.core.openapi import DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN, error_responses
from tandem.observability.metrics import WALLET_BALANCE_UPDATES
from tandem.wallet import service
from tandem.wallet.schemas import (
    IDEMPOTENCY_KEY_HEADER,
    INT64_MAX,
    Balance,
    UserCreate,
    parse_balance_update,
    parse_idempotency_key,
    parse_user_id,
)
from tandem.wallet.service import BalanceResult

_OUTCOME_OK = WALLET_BALANCE_UPDATES.labels("ok")
_OUTCOME_REPLAYED = WALLET_BALANCE_UPDATES.labels("replayed")


async def serve_balance_update(
    pool: HotPool, body: bytes, raw_idempotency_key: str | None
) -> BalanceResult:
    """Validate, apply, count. Raises AppError subclasses (4xx) for every refusal."""
    try:
        update = parse_balance_update(body)
        key = parse_idempotency_key(raw_idempotency_key)
        result = await service.update_balance(pool, update.user_id, update.amount, key)
    except AppError as error:
        WALLET_BALANCE_UPDATES.labels(error.code).inc()
        raise
    (_OUTCOME_REPLAYED if result.replayed else _OUTCOME_OK).inc()
    return result


async def serve_balance_read(pool: HotPool, raw_user_id: str) -> BalanceResult:
    return await service.get_balance(pool, parse_user_id(raw_user_id))


def balance_body(result: BalanceResult) -> bytes:
    return b'{"userId":%d,"balance":%d}' % (result.user_id, result.balance)


# --- FastAPI routes ------------------------------------------------------------------------

router = APIRouter(tags=["wallet"])


_VALIDATION = (422, "validation_error", "malformed JSON, wrong types, floats, zero or out of range")


@router.post(
    "/balance/update",
    response_model=Balance,
    summary="Add to (or withdraw from) a balance, atomically",
    description=(
        "Adds `amount` (negative: withdrawal) to the user's balance in one atomic statement. "
        "The balance never goes below 0; any number of instances may serve this at once. "
        "With an `Idempotency-Key` header, a retry returns the first outcome and never "
        "applies twice (a replay carries `Idempotent-Replayed: true`). A refusal changes "
        "nothing. A 503 `outcome_unknown` means the change may or may not have been "
        "applied: retry with the same key to learn which."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such user"),
        (409, "insufficient_funds", "the withdrawal would make the balance negative"),
        (409, "balance_limit_exceeded", "the balance would exceed 2^63-1"),
        _VALIDATION,
        (422, "idempotency_key_reused", "the key was used with a different request"),
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra={
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/BalanceUpdate"}}
            },
        }
    },
)
async def update_balance(
    request: Request,
    response: Response,
    db: Db,
    idempotency_key: Annotated[
        str | None,
        Header(
            alias=IDEMPOTENCY_KEY_HEADER,
            description="1-255 visible ASCII characters naming this attempt.",
        ),
    ] = None,
) -> Balance:
    # The raw body goes through the same parser as the lean path (see module docstring).
    result = await serve_balance_update(db.hot, await request.body(), idempotency_key)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return Balance(user_id=result.user_id, balance=result.balance)


@router.get(
    "/balance/{userId}",
    response_model=Balance,
    summary="Read a balance",
    responses=error_responses(
        (404, "user_not_found", "no such user"),
        (422, "validation_error", "bad user id"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_balance(
    db: Db,
    user_id: Annotated[
        str,
        Path(
            alias="userId",
            description="A positive 64-bit integer.",
            json_schema_extra={"type": "integer", "minimum": 1, "maximum": INT64_MAX},
        ),
    ],
) -> Balance:
    result = await serve_balance_read(db.hot, user_id)
    return Balance(user_id=result.user_id, balance=result.balance)


@router.post(
    "/users",
    response_model=Balance,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user",
    description="Creates a user with `balance` (default 10000) and answers its id.",
    responses=error_responses(_VALIDATION, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN),
)
async def create_user(db: Db, payload: Annotated[UserCreate | None, Body()] = None) -> Balance:
    balance = (payload or UserCreate()).balance
    result = await db.transact(lambda session: service.create_user(session, balance))
    return Balance(user_id=result.user_id, balance=result.balance)
