"""Wallet HTTP endpoints.

Each route has one handler. The two hot ones, ``POST /balance/update`` and
``GET /balance/{userId}``, are served by the lean ASGI path in ``fastpath.py`` through the
``serve_*`` functions below (FastAPI's routing, dependency solving and response validation
cost more CPU per request than the whole database round trip: docs/ARCHITECTURE.md has the
measurement of both options); ``lean_operations`` documents them in the OpenAPI schema from
the same models and error codes. The other routes are FastAPI's, below. Every request body
goes through ``schemas.parse_body``.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any
from urllib.parse import parse_qsl

from fastapi import APIRouter, Header, Path, Query, Request, Response, status
from pydantic import BaseModel

from tandem.core.callers import WALLET_MINT, Caller
from tandem.core.dependencies import CurrentCaller, CurrentInstance, Db, Instance
from tandem.core.errors import AppError, ValidationError
from tandem.core.hotpool import HotPool
from tandem.core.openapi import (
    DATABASE_UNAVAILABLE,
    OUTCOME_UNKNOWN,
    ErrorEnvelope,
    error_responses,
    error_responses_schema,
)
from tandem.observability.metrics import WALLET_BALANCE_UPDATES
from tandem.wallet import service
from tandem.wallet.repository import Transfer as TransferRow
from tandem.wallet.schemas import (
    IDEMPOTENCY_KEY_HEADER,
    INT64_MAX,
    Balance,
    BalanceAt,
    BalanceUpdate,
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
    read_body,
)
from tandem.wallet.service import BalanceResult

# The largest history page (about 40 KB of JSON): one request cannot ask for megabytes.
HISTORY_PAGE_MAX = 200
_OUTCOME_OK = WALLET_BALANCE_UPDATES.labels("ok")
_OUTCOME_REPLAYED = WALLET_BALANCE_UPDATES.labels("replayed")


async def serve_balance_update(
    instance: Instance,
    caller: Caller,
    body: bytes,
    content_type: str | None,
    idempotency_keys: list[str],
) -> BalanceResult:
    """Validate, apply, count. Raises AppError subclasses (4xx) for every refusal; a deposit
    needs the caller's wallet:mint besides the route's wallet:write."""
    try:
        update = parse_balance_update(body, content_type)
        key = parse_idempotency_key(idempotency_keys)
        if update.amount > 0:
            caller.require(WALLET_MINT)
        result = await service.update_balance(
            instance.database.hot,
            update.user_id,
            update.amount,
            key,
            update.reference,
            caller,
            instance.settings.idempotency_keys_per_day,
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


def balance_body(result: BalanceResult) -> bytes:
    if result.entry_id is not None:
        return b'{"userId":%d,"balance":%d,"entryId":%d}' % (
            result.user_id,
            result.balance,
            result.entry_id,
        )
    if result.at is not None:
        return b'{"userId":%d,"balance":%d,"at":"%s"}' % (
            result.user_id,
            result.balance,
            result.at.isoformat().encode(),
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
_TOO_LARGE = (413, "payload_too_large", "the body is larger than 4 KiB")


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


# --- the lean path's two routes, documented ----------------------------------------------
# fastpath.py is their one handler; no FastAPI route exists for them, so their operations are
# written here, from the same models and error codes, and added to the OpenAPI schema.

LEAN_MODELS = (BalanceUpdate, BalanceUpdated, Balance, BalanceAt, ErrorEnvelope)


def _ref(model: type[BaseModel]) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{model.__name__}"}


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_USER_ID_PARAMETER = {
    "name": "userId",
    "in": "path",
    "required": True,
    "description": "A positive 64-bit integer.",
    "schema": {"type": "integer", "minimum": 1, "maximum": INT64_MAX},
}


def lean_operations() -> dict[str, dict[str, Any]]:
    """OpenAPI path items of POST /balance/update and GET /balance/{userId}."""
    update = {
        "tags": ["wallet"],
        "summary": "Add to (or withdraw from) a balance, atomically",
        "description": (
            "Adds `amount` (negative: withdrawal) to the user's balance and journals it, in "
            "one atomic statement. The balance never goes below 0; any number of instances may "
            "serve this at once. With an `Idempotency-Key` header, a retry returns the first "
            "outcome and never applies twice (a replay carries `Idempotent-Replayed: true`), "
            "also long after: an applied change keeps its key in the journal. A refusal "
            "changes nothing. A 503 `outcome_unknown` means the change may or may not have "
            "been applied: retry with the same key to learn which. Idempotency keys belong to "
            "the API key that sent them; a deposit (amount > 0) creates money and needs the "
            "scope `wallet:mint` as well."
        ),
        "operationId": "update_balance",
        "parameters": [
            {
                "name": IDEMPOTENCY_KEY_HEADER,
                "in": "header",
                "required": False,
                "description": "1-255 visible ASCII characters naming this attempt (at most one).",
                "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
            }
        ],
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": _ref(BalanceUpdate)}},
        },
        "responses": {
            "200": _ok(
                "The balance after the change, and its journal entry.", _ref(BalanceUpdated)
            ),
            **error_responses_schema(
                (404, "user_not_found", "no such user"),
                (409, "insufficient_funds", "the withdrawal would make the balance negative"),
                (409, "balance_limit_exceeded", "the balance would exceed 2^63-1"),
                _VALIDATION,
                (422, "idempotency_key_reused", "the key was used with a different request"),
                _JSON_415,
                _TOO_LARGE,
                (405, "method_not_allowed", "only POST"),
                DATABASE_UNAVAILABLE,
                OUTCOME_UNKNOWN,
            ),
        },
    }
    read = {
        "tags": ["wallet"],
        "summary": "Read a balance, now or at an instant",
        "description": (
            "With `at` (an RFC 3339 instant), the balance after the user's last journal entry "
            "at or before it; before the user's opening entry there is none: 404 "
            "`user_not_found`."
        ),
        "operationId": "read_balance",
        "parameters": [
            _USER_ID_PARAMETER,
            {
                "name": "at",
                "in": "query",
                "required": False,
                "description": "An RFC 3339 instant, e.g. 2026-12-01T12:00:00Z.",
                "schema": {"type": "string", "format": "date-time"},
            },
        ],
        "responses": {
            "200": _ok(
                "The balance (with `at` when asked at an instant).",
                {"anyOf": [_ref(Balance), _ref(BalanceAt)]},
            ),
            **error_responses_schema(
                (404, "user_not_found", "no such user (at that instant)"),
                (422, "validation_error", "bad user id or instant"),
                (405, "method_not_allowed", "only GET"),
                DATABASE_UNAVAILABLE,
            ),
        },
    }
    return {"/balance/update": {"post": update}, "/balance/{userId}": {"get": read}}


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
    limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX, strict=False)] = 100,
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
        _TOO_LARGE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=_json_body("TransferCreate"),
)
async def create_transfer(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    idempotency_key: Annotated[str | None, _KEY_HEADER] = None,
) -> Response:
    asked = parse_body(
        TransferCreate,
        await read_body(request.stream()),
        request.headers.get("content-type"),
        "transfer",
    )
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    result = await service.transfer(
        instance.database.hot,
        asked.from_user_id,
        asked.to_user_id,
        asked.amount,
        key,
        asked.reference,
        caller,
        instance.settings.idempotency_keys_per_day,
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
        "answers its id. The body may be left out (all defaults). An opening balance above 0 "
        "creates money and needs the scope `wallet:mint` as well."
    ),
    responses=error_responses(
        _VALIDATION, _JSON_415, _TOO_LARGE, DATABASE_UNAVAILABLE, OUTCOME_UNKNOWN
    ),
    openapi_extra={
        "requestBody": {
            "required": False,
            "content": {
                "application/json": {"schema": {"$ref": "#/components/schemas/UserCreate"}}
            },
        }
    },
)
async def create_user(request: Request, db: Db, caller: CurrentCaller) -> Balance:
    body = await read_body(request.stream())
    asked = (
        parse_body(UserCreate, body, request.headers.get("content-type"), "user")
        if body
        else UserCreate()
    )
    if asked.balance > 0:
        caller.require(WALLET_MINT)  # an opening balance is money created
    result = await db.transact(lambda session: service.create_user(session, asked.balance, caller))
    return Balance(user_id=result.user_id, balance=result.balance)
