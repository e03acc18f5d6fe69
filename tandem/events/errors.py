"""The change stream's refusals. Each carries its HTTP status and stable code."""

from __future__ import annotations

from tandem.core.errors import AppError, NotFoundError, ServiceUnavailableError, ValidationError


class InvalidCursorError(AppError):
    """A cursor that is not one this stream gave (malformed, or past its end)."""

    status_code = 400
    code = "invalid_cursor"


class CursorExpiredError(AppError):
    """Events after the cursor were deleted (past the retention): the reader missed some."""

    status_code = 410
    code = "cursor_expired"

    def __init__(self, cursor: int, pruned_through: int) -> None:
        super().__init__(
            f"cursor {cursor} has expired: the events through {pruned_through} were deleted "
            "past the retention; start again without 'after' (the oldest kept event)"
        )


class UnknownEventTypeError(ValidationError):
    code = "unknown_event_type"


class EventsUnavailableError(ServiceUnavailableError):
    """The database has not applied the change stream's migration yet (a rolling deploy)."""

    code = "events_unavailable"

    def __init__(self) -> None:
        super().__init__(
            "the change stream is not available yet: the database is below migration "
            "0019_change_stream (it is applied once older instances are gone)"
        )


class EndpointNotFoundError(NotFoundError):
    code = "webhook_endpoint_not_found"

    def __init__(self, endpoint_id: int) -> None:
        super().__init__(f"webhook endpoint {endpoint_id} does not exist")
