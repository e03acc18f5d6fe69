"""Wallet request and response shapes, and the one parser both HTTP paths use.

Strict: money is integral, so 2.0, "2", true and 1e3 are refused, as are unknown fields.
"""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterable, Sequence
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, TypeVar, get_args

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tandem.core.errors import PayloadTooLargeError, UnsupportedMediaTypeError, ValidationError
from tandem.core.ids import INT64_MAX, INT64_MIN, id_in
from tandem.core.openapi import ErrorCode
from tandem.core.text import FREE_TEXT
from tandem.wallet.models import (
    DEFAULT_BALANCE,
    HOLD_EXPIRES_IN_DEFAULT,
    HOLD_EXPIRES_IN_MAX,
    HOLD_STATUSES,
    REFERENCE_MAX_LENGTH,
)

MAX_BODY_BYTES = 4096
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
IDEMPOTENCY_KEY_DESCRIPTION = "1-255 visible ASCII characters naming this attempt (at most one)."
# An id in a path (parse_user_id), as the OpenAPI schema shows it.
ID_DESCRIPTION = "A positive 64-bit integer."
ID_JSON_SCHEMA = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")
_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d{1,9})?([Zz]|[+-]\d{2}:\d{2})"
)


class BalanceUpdate(BaseModel):
    """Add ``amount`` (negative: withdraw) to the balance of ``userId``, atomically."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        populate_by_name=False,
        json_schema_extra={"examples": [{"userId": 1, "amount": -2}]},
    )

    user_id: int = Field(alias="userId", ge=1, le=INT64_MAX, description="The user's id.")
    amount: int = Field(
        ge=INT64_MIN,
        le=INT64_MAX,
        description="Integer units to add; negative withdraws; never 0.",
        json_schema_extra={"not": {"const": 0}},
    )

    reference: Reference | None = None

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("amount must not be zero")
        return value


Reference = Annotated[
    str,
    Field(
        min_length=1,
        max_length=REFERENCE_MAX_LENGTH,
        description="The client's own text for the change (an order id, say), kept in the journal.",
    ),
    FREE_TEXT,
]


class TransferCreate(BaseModel):
    """Move ``amount`` from ``fromUserId`` to ``toUserId``, atomically."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [{"fromUserId": 1, "toUserId": 2, "amount": 250, "reference": "order-17"}]
        },
    )

    from_user_id: int = Field(alias="fromUserId", ge=1, le=INT64_MAX)
    to_user_id: int = Field(alias="toUserId", ge=1, le=INT64_MAX)
    amount: int = Field(ge=1, le=INT64_MAX, description="Integer units, more than 0.")
    reference: Reference | None = None

    @model_validator(mode="after")
    def _two_users(self) -> TransferCreate:
        if self.from_user_id == self.to_user_id:
            raise ValueError("fromUserId and toUserId must be two different users")
        return self


class HoldCreate(BaseModel):
    """Reserve ``amount`` of ``userId``'s available balance, for ``toUserId`` if given."""

    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"userId": 1, "amount": 500, "toUserId": 2, "expiresIn": 900, "reference": "t-9"}
            ]
        },
    )

    user_id: int = Field(alias="userId", ge=1, le=INT64_MAX, description="The payer.")
    amount: int = Field(ge=1, le=INT64_MAX, description="Integer units, more than 0.")
    to_user_id: int | None = Field(
        default=None,
        alias="toUserId",
        ge=1,
        le=INT64_MAX,
        description="The payee a capture pays (else given by the capture, or none: the "
        "captured amount is then withdrawn).",
    )
    expires_in: int = Field(
        default=HOLD_EXPIRES_IN_DEFAULT,
        alias="expiresIn",
        ge=1,
        le=HOLD_EXPIRES_IN_MAX,
        description="Seconds until the hold expires by itself (the database's clock).",
    )
    reference: Reference | None = None

    @model_validator(mode="after")
    def _two_users(self) -> HoldCreate:
        if self.to_user_id == self.user_id:
            raise ValueError("toUserId must be another user than userId")
        return self


class HoldCapture(BaseModel):
    """Capture ``amount`` (default: all) of a hold, to ``toUserId`` if the hold has no payee."""

    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra={"examples": [{"amount": 450}]}
    )

    amount: int | None = Field(
        default=None, ge=1, le=INT64_MAX, description="At most the hold's amount; default all."
    )
    to_user_id: int | None = Field(
        default=None,
        alias="toUserId",
        ge=1,
        le=INT64_MAX,
        description="The payee, only for a hold made without one.",
    )


class HoldRelease(BaseModel):
    """A release takes no body; an empty JSON object is accepted too."""

    model_config = ConfigDict(strict=True, extra="forbid")


HoldStatus = Literal["active", "captured", "released", "expired"]
# The models' states, spelled for the schema.
assert get_args(HoldStatus) == HOLD_STATUSES


class Hold(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    hold_id: int = Field(alias="holdId")
    user_id: int = Field(alias="userId", description="The payer.")
    to_user_id: int | None = Field(alias="toUserId", description="The payee (null: none yet).")
    amount: int = Field(description="What the hold reserves (or reserved, once finished).")
    captured_amount: int | None = Field(
        alias="capturedAmount", description="What its capture took (null unless captured)."
    )
    status: HoldStatus = Field(
        description="active, then captured, released or expired (an active hold past "
        "expiresAt reads expired: it can no longer be captured)."
    )
    expires_at: datetime = Field(alias="expiresAt")
    created_at: datetime = Field(alias="createdAt")
    reference: str | None


class HoldCaptured(Hold):
    model_config = ConfigDict(populate_by_name=True)

    transfer_id: int | None = Field(
        alias="transferId", description="The transfer to the payee (null: no payee, withdrawn)."
    )
    entry_id: int = Field(alias="entryId", description="The payer's journal entry.")


class HoldCreated(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    hold_id: int = Field(alias="holdId")
    user_id: int = Field(alias="userId")
    to_user_id: int | None = Field(alias="toUserId")
    amount: int
    status: Literal["active"]
    expires_at: datetime = Field(alias="expiresAt")
    available: int = Field(ge=0, description="The payer's available amount after it.")


class HoldList(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    user_id: int = Field(alias="userId")
    holds: list[Hold] = Field(description="Newest first.")
    next_before: int | None = Field(
        alias="nextBefore", description="Pass as `before` for the next page; null on the last."
    )


class UserCreate(BaseModel):
    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra={"examples": [{"balance": DEFAULT_BALANCE}]}
    )

    balance: int = Field(
        default=DEFAULT_BALANCE, ge=0, le=INT64_MAX, description="Initial balance."
    )


class Balance(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True, json_schema_extra={"examples": [{"userId": 1, "balance": 9998}]}
    )

    user_id: int = Field(alias="userId")
    balance: int = Field(ge=0)


class BalanceUpdated(Balance):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={"examples": [{"userId": 1, "balance": 9998, "entryId": 42}]},
    )

    entry_id: int = Field(alias="entryId", description="The journal entry of this change.")


class BalanceNow(Balance):
    model_config = ConfigDict(
        populate_by_name=True,
        json_schema_extra={
            "examples": [{"userId": 1, "balance": 9998, "held": 500, "available": 9498}]
        },
    )

    held: int = Field(ge=0, description="What the user's active holds reserve.")
    available: int = Field(
        ge=0, description="What withdrawals, transfers and new holds may spend: balance - held."
    )


class BalanceAt(Balance):
    model_config = ConfigDict(populate_by_name=True)

    at: datetime = Field(description="The instant asked about.")


class Transfer(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    transfer_id: int = Field(alias="transferId")
    from_user_id: int = Field(alias="fromUserId")
    to_user_id: int = Field(alias="toUserId")
    amount: int
    reference: str | None = None
    from_balance: int | None = Field(
        alias="fromBalance",
        description="The payer's balance after it (null to a key bound to the payee only).",
    )
    to_balance: int | None = Field(
        alias="toBalance",
        description="The payee's balance after it (null to a key bound to the payer only).",
    )
    created_at: datetime = Field(alias="createdAt")


class HistoryEntry(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int
    amount: int
    balance: int = Field(description="The balance after this entry.")
    kind: Literal["opening", "deposit", "withdrawal", "transfer"]
    transfer_id: int | None = Field(alias="transferId")
    reference: str | None
    created_at: datetime = Field(alias="createdAt")
    api_key: str | None = Field(
        alias="apiKey",
        description="The name of the API key that made the change (null: before keys, or "
        "made with authentication disabled).",
    )
    hold_id: int | None = Field(
        alias="holdId", description="The hold this entry captured (null: not a capture)."
    )


class History(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    user_id: int = Field(alias="userId")
    entries: list[HistoryEntry] = Field(description="Newest first.")
    next_before: int | None = Field(
        alias="nextBefore", description="Pass as `before` for the next page; null on the last."
    )


def _details(error: pydantic.ValidationError) -> list[dict[str, Any]]:
    return [
        {
            "field": ".".join(str(part) for part in e["loc"]) or "body",
            "type": e["type"],
            "message": e["msg"],
        }
        for e in error.errors(include_url=False, include_input=False)
    ]


def validation_error_from(error: pydantic.ValidationError, message: str) -> ValidationError:
    return ValidationError(message, details=_details(error))


Model = TypeVar("Model", bound=BaseModel)

# parse_body's refusals, as the OpenAPI schema documents them (core/openapi.error_responses).
BODY_INVALID: ErrorCode = (
    422,
    "validation_error",
    "malformed JSON, wrong types, floats, zero or out of range",
)
BODY_NOT_JSON: ErrorCode = (
    415,
    "unsupported_media_type",
    "the body is not declared `application/json`, once",
)
BODY_TOO_LARGE: ErrorCode = (413, "payload_too_large", "the body is larger than 4 KiB")


async def read_body(chunks: AsyncIterable[bytes], max_bytes: int = MAX_BODY_BYTES) -> bytes:
    """A request body, refused (413) as soon as it passes ``max_bytes``: the rest is never
    read into memory (a client may declare any length, or none)."""
    body = bytearray()
    async for chunk in chunks:
        body += chunk
        if len(body) > max_bytes:
            raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
    return bytes(body)


def content_type_of(values: Sequence[str]) -> str | None:
    """A request's one ``Content-Type`` (``values``: every such header, in order), or None.

    Refused (415) when given more than once: the field is a singleton (RFC 9110 §5.3 lets a
    recipient refuse it repeated), and the two HTTP paths would each read a different one
    (FastAPI the first, the lean path the last)."""
    if len(values) > 1:
        raise UnsupportedMediaTypeError(
            f"the request body must be declared once; Content-Type is given {len(values)} times"
        )
    return values[0] if values else None


def parse_body(
    model: type[Model],
    body: bytes,
    content_type: str | None,
    what: str,
    max_bytes: int = MAX_BODY_BYTES,
) -> Model:
    """Parse and validate a raw JSON request body, strictly: 415 unless it is declared
    ``application/json`` (which also keeps a cross-site form from posting it), 413 when too
    large, 422 for anything the model refuses and for a key given twice (which most parsers
    resolve silently, each its own way)."""
    media_type = (content_type or "").partition(";")[0].strip().lower()
    if media_type != "application/json":
        raise UnsupportedMediaTypeError(
            f"the request body must be application/json, not {media_type or 'undeclared'}"
        )
    if len(body) > max_bytes:
        raise PayloadTooLargeError(f"request body larger than {max_bytes} bytes")
    try:
        parsed = model.model_validate_json(body)
    except pydantic.ValidationError as error:
        raise validation_error_from(error, f"invalid {what}") from None
    # Valid JSON by now; only its keys are checked again (microseconds for these bodies).
    json.loads(body, object_pairs_hook=_refuse_duplicate_keys)
    return parsed


async def parse_request_body(
    chunks: AsyncIterable[bytes],
    content_types: Sequence[str],
    model: type[Model],
    what: str,
    max_bytes: int,
    *,
    optional: bool = False,
) -> Model:
    """A route's whole JSON body (``chunks``: its stream; ``content_types``: every
    Content-Type header), read up to ``max_bytes`` and parsed by ``parse_body``; with
    ``optional``, an empty body is the model's defaults."""
    body = await read_body(chunks, max_bytes)
    if optional and not body:
        return model()
    return parse_body(model, body, content_type_of(content_types), what, max_bytes)


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        twice = sorted({key for key in keys if keys.count(key) > 1})
        raise ValidationError(
            f"a key appears twice in the JSON body: {', '.join(twice)}",
            details=[
                {"field": key, "type": "duplicate_key", "message": "given more than once"}
                for key in twice
            ],
        )
    return dict(pairs)


def parse_balance_update(body: bytes, content_type: str | None) -> BalanceUpdate:
    """``{"userId": <positive int64>, "amount": <non-zero int64>, "reference"?: <text>}``."""
    return parse_body(BalanceUpdate, body, content_type, "balance update")


def parse_instant(raw: str) -> datetime:
    """An RFC 3339 instant: a date, a time and an offset (``Z`` or ``±hh:mm``)."""
    try:
        moment = datetime.fromisoformat(raw)
    except ValueError:
        moment = None
    try:
        # The database stores instants in UTC: one that cannot be is out of its range.
        if moment is not None and moment.tzinfo is not None:
            moment.astimezone(UTC)
    except OverflowError:
        moment = None
    if moment is None or moment.tzinfo is None or _RFC3339_RE.fullmatch(raw) is None:
        raise ValidationError(
            "at must be an RFC 3339 instant, e.g. 2026-12-01T12:00:00Z (in a URL, an offset's "
            "+ is %2B)",
            details=[{"field": "at", "type": "datetime_parsing", "message": "invalid instant"}],
        )
    return moment


def parse_user_id(raw: str, field: str = "userId") -> int:
    """An id in a path: decimal digits, no sign or leading zero, 1..2^63-1 (core.ids)."""
    parsed = id_in(raw)
    if parsed is None:
        raise ValidationError(
            f"{field} must be a positive 64-bit integer",
            details=[{"field": field, "type": "int_type", "message": f"invalid {field}"}],
        )
    return parsed


def parse_idempotency_key(values: list[str]) -> str | None:
    """The request's ``Idempotency-Key`` headers: none, or one of 1-255 visible ASCII
    characters (two are ambiguous: parsers disagree on which one counts)."""
    if not values:
        return None
    if len(values) > 1:
        raise ValidationError(
            f"{IDEMPOTENCY_KEY_HEADER} given {len(values)} times",
            details=[
                {
                    "field": IDEMPOTENCY_KEY_HEADER,
                    "type": "duplicate",
                    "message": "given more than once",
                }
            ],
        )
    raw = values[0]
    if _IDEMPOTENCY_KEY_RE.fullmatch(raw) is None:
        raise ValidationError(
            f"{IDEMPOTENCY_KEY_HEADER} must be 1-255 visible ASCII characters",
            details=[
                {
                    "field": IDEMPOTENCY_KEY_HEADER,
                    "type": "string_pattern_mismatch",
                    "message": "invalid idempotency key",
                }
            ],
        )
    return raw
