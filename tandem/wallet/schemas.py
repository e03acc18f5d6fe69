"""Wallet request and response shapes, and the one parser both HTTP paths use.

Strict: money is integral, so 2.0, "2", true and 1e3 are refused, as are unknown fields.
"""

from __future__ import annotations

import re
from typing import Any

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator

from tandem.core.errors import PayloadTooLargeError, ValidationError

INT64_MAX = 2**63 - 1
INT64_MIN = -(2**63)
MAX_BODY_BYTES = 4096
IDEMPOTENCY_KEY_HEADER = "Idempotency-Key"
_USER_ID_RE = re.compile(r"[1-9][0-9]{0,18}")
_IDEMPOTENCY_KEY_RE = re.compile(r"[\x21-\x7e]{1,255}")


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

    @field_validator("amount")
    @classmethod
    def _not_zero(cls, value: int) -> int:
        if value == 0:
            raise ValueError("amount must not be zero")
        return value


class UserCreate(BaseModel):
    model_config = ConfigDict(
        strict=True, extra="forbid", json_schema_extra={"examples": [{"balance": 10000}]}
    )

    balance: int = Field(default=10_000, ge=0, le=INT64_MAX, description="Initial balance.")


class Balance(BaseModel):
    model_config = ConfigDict(
        populate_by_name=True, json_schema_extra={"examples": [{"userId": 1, "balance": 9998}]}
    )

    user_id: int = Field(alias="userId")
    balance: int = Field(ge=0)


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


def parse_balance_update(body: bytes) -> BalanceUpdate:
    """Parse and validate a raw request body. Raises ValidationError (422) for anything that is
    not exactly ``{"userId": <positive int64>, "amount": <non-zero int64>}``."""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLargeError(f"request body larger than {MAX_BODY_BYTES} bytes")
    try:
        return BalanceUpdate.model_validate_json(body)
    except pydantic.ValidationError as error:
        raise validation_error_from(error, "invalid balance update") from None


def parse_user_id(raw: str) -> int:
    """A user id in a path: decimal digits, no sign or leading zero, 1..2^63-1."""
    if _USER_ID_RE.fullmatch(raw) is None or int(raw) > INT64_MAX:
        raise ValidationError(
            "userId must be a positive 64-bit integer",
            details=[{"field": "userId", "type": "int_type", "message": "invalid user id"}],
        )
    return int(raw)


def parse_idempotency_key(raw: str | None) -> str | None:
    """1-255 visible ASCII characters, or absent."""
    if raw is None:
        return None
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
