"""The wallet's two hot routes, ``POST /balance/update`` and ``GET /balance/{userId}``: what
each does with a request (parse, call the service, render the answer) and their OpenAPI
operations, written from the same models and error codes.

The lean path (fastpath.py) is their one handler and calls the ``serve_*`` functions here;
no FastAPI route serves them (FastAPI's routing, dependency solving and response validation
cost more CPU per request than the whole database round trip: docs/decisions.md has the
measurement of both options), so ``OPERATIONS`` documents them in the app's schema.
Nothing here knows HTTP framing: fastpath.py reads the request and writes the response.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from urllib.parse import parse_qsl

from tandem.core.callers import WALLET_MINT, Caller
from tandem.core.dependencies import Instance
from tandem.core.errors import AppError, ValidationError
from tandem.core.openapi import (
    DATABASE_UNAVAILABLE,
    OUTCOME_UNKNOWN,
    error_responses_schema,
    json_request_body,
    schema_ref,
)
from tandem.core.pool import ConnectionPool
from tandem.observability.metrics import WALLET_BALANCE_UPDATES
from tandem.wallet import service
from tandem.wallet.errors import DEBIT_LIMIT
from tandem.wallet.schemas import (
    BODY_INVALID,
    BODY_NOT_JSON,
    BODY_TOO_LARGE,
    ID_DESCRIPTION,
    ID_JSON_SCHEMA,
    IDEMPOTENCY_KEY_DESCRIPTION,
    IDEMPOTENCY_KEY_HEADER,
    BalanceAt,
    BalanceNow,
    BalanceUpdate,
    BalanceUpdated,
    parse_balance_update,
    parse_idempotency_key,
    parse_instant,
    parse_user_id,
)
from tandem.wallet.service import BalanceResult

UPDATE_PATH = "/balance/update"
READ_ROUTE = "/balance/{userId}"

_OUTCOME_OK = WALLET_BALANCE_UPDATES.labels("ok")
_OUTCOME_REPLAYED = WALLET_BALANCE_UPDATES.labels("replayed")


# --- POST /balance/update ------------------------------------------------------------------


async def serve_balance_update(
    instance: Instance,
    caller: Caller,
    body: bytes,
    content_type: str | None,
    idempotency_keys: list[str],
    batches: service.WalletBatches | None = None,
) -> BalanceResult:
    """Validate, apply, count. Raises AppError subclasses (4xx) for every refusal; a deposit
    needs the caller's wallet:mint besides the route's wallet:write."""
    try:
        update = parse_balance_update(body, content_type)
        key = parse_idempotency_key(idempotency_keys)
        if update.amount > 0:
            caller.require(WALLET_MINT)
        result = await service.update_balance(
            instance.database.pool,
            update.user_id,
            update.amount,
            key,
            update.reference,
            caller,
            instance.settings.idempotency_keys_per_day,
            batches,
        )
    except AppError as error:
        WALLET_BALANCE_UPDATES.labels(error.code).inc()
        raise
    (_OUTCOME_REPLAYED if result.replayed else _OUTCOME_OK).inc()
    return result


# --- GET /balance/{userId} -----------------------------------------------------------------


async def serve_balance_read(pool: ConnectionPool, raw_user_id: str, query: bytes) -> BalanceResult:
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


# --- both answers --------------------------------------------------------------------------


def balance_body(result: BalanceResult) -> bytes:
    """The 200 body of both routes: BalanceUpdated, BalanceAt or BalanceNow, by hand (a
    model's serialiser costs more than the statement's parse on this path)."""
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
    if result.held is None:
        # A replay of an update applied before the journal kept keys: its stored answer.
        return b'{"userId":%d,"balance":%d}' % (result.user_id, result.balance)
    return b'{"userId":%d,"balance":%d,"held":%d,"available":%d}' % (
        result.user_id,
        result.balance,
        result.held,
        result.balance - result.held,
    )


# --- their OpenAPI operations --------------------------------------------------------------


def _ok(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


_UPDATE = {
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
            "description": IDEMPOTENCY_KEY_DESCRIPTION,
            "schema": {"type": "string", "pattern": "^[\\x21-\\x7e]{1,255}$"},
        }
    ],
    **json_request_body(BalanceUpdate),
    "responses": {
        "200": _ok(
            "The balance after the change, and its journal entry.", schema_ref(BalanceUpdated)
        ),
        **error_responses_schema(
            (404, "user_not_found", "no such user"),
            (
                409,
                "insufficient_funds",
                "the withdrawal is more than the available amount (balance - held)",
            ),
            (409, "balance_limit_exceeded", "the balance would exceed 2^63-1"),
            (409, "mint_ceiling_reached", "a deposit past the day's mint ceiling"),
            BODY_INVALID,
            (422, "idempotency_key_reused", "the key was used with a different request"),
            DEBIT_LIMIT,
            BODY_NOT_JSON,
            BODY_TOO_LARGE,
            (405, "method_not_allowed", "only POST"),
            DATABASE_UNAVAILABLE,
            OUTCOME_UNKNOWN,
        ),
    },
}

_READ = {
    "tags": ["wallet"],
    "summary": "Read a balance, now or at an instant",
    "description": (
        "Now: the balance, what the user's active holds keep (`held`, expired ones not yet "
        "released included) and what withdrawals, transfers and new holds may spend "
        "(`available` = balance - held). With `at` (an RFC 3339 instant), the balance after "
        "the user's last journal entry at or before it (holds are not journaled by instant: "
        "no `held`); before the user's opening entry there is none: 404 `user_not_found`."
    ),
    "operationId": "read_balance",
    "parameters": [
        {
            "name": "userId",
            "in": "path",
            "required": True,
            "description": ID_DESCRIPTION,
            "schema": ID_JSON_SCHEMA,
        },
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
            "The balance now with what is held and available, or at an instant (`at`).",
            {"anyOf": [schema_ref(BalanceNow), schema_ref(BalanceAt)]},
        ),
        **error_responses_schema(
            (404, "user_not_found", "no such user (at that instant)"),
            (422, "validation_error", "bad user id or instant"),
            (405, "method_not_allowed", "only GET"),
            DATABASE_UNAVAILABLE,
        ),
    },
}

# The OpenAPI path items of the two routes, for the app's schema (core/openapi.install_openapi).
OPERATIONS: dict[str, dict[str, dict[str, Any]]] = {
    UPDATE_PATH: {"post": _UPDATE},
    READ_ROUTE: {"get": _READ},
}
