"""Wallet refusals. Each carries its HTTP status and stable code; a refusal changes nothing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from tandem.core.errors import (
    AppError,
    ConflictError,
    NotFoundError,
    TooManyRequestsError,
    ValidationError,
)

# Defined in core (the access layer answers it too), one of the wallet's refusals all the same.
from tandem.core.errors import UserNotFoundError as UserNotFoundError

if TYPE_CHECKING:
    from tandem.wallet.repository import Request


class TransferNotFoundError(NotFoundError):
    code = "transfer_not_found"

    def __init__(self, transfer_id: int) -> None:
        super().__init__(f"transfer {transfer_id} does not exist")


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


class TooManyIdempotencyKeysError(TooManyRequestsError):
    """The caller stored its day's cap of new idempotency keys; retries of stored keys still
    answer, and requests without a key are not counted."""

    code = "idempotency_key_limit"
    # An hour: the cap is per UTC day.
    headers: ClassVar[dict[str, str]] = {"Retry-After": "3600"}

    def __init__(self, per_day: int) -> None:
        super().__init__(f"this API key stored its {per_day} new idempotency keys for today")


class DebitLimitError(TooManyRequestsError):
    """The API key's debit limit of a window (``tandem keys create --debit-limit``) would be
    passed: nothing moved, nothing counted."""

    code = "debit_limit_exceeded"

    def __init__(self, name: str, amount: int, period: str, retry_after: float) -> None:
        super().__init__(
            f"the API key {name!r} may move at most {amount} out of users per {period}"
        )
        # Per refusal: when the window ends (whole seconds, at least 1).
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}  # type: ignore[misc]  # an instance's own value of the class's default


# The refusal in the OpenAPI schema of the routes that debit.
DEBIT_LIMIT = (
    429,
    DebitLimitError.code,
    "the API key's debit limit of a window would be passed (`tandem keys create "
    "--debit-limit`); nothing changed",
)


def refusal_outcome(refusal: AppError) -> str:
    """How a keyed request's refusal is stored: its code, and for a user not found which side
    of a transfer it was."""
    if isinstance(refusal, UserNotFoundError) and refusal.field:
        return f"{refusal.code}:{refusal.field}"
    return refusal.code


def replay_refusal(outcome: str, request: Request) -> AppError:
    """The refusal a stored outcome stands for, raised again for a retry of ``request``."""
    code, _, field = outcome.partition(":")
    if code == UserNotFoundError.code:
        if field == "toUserId":
            assert request.to_user_id is not None
            return UserNotFoundError(request.to_user_id, field=field)
        return UserNotFoundError(request.user_id, field=field or None)
    if code == InsufficientFundsError.code:
        return InsufficientFundsError(request.user_id)
    if code == BalanceLimitError.code:
        target = request.to_user_id if request.to_user_id is not None else request.user_id
        return BalanceLimitError(target)
    raise AssertionError(f"no refusal is stored as {outcome!r}")
