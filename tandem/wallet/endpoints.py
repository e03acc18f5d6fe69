"""Wallet HTTP endpoints.

The two hot endpoints have one implementation (``serve_*`` below) reached two ways: the lean
ASGI path in ``fastpath.py`` (the default) and the FastAPI routes here, which also document
them in the OpenAPI schema. Both parse with the same strict model, raise the same errors and
count the same metrics; the API tests run against both.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Path, Query, Request, Response, status

from tandem.core.dependencies import Db
from tandem.core.errors import AppError, ValidationError
from tandem.core.hotpool import HotPool
from tandem.core.openapi import DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN, error_responses
from tandem.observability.metrics import WALLET_BALANCE_UPDATES
from tandem.wallet import service
from tandem.wallet.repository import Transfer as TransferRow
from tandem.wallet.schemas import (
    IDEMPOTENCY_KEY_HEADER,
    INT64_MAX,
    Balance,
    BalanceAt,
    BalanceUpdated,
    History,
    HistoryEntry,
    Transfer,
    TransferCreate,
    UserCreate,
    parse_balance_update,
    parse_body,
    parse_idempotency_key,
    parse_instant,
    parse_user_id,
)
from tandem.wallet.service import BalanceResult

_OUTCOME_OK = WALLET_BALANCE_UPDATES.labels("ok")
_OUTCOME_REPLAYED = WALLET_BALANCE_UPDATES.labels("replayed")


async def serve_balance_update(
    pool: HotPool, body: bytes, content_type: str | None, idempotency_keys: list[str]
) -> BalanceResult:
    """Validate, apply, count. Raises AppError subclasses (4xx) for every refusal."""
    try:
        update = parse_balance_update(body, content_type)
        key = parse_idempotency_key(idempotency_keys)
        result = await service.update_balance(
            pool, update.user_id, update.amount, key, update.reference
        )
    except AppError as error:
        WALLET_BALANCE_UPDATES.labels(error.code).inc()
        raise
    (_OUTCOME_REPLAYED if result.replayed else _OUTCOME_OK).inc()
    return result


async def serve_balance_read(pool: HotPool, raw_user_id: str, query: bytes) -> BalanceResult:
    """The balance now, or at ``?at=<RFC 3339 instant>``."""
    user_id = parse_user_id(raw_user_id)
    at = parse_at(query)
    return await service.get_balance(pool, user_id, at)


def parse_at(query: bytes) -> datetime | None:
    pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
    values = [value for name, value in pairs if name == "at"]
    if not values:
        return None
    if len(values) > 1:
        raise ValidationError(
            "at given more than once",
            details=[{"field": "at", "type": "duplicate", "message": "given more than once"}],
        )
    return parse_instant(values[0])


def balance_body(result: BalanceResult, at: datetime | None = None) -> bytes:
    if result.entry_id is not None:
        return b'{"userId":%d,"balance":%d,"entryId":%d}' % (
            result.user_id,
            result.balance,
            result.entry_id,
        )
    if at is not None:
        return b'{"userId":%d,"balance":%d,"at":"%s"}' % (
            result.user_id,
            result.balance,
            at.isoformat().encode(),
        )
    return b'{"userId":%d,"balance":%d}' % (result.user_id, result.balance)


# --- FastAPI routes ------------------------------------------------------------------------

router = APIRouter(tags=["wallet"])


_VALIDATION = (422, "validation_error", "malformed JSON, wrong types, floats, zero or out of range")


_USER_ID_PATH = Path(
    alias="userId",
    description="A positive 64-bit integer.",
    json_schema_extra={"type": "integer", "minimum": 1, "maximum": INT64_MAX},
)
_KEY_HEADER = Header(
    alias=IDEMPOTENCY_KEY_HEADER,
    description="1-255 visible ASCII characters naming this attempt (at most one).",
)
_JSON_415 = (415, "unsupported_media_type", "the body is not declared `application/json`")


def _json_body(model: str) -> dict[str, Any]:
    """The request body of a route that parses its raw bytes (parse_body), by reference."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{model}"}}},
        }
    }


def _json(body: bytes, status_code: int = 200, replayed: bool = False) -> Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return Response(body, status_code, headers=headers, media_type="application/json")


@router.post(
    "/balance/update",
    response_model=BalanceUpdated,
    summary="Add to (or withdraw from) a balance, atomically",
    description=(
        "Adds `amount` (negative: withdrawal) to the user's balance and journals it, in one "
        "atomic statement. The balance never goes below 0; any number of instances may serve "
        "this at once. With an `Idempotency-Key` header, a retry returns the first outcome "
        "and never applies twice (a replay carries `Idempotent-Replayed: true`), also long "
        "after: an applied change keeps its key in the journal. A refusal changes nothing. "
        "A 503 `outcome_unknown` means the change may or may not have been applied: retry "
        "with the same key to learn which."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such user"),
        (409, "insufficient_funds", "the withdrawal would make the balance negative"),
        (409, "balance_limit_exceeded", "the balance would exceed 2^63-1"),
        _VALIDATION,
        (422, "idempotency_key_reused", "the key was used with a different request"),
        _JSON_415,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=_json_body("BalanceUpdate"),
)
async def update_balance(
    request: Request, db: Db, idempotency_key: Annotated[str | None, _KEY_HEADER] = None
) -> Response:
    # The raw body goes through the same parser as the lean path (see module docstring).
    result = await serve_balance_update(
        db.hot,
        await request.body(),
        request.headers.get("content-type"),
        request.headers.getlist(IDEMPOTENCY_KEY_HEADER),
    )
    return _json(balance_body(result), replayed=result.replayed)


@router.get(
    "/balance/{userId}",
    response_model=Balance | BalanceAt,
    summary="Read a balance, now or at an instant",
    description=(
        "With `at` (an RFC 3339 instant), the balance after the user's last journal entry at "
        "or before it; before the user's opening entry there is none: 404 `user_not_found`."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such user (at that instant)"),
        (422, "validation_error", "bad user id or instant"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_balance(
    request: Request,
    db: Db,
    user_id: Annotated[str, _USER_ID_PATH],
    at: Annotated[
        str | None, Query(description="An RFC 3339 instant, e.g. 2026-12-01T12:00:00Z.")
    ] = None,
) -> Response:
    query = request.scope.get("query_string", b"")
    result = await serve_balance_read(db.hot, user_id, query)
    return _json(balance_body(result, parse_at(query)))


@router.get(
    "/balance/{userId}/history",
    response_model=History,
    summary="A user's journal, newest first",
    description=(
        "Keyset-paginated: pass `nextBefore` of a page as `before` for the next one; entries "
        "written meanwhile never shift a page."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such user"),
        (422, "validation_error", "bad user id, limit or before"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_history(
    db: Db,
    user_id: Annotated[str, _USER_ID_PATH],
    limit: Annotated[int, Query(ge=1, le=1000, strict=False)] = 100,
    before: Annotated[int | None, Query(ge=1, le=INT64_MAX, strict=False)] = None,
) -> History:
    found = await service.history(db.hot, parse_user_id(user_id), limit, before)
    return History(
        user_id=found.user_id,
        entries=[HistoryEntry.model_validate(e._asdict()) for e in found.entries],
        next_before=found.next_before,
    )


@router.post(
    "/transfers",
    response_model=Transfer,
    status_code=status.HTTP_201_CREATED,
    summary="Move an amount from one user to another, atomically",
    description=(
        "Both balances change in one transaction, journaled as two entries sharing the "
        "transfer id; the payer's balance never goes below 0, and transfers in opposite "
        "directions at once never deadlock. `Idempotency-Key` as for balance updates."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such user (details say which)"),
        (409, "insufficient_funds", "the payer's balance is too low"),
        (409, "balance_limit_exceeded", "the payee's balance would exceed 2^63-1"),
        (422, "validation_error", "malformed input, the same user twice, or amount <= 0"),
        (422, "idempotency_key_reused", "the key was used with a different request"),
        _JSON_415,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=_json_body("TransferCreate"),
)
async def create_transfer(
    request: Request, db: Db, idempotency_key: Annotated[str | None, _KEY_HEADER] = None
) -> Response:
    asked = parse_body(
        TransferCreate, await request.body(), request.headers.get("content-type"), "transfer"
    )
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    result = await service.transfer(
        db.hot, asked.from_user_id, asked.to_user_id, asked.amount, key, asked.reference
    )
    return _json(_transfer_body(result.transfer), 201, replayed=result.replayed)


@router.get(
    "/transfers/{transferId}",
    response_model=Transfer,
    summary="Read a transfer",
    responses=error_responses(
        (404, "transfer_not_found", "no such transfer"),
        (422, "validation_error", "bad transfer id"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_transfer(
    db: Db,
    transfer_id: Annotated[
        str,
        Path(
            alias="transferId",
            description="A positive 64-bit integer.",
            json_schema_extra={"type": "integer", "minimum": 1, "maximum": INT64_MAX},
        ),
    ],
) -> Response:
    found = await service.get_transfer(db.hot, parse_user_id(transfer_id, "transferId"))
    return _json(_transfer_body(found))


def _transfer_body(found: TransferRow) -> bytes:
    return (
        Transfer(
            transfer_id=found.id,
            from_user_id=found.from_user_id,
            to_user_id=found.to_user_id,
            amount=found.amount,
            reference=found.reference,
            from_balance=found.from_balance,
            to_balance=found.to_balance,
            created_at=found.created_at,
        )
        .model_dump_json(by_alias=True)
        .encode()
    )


@router.post(
    "/users",
    response_model=Balance,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user",
    description=(
        "Creates a user with `balance` (default 10000), journaled as its opening entry, and "
        "answers its id. The body may be left out (all defaults)."
    ),
    responses=error_responses(_VALIDATION, _JSON_415, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/UserCreate"}}
            },
        }
    },
)
async def create_user(request: Request, db: Db) -> Balance:
    body = await request.body()
    asked = (
        parse_body(UserCreate, body, request.headers.get("content-type"), "user")
        if body
        else UserCreate()
    )
    result = await db.transact(lambda session: service.create_user(session, asked.balance))
    return Balance(user_id=result.user_id, balance=result.balance)
