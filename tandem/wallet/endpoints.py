"""The wallet's FastAPI routes: history, transfers, holds, users.

The two hot routes (``POST /balance/update``, ``GET /balance/{userId}``) are not here: the
lean path (fastpath.py) is their one handler, and hotroutes.py holds what they do and their
OpenAPI operations. Every request body goes through ``schemas.parse_body``.
"""

from __future__ import annotations

from typing import Annotated, cast

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response, status

from tandem.core.callers import WALLET_MINT
from tandem.core.dependencies import CurrentCaller, CurrentInstance, Db
from tandem.core.ids import INT64_MAX
from tandem.core.openapi import (
    DATABASE_UNAVAILABLE,
    OUTCOME_UNKNOWN,
    error_responses,
    json_request_body,
)
from tandem.wallet import service
from tandem.wallet.errors import DEBIT_LIMIT, HOLD_NOT_ACTIVE, HOLD_NOT_FOUND, HOLDS_UNAVAILABLE
from tandem.wallet.models import DEFAULT_BALANCE
from tandem.wallet.repository import Hold as HoldRow
from tandem.wallet.repository import Transfer as TransferRow
from tandem.wallet.schemas import (
    BODY_INVALID,
    BODY_NOT_JSON,
    BODY_TOO_LARGE,
    ID_DESCRIPTION,
    ID_JSON_SCHEMA,
    IDEMPOTENCY_KEY_DESCRIPTION,
    IDEMPOTENCY_KEY_HEADER,
    Balance,
    History,
    HistoryEntry,
    Hold,
    HoldCapture,
    HoldCaptured,
    HoldCreate,
    HoldCreated,
    HoldList,
    HoldRelease,
    HoldStatus,
    Transfer,
    TransferCreate,
    UserCreate,
    content_type_of,
    parse_body,
    parse_idempotency_key,
    parse_user_id,
    read_body,
)
from tandem.wallet.service import WalletBatches

# The largest history page (at most 264,475 bytes of JSON, docs/wallet.md): one request
# cannot ask for megabytes.
HISTORY_PAGE_MAX = 200
# The largest page of holds, and the default one.
HOLDS_PAGE_MAX = 200
HOLDS_PAGE_DEFAULT = 50

router = APIRouter(tags=["wallet"])


def wallet_batches_of(app: FastAPI) -> WalletBatches | None:
    """The process's group-commit queues (create_app attaches them; None: off)."""
    batches = app.state.wallet_batches
    assert batches is None or isinstance(batches, WalletBatches), "create_app() attaches them"
    return batches


# async: a plain def would run in FastAPI's thread pool, a thread hop per request.
async def _get_batches(request: Request) -> WalletBatches | None:
    return wallet_batches_of(request.app)


CurrentBatches = Annotated[WalletBatches | None, Depends(_get_batches)]

_USER_ID_PATH = Path(alias="userId", description=ID_DESCRIPTION, json_schema_extra=ID_JSON_SCHEMA)
_KEY_HEADER = Header(alias=IDEMPOTENCY_KEY_HEADER, description=IDEMPOTENCY_KEY_DESCRIPTION)


def _json(body: bytes, status_code: int = 200, replayed: bool = False) -> Response:
    headers = {"Idempotent-Replayed": "true"} if replayed else None
    return Response(body, status_code, headers=headers, media_type="application/json")


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
    caller: CurrentCaller,
    user_id: Annotated[str, _USER_ID_PATH],
    limit: Annotated[int, Query(ge=1, le=HISTORY_PAGE_MAX, strict=False)] = 100,
    before: Annotated[int | None, Query(ge=1, le=INT64_MAX, strict=False)] = None,
) -> History:
    found = await service.history(db.pool, parse_user_id(user_id), limit, before, caller)
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
        DEBIT_LIMIT,
        BODY_NOT_JSON,
        BODY_TOO_LARGE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(TransferCreate),
)
async def create_transfer(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    batches: CurrentBatches,
    idempotency_key: Annotated[str | None, _KEY_HEADER] = None,
) -> Response:
    asked = parse_body(
        TransferCreate,
        await read_body(request.stream()),
        content_type_of(request.headers.getlist("content-type")),
        "transfer",
    )
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    result = await service.transfer(
        instance.database.pool,
        asked.from_user_id,
        asked.to_user_id,
        asked.amount,
        key,
        asked.reference,
        caller,
        instance.settings.idempotency_keys_per_day,
        batches.transfers if batches else None,
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
    caller: CurrentCaller,
    transfer_id: Annotated[
        str,
        Path(alias="transferId", description=ID_DESCRIPTION, json_schema_extra=ID_JSON_SCHEMA),
    ],
) -> Response:
    found = await service.get_transfer(db.pool, parse_user_id(transfer_id, "transferId"), caller)
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


_HOLD_ID_PATH = Path(alias="holdId", description=ID_DESCRIPTION, json_schema_extra=ID_JSON_SCHEMA)


@router.post(
    "/holds",
    response_model=HoldCreated,
    status_code=status.HTTP_201_CREATED,
    summary="Reserve part of a user's available balance",
    description=(
        "Reserves `amount` of the payer's available balance (balance - held) until it is "
        "captured (once, all or part, to the payee), released, or expires by itself "
        "`expiresIn` seconds after (the database's clock; default 900, at most 2592000). "
        "Concurrent holds, withdrawals and transfers of one user never reserve or spend more "
        "than its balance; its expired holds are released first when they are in the way. "
        "Counts against the API key's debit limit (its capture does not count again). "
        "`Idempotency-Key` as for balance updates."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such payer or payee (details say which)"),
        (409, "insufficient_funds", "amount is more than the payer's available balance"),
        (
            422,
            "validation_error",
            "malformed input, amount <= 0, expiresIn out of range, or the payee is the payer",
        ),
        (422, "idempotency_key_reused", "the key was used with a different request"),
        DEBIT_LIMIT,
        BODY_NOT_JSON,
        BODY_TOO_LARGE,
        HOLDS_UNAVAILABLE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(HoldCreate),
)
async def create_hold(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    idempotency_key: Annotated[str | None, _KEY_HEADER] = None,
) -> Response:
    asked = parse_body(
        HoldCreate,
        await read_body(request.stream()),
        content_type_of(request.headers.getlist("content-type")),
        "hold",
    )
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    result = await service.create_hold(
        instance.database.pool,
        asked.user_id,
        asked.amount,
        asked.to_user_id,
        asked.expires_in,
        asked.reference,
        key,
        caller,
        instance.settings.idempotency_keys_per_day,
    )
    assert result.available is not None
    made = result.hold
    body = HoldCreated(
        hold_id=made.id,
        user_id=made.user_id,
        to_user_id=made.to_user_id,
        amount=made.amount,
        status="active",
        expires_at=made.expires_at,
        available=result.available,
    )
    return _json(body.model_dump_json(by_alias=True).encode(), 201, replayed=result.replayed)


@router.get(
    "/holds/{holdId}",
    response_model=Hold,
    summary="Read a hold",
    description="Readable by keys bound to its payer or its payee.",
    responses=error_responses(
        HOLD_NOT_FOUND,
        (422, "validation_error", "bad hold id"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_hold(
    db: Db, caller: CurrentCaller, hold_id: Annotated[str, _HOLD_ID_PATH]
) -> Response:
    found = await service.get_hold(db.pool, parse_user_id(hold_id, "holdId"), caller)
    return _json(_hold(found.hold).model_dump_json(by_alias=True).encode())


@router.post(
    "/holds/{holdId}/capture",
    response_model=HoldCaptured,
    summary="Capture a hold, all or part; the rest is released",
    description=(
        "A hold's one capture, before its `expiresAt`: `amount` (default all) leaves the "
        "payer, as a transfer to the payee (the hold's, or `toUserId` for a hold made "
        "without one) or, with no payee, as a withdrawal; the rest is released in the same "
        "step. Its journal entries carry `holdId`. The body may be left out (capture all). "
        "Only keys bound to the payer (or unbound) may capture. `Idempotency-Key` as for "
        "balance updates."
    ),
    responses=error_responses(
        HOLD_NOT_FOUND,
        (404, "user_not_found", "no such payee (toUserId)"),
        HOLD_NOT_ACTIVE,
        (409, "payee_already_set", "toUserId given for a hold made with a payee"),
        (409, "balance_limit_exceeded", "the payee's balance would exceed 2^63-1"),
        (422, "amount_exceeds_hold", "amount is more than the hold reserves"),
        (422, "validation_error", "malformed input, amount <= 0, or the payee is the payer"),
        (422, "idempotency_key_reused", "the key was used with a different request"),
        BODY_NOT_JSON,
        BODY_TOO_LARGE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(HoldCapture, required=False),
)
async def capture_hold(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    hold_id: Annotated[str, _HOLD_ID_PATH],
    idempotency_key: Annotated[str | None, _KEY_HEADER] = None,
) -> Response:
    held = parse_user_id(hold_id, "holdId")
    body = await read_body(request.stream())
    asked = (
        parse_body(
            HoldCapture, body, content_type_of(request.headers.getlist("content-type")), "capture"
        )
        if body
        else HoldCapture()
    )
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    result = await service.capture_hold(
        instance.database.pool,
        held,
        asked.amount,
        asked.to_user_id,
        key,
        caller,
        instance.settings.idempotency_keys_per_day,
    )
    assert result.entry_id is not None
    answer = HoldCaptured(
        **_hold(result.hold).model_dump(),
        transfer_id=result.transfer_id,
        entry_id=result.entry_id,
    )
    return _json(answer.model_dump_json(by_alias=True).encode(), replayed=result.replayed)


@router.post(
    "/holds/{holdId}/release",
    response_model=Hold,
    summary="Release a hold",
    description=(
        "Gives the hold's amount back to the payer's available balance. Takes no body (an "
        "empty JSON object is accepted). Releasing a released or expired hold answers it as "
        "it is (`status` released or expired); a captured one is 409 `hold_not_active`. "
        "Only keys bound to the payer (or unbound) may release. `Idempotency-Key` as for "
        "balance updates."
    ),
    responses=error_responses(
        HOLD_NOT_FOUND,
        HOLD_NOT_ACTIVE,
        (422, "validation_error", "bad hold id, or a body that is not an empty object"),
        (422, "idempotency_key_reused", "the key was used with a different request"),
        BODY_NOT_JSON,
        BODY_TOO_LARGE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(HoldRelease, required=False),
)
async def release_hold(
    request: Request,
    instance: CurrentInstance,
    caller: CurrentCaller,
    hold_id: Annotated[str, _HOLD_ID_PATH],
    idempotency_key: Annotated[str | None, _KEY_HEADER] = None,
) -> Response:
    held = parse_user_id(hold_id, "holdId")
    body = await read_body(request.stream())
    if body:
        parse_body(
            HoldRelease, body, content_type_of(request.headers.getlist("content-type")), "release"
        )
    key = parse_idempotency_key(request.headers.getlist(IDEMPOTENCY_KEY_HEADER))
    result = await service.release_hold(
        instance.database.pool,
        held,
        key,
        caller,
        instance.settings.idempotency_keys_per_day,
    )
    return _json(
        _hold(result.hold).model_dump_json(by_alias=True).encode(), replayed=result.replayed
    )


@router.get(
    "/balance/{userId}/holds",
    response_model=HoldList,
    summary="A user's holds (as payer), newest first",
    description=(
        "Keyset-paginated as history: pass `nextBefore` of a page as `before` for the next "
        "one. `status` keeps only holds in that state (an active hold past its `expiresAt` "
        "reads expired)."
    ),
    responses=error_responses(
        (404, "user_not_found", "no such user"),
        (422, "validation_error", "bad user id, status, limit or before"),
        DATABASE_UNAVAILABLE,
    ),
)
async def read_holds(
    db: Db,
    caller: CurrentCaller,
    user_id: Annotated[str, _USER_ID_PATH],
    status: Annotated[HoldStatus | None, Query(description="Only holds in this state.")] = None,
    limit: Annotated[int, Query(ge=1, le=HOLDS_PAGE_MAX, strict=False)] = HOLDS_PAGE_DEFAULT,
    before: Annotated[int | None, Query(ge=1, le=INT64_MAX, strict=False)] = None,
) -> HoldList:
    found = await service.list_holds(db.pool, parse_user_id(user_id), status, limit, before, caller)
    return HoldList(
        user_id=found.user_id,
        holds=[_hold(h) for h in found.holds],
        next_before=found.next_before,
    )


def _hold(found: HoldRow) -> Hold:
    return Hold(
        hold_id=found.id,
        user_id=found.user_id,
        to_user_id=found.to_user_id,
        amount=found.amount,
        captured_amount=found.captured_amount,
        status=cast(HoldStatus, found.status),  # one of HOLD_STATUSES: the table's CHECK
        expires_at=found.expires_at,
        created_at=found.created_at,
        reference=found.reference,
    )


@router.post(
    "/users",
    response_model=Balance,
    status_code=status.HTTP_201_CREATED,
    summary="Create a user",
    description=(
        f"Creates a user with `balance` (default {DEFAULT_BALANCE}), journaled as its opening "
        "entry, and answers its id. The body may be left out (all defaults). An opening "
        "balance above 0 creates money and needs the scope `wallet:mint` as well."
    ),
    responses=error_responses(
        (409, "mint_ceiling_reached", "an opening balance past the day's mint ceiling"),
        BODY_INVALID,
        BODY_NOT_JSON,
        BODY_TOO_LARGE,
        DATABASE_UNAVAILABLE,
        OUTCOME_UNKNOWN,
    ),
    openapi_extra=json_request_body(UserCreate, required=False),
)
async def create_user(request: Request, db: Db, caller: CurrentCaller) -> Balance:
    body = await read_body(request.stream())
    asked = (
        parse_body(
            UserCreate, body, content_type_of(request.headers.getlist("content-type")), "user"
        )
        if body
        else UserCreate()
    )
    if asked.balance > 0:
        caller.require(WALLET_MINT)  # an opening balance is money created
    result = await db.transact(lambda session: service.create_user(session, asked.balance, caller))
    return Balance(user_id=result.user_id, balance=result.balance)
