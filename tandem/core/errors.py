"""The one error type every layer raises; it carries its HTTP status and a stable code.

Clients branch on ``code``; ``message`` is for people and may change.
"""

from __future__ import annotations

import json
from typing import Any, ClassVar

import asyncpg


class AppError(Exception):
    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        error: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.details:
            error["details"] = self.details
        return {"error": error}

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


class ValidationError(AppError):
    status_code = 422
    code = "validation_error"


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"


class ConflictError(AppError):
    status_code = 409
    code = "conflict"


class PayloadTooLargeError(AppError):
    status_code = 413
    code = "payload_too_large"


class ServiceUnavailableError(AppError):
    status_code = 503
    code = "service_unavailable"


class InternalError(AppError):
    status_code = 500
    code = "internal_error"


class DatabaseUnavailableError(ServiceUnavailableError):
    code = "database_unavailable"


# Failures of the database connection itself: the request may be retried elsewhere.
_UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,  # e.g. a connection the server dropped mid-use
    asyncpg.CannotConnectNowError,
    asyncpg.ConnectionFailureError,
)


def error_for_unexpected(exc: BaseException) -> AppError:
    """What a client is told about an exception no layer handled: 503 when the database is
    unreachable (retry later or elsewhere), else an opaque 500. The caller logs ``exc``."""
    if isinstance(exc, _UNAVAILABLE):
        return DatabaseUnavailableError("the database is unavailable; retry")
    return InternalError("internal error")
