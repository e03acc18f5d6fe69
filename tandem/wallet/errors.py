"""Wallet refusals. Each carries its HTTP status and stable code; a refusal changes nothing."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

from tandem.core.errors import (
    AppError,
    ConflictError,
    NotFoundError,
    ServiceUnavailableError,
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
    """More than the user's available amount (its balance less what its holds keep)."""

    code = "insufficient_funds"

    def __init__(self, user_id: int) -> None:
        super().__init__(f"the available balance of user {user_id} is too low for this withdrawal")


class HoldNotFoundError(NotFoundError):
    """No such hold, or one a bound key may not see (the same answer)."""

    code = "hold_not_found"

    def __init__(self, hold_id: int) -> None:
        super().__init__(f"hold {hold_id} does not exist")


class HoldNotActiveError(ConflictError):
    """The hold was captured, released or expired: it cannot change any more. ``details``
    name its state."""

    code = "hold_not_active"

    def __init__(self, hold_id: int, status: str) -> None:
        self.status = status
        super().__init__(
            f"hold {hold_id} is {status}, no longer active",
            details=[{"field": "status", "type": status, "message": f"the hold is {status}"}],
        )


class PayeeAlreadySetError(ConflictError):
    """A capture named a payee for a hold made with one."""

    code = "payee_already_set"

    def __init__(self, hold_id: int) -> None:
        super().__init__(
            f"hold {hold_id} has its payee since its creation: capture it without toUserId"
        )


class AmountExceedsHoldError(ValidationError):
    """A capture of more than the hold reserves (``asked``)."""

    code = "amount_exceeds_hold"

    def __init__(self, hold_id: int, asked: int) -> None:
        super().__init__(
            f"hold {hold_id} reserves less than {asked}: a capture takes at most its amount",
            details=[
                {"field": "amount", "type": "amount_exceeds_hold", "message": "more than held"}
            ],
        )


class PayeeIsPayerError(ValidationError):
    """A payee equal to the payer (a capture's; a creation's is refused by its schema)."""

    def __init__(self, user_id: int) -> None:
        super().__init__(
            f"user {user_id} pays this hold: it cannot be its payee too",
            details=[
                {"field": "toUserId", "type": "payee_is_payer", "message": "the payer itself"}
            ],
        )


class HoldsUnavailableError(ServiceUnavailableError):
    """Holds are not enabled yet: instances of the previous release, which ignore held, may
    still be live (the migration 0017 enables them once none is). Never stored as a keyed
    request's outcome: a retry with the same key is judged anew."""

    code = "holds_unavailable"
    headers: ClassVar[dict[str, str]] = {"Retry-After": "60"}

    def __init__(self) -> None:
        super().__init__(
            "holds are not enabled yet: instances of an earlier release may still be live "
            "(`tandem migrate` enables them once none is)"
        )


class BalanceLimitError(ConflictError):
    """The new balance would not fit a 64-bit integer."""

    code = "balance_limit_exceeded"

    def __init__(self, user_id: int) -> None:
        super().__init__(f"the balance of user {user_id} would exceed the 64-bit limit")


class MintCeilingError(ConflictError):
    """The owner's daily mint ceiling (wallet_settings.daily_mint_ceiling) would be passed."""

    code = "mint_ceiling_reached"

    def __init__(self) -> None:
        super().__init__("this deposit would pass today's mint ceiling set by the operator")


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


# The refusals in the OpenAPI schema of the hold routes.
HOLD_NOT_FOUND = (404, HoldNotFoundError.code, "no such hold")
HOLD_NOT_ACTIVE = (
    409,
    HoldNotActiveError.code,
    "the hold was captured, released or expired (`details` name which)",
)
HOLDS_UNAVAILABLE = (
    503,
    HoldsUnavailableError.code,
    "holds are not enabled yet: instances of an earlier release may be live (the migration "
    "0017 enables them); nothing changed",
)

# The refusal in the OpenAPI schema of the routes that debit.
DEBIT_LIMIT = (
    429,
    DebitLimitError.code,
    "the API key's debit limit of a window would be passed (`tandem keys create "
    "--debit-limit`); nothing changed",
)


def refusal_outcome(refusal: AppError) -> str:
    """How a keyed request's refusal is stored: its code, for a user not found which side of
    a transfer or a hold it was, for a hold no longer active its state."""
    if isinstance(refusal, UserNotFoundError) and refusal.field:
        return f"{refusal.code}:{refusal.field}"
    if isinstance(refusal, HoldNotActiveError):
        return f"{refusal.code}:{refusal.status}"
    if isinstance(refusal, PayeeIsPayerError):
        return "payee_is_payer"
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
    if code == MintCeilingError.code:
        return MintCeilingError()
    if code == BalanceLimitError.code:
        target = request.to_user_id if request.to_user_id is not None else request.user_id
        return BalanceLimitError(target)
    hold_id = request.hold_id if request.hold_id is not None else 0
    if code == HoldNotFoundError.code:
        return HoldNotFoundError(hold_id)
    if code == HoldNotActiveError.code:
        return HoldNotActiveError(hold_id, field)
    if code == PayeeAlreadySetError.code:
        return PayeeAlreadySetError(hold_id)
    if code == AmountExceedsHoldError.code:
        return AmountExceedsHoldError(hold_id, request.amount)
    if code == "payee_is_payer":
        return PayeeIsPayerError(request.user_id)
    raise AssertionError(f"no refusal is stored as {outcome!r}")
