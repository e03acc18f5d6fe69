"""Wallet refusals. Each carries its HTTP status and stable code; a refusal changes nothing."""

from __future__ import annotations

from collections.abc import Callable

from tandem.core.errors import AppError, ConflictError, NotFoundError, ValidationError


class UserNotFoundError(NotFoundError):
    code = "user_not_found"

    def __init__(self, user_id: int) -> None:
        super().__init__(f"user {user_id} does not exist")


class InsufficientFundsError(ConflictError):
    code = "insufficient_funds"

    def __init__(self, user_id: int) -> None:
        super().__init__(f"the balance of user {user_id} is too low for this withdrawal")


class BalanceLimitError(ConflictError):
    """The new balance would not fit a 64-bit integer."""

    code = "balance_limit_exceeded"

    def __init__(self, user_id: int) -> None:
        super().__init__(f"the balance of user {user_id} would exceed the 64-bit limit")


class IdempotencyKeyReusedError(ValidationError):
    code = "idempotency_key_reused"

    def __init__(self) -> None:
        super().__init__("this Idempotency-Key was already used with a different request")


# Refusals whose outcome an idempotency key records, by code, to answer a retry alike.
REPLAYABLE: dict[str, Callable[[int], AppError]] = {
    UserNotFoundError.code: UserNotFoundError,
    InsufficientFundsError.code: InsufficientFundsError,
    BalanceLimitError.code: BalanceLimitError,
}
