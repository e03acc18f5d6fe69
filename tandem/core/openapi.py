"""How errors are documented in the OpenAPI schema: one envelope model, one way to list the
codes a route may answer, and the two database failures every route that touches the
database shares (tandem/core/failures.py decides which one an answer is)."""

from __future__ import annotations

from typing import Any

import pydantic

ErrorCode = tuple[int, str, str]

DATABASE_UNAVAILABLE: ErrorCode = (
    503,
    "database_unavailable",
    "the database could not be reached, or refused or rolled back the statement; nothing "
    "changed: retry after `Retry-After` seconds",
)
OUTCOME_UNKNOWN: ErrorCode = (
    503,
    "outcome_unknown",
    "the connection to the database broke after the change was sent, so it may or may not "
    "have been applied: retry with the same `Idempotency-Key`, which returns the first "
    "outcome or applies the change exactly once (without a key, read the state before "
    "retrying)",
)

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


class ErrorBody(pydantic.BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorEnvelope(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "insufficient_funds", "message": "the balance is too low"}}
            ]
        }
    )
    error: ErrorBody


def error_responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these error codes, grouped by status."""
    out: dict[int | str, dict[str, Any]] = {}
    for status_code, code, description in codes:
        entry = out.setdefault(status_code, {"description": "", "model": ErrorEnvelope})
        entry["description"] = (entry["description"] + f" `{code}`: {description}.").strip()
        if status_code == 503:
            entry["headers"] = _RETRY_AFTER
    return out


def error_responses_schema(*codes: ErrorCode) -> dict[str, dict[str, Any]]:
    """The same as ``error_responses``, as OpenAPI response objects: for operations that no
    FastAPI route declares (the wallet's lean path, tandem/wallet/fastpath.py)."""
    out: dict[str, dict[str, Any]] = {}
    envelope = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorEnvelope"}}}
    for status_code, entry in error_responses(*codes).items():
        response: dict[str, Any] = {"description": entry["description"], "content": envelope}
        if "headers" in entry:
            response["headers"] = entry["headers"]
        out[str(status_code)] = response
    return out
