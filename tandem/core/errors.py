"""The one error type every layer raises; it carries its HTTP status and a stable code.

Clients branch on ``code``; ``message`` is for people and may change.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any, ClassVar


class AppError(Exception):
    status_code: ClassVar[int] = 400
    code: ClassVar[str] = "bad_request"
    # Response headers that belong to this error (e.g. Retry-After).
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, message: str, *, details: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details

    def to_dict(self) -> dict[str, Any]:
        return envelope(self.code, self.message, self.details)

    def to_json_bytes(self) -> bytes:
        return json.dumps(self.to_dict(), separators=(",", ":")).encode()


def envelope(
    code: str, message: str, details: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """The one shape of every error answer: ``{"error": {"code", "message", "details"?}}``."""
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return {"error": error}


class ValidationError(AppError):
    status_code = 422
    code = "validation_error"


class UnauthenticatedError(AppError):
    """No credential, or one that names no live key."""

    status_code = 401
    code = "unauthenticated"
    headers: ClassVar[dict[str, str]] = {"WWW-Authenticate": 'Bearer realm="tandem"'}


class ForbiddenError(AppError):
    """A known key without the right (its scope), or a cross-site request."""

    status_code = 403
    code = "forbidden"


class TooManyRequestsError(AppError):
    status_code = 429
    code = "too_many_requests"


class NotFoundError(AppError):
    status_code = 404
    code = "not_found"


class UserNotFoundError(NotFoundError):
    """No such user. Here rather than in the wallet: the access layer gives a key bound to
    other users this very answer, so that it cannot tell them from users that do not exist."""

    code = "user_not_found"

    def __init__(
        self, user_id: int, *, field: str | None = None, at: datetime | None = None
    ) -> None:
        self.user_id, self.field = user_id, field
        if at is not None:
            message = f"user {user_id} had no journal entry at or before {at.isoformat()}"
        else:
            message = f"user {user_id} does not exist"
        details = [{"field": field, "type": "not_found", "message": message}] if field else None
        super().__init__(message, details=details)


class ConflictError(AppError):
    status_code = 409
    code = "conflict"


class MethodNotAllowedError(AppError):
    """Subclasses name what is allowed in their ``Allow`` header."""

    status_code = 405
    code = "method_not_allowed"


class PayloadTooLargeError(AppError):
    status_code = 413
    code = "payload_too_large"


class UnsupportedMediaTypeError(AppError):
    status_code = 415
    code = "unsupported_media_type"


class ClientDisconnectedError(AppError):
    """The client went away before its request's body was complete: nothing was read, so
    nothing changed. The answer is never delivered; it exists so the request is counted and
    logged as the client's doing, not as a server error."""

    status_code = 400
    code = "client_disconnected"


class ServiceUnavailableError(AppError):
    status_code = 503
    code = "service_unavailable"


class InternalError(AppError):
    status_code = 500
    code = "internal_error"


class DatabaseFailureError(ServiceUnavailableError):
    """The database could not answer; ``core/failures.py`` decides which of the two."""

    headers: ClassVar[dict[str, str]] = {"Retry-After": "1"}


class DatabaseUnavailableError(DatabaseFailureError):
    """Nothing was applied: retry (here or on another instance)."""

    code = "database_unavailable"


class OutcomeUnknownError(DatabaseFailureError):
    """A write was sent and the connection broke before its answer: it may or may not have
    been applied. A retry with the same Idempotency-Key settles it."""

    code = "outcome_unknown"
