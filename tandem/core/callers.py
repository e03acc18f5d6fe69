"""Who is calling: the API key a request was verified with, as every layer sees it.

The access layer (``tandem/access/``) resolves the key once per request and leaves the caller
in the ASGI scope; routes read it from there (``caller_of``). Scopes are plain strings so that
the wallet and the scheduler can name what they need without importing the access layer.
"""

from __future__ import annotations

from collections.abc import MutableMapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from tandem.core.errors import ForbiddenError

WALLET_READ = "wallet:read"
WALLET_WRITE = "wallet:write"
# Creating money (a deposit, a new user's opening balance) is a right of its own: a key that
# moves money (wallet:write) or opens accounts (users:write) cannot also mint it.
WALLET_MINT = "wallet:mint"
USERS_WRITE = "users:write"
TASKS_READ = "tasks:read"
TASKS_WRITE = "tasks:write"
# Making keys bound to users through the API (POST /keys); an unbound key's right only.
KEYS_WRITE = "keys:write"
# Reading the change stream (GET /events: a bound key, its users' events only), and managing
# webhook endpoints (unbound keys only: an endpoint receives every user's events).
EVENTS_READ = "events:read"
WEBHOOKS_WRITE = "webhooks:write"
# Schedules as data (/schedules): unbound keys only.
SCHEDULES_READ = "schedules:read"
SCHEDULES_WRITE = "schedules:write"
ALL = "all"
SCOPES = (
    WALLET_READ,
    WALLET_WRITE,
    WALLET_MINT,
    USERS_WRITE,
    TASKS_READ,
    TASKS_WRITE,
    KEYS_WRITE,
    EVENTS_READ,
    WEBHOOKS_WRITE,
    SCHEDULES_READ,
    SCHEDULES_WRITE,
    ALL,
)

# Where the access layer leaves the caller in the ASGI scope.
CALLER_SCOPE_KEY = "tandem.caller"


# The windows a limit may name, in seconds. Windows are fixed and aligned to the UTC epoch
# (a day is a UTC day).
PERIODS = {"second": 1, "minute": 60, "hour": 3600, "day": 86400}


def period_name(seconds: int) -> str:
    return next(name for name, length in PERIODS.items() if length == seconds)


class Limit(NamedTuple):
    """At most ``amount`` (money for a debit limit, requests for a rate) per ``seconds``."""

    amount: int
    seconds: int


@dataclass(frozen=True, slots=True)
class Caller:
    """``api_key_id`` None: no key (authentication disabled by the operator). ``users``: the
    users a bound key may touch (None: unbound, every user); ``expires_at``: when the key
    stops being accepted (seconds since the epoch; None: never). A key's limits are off
    unless set on it (``tandem keys create --debit-limit``, ``--rate``): empty
    ``debit_limits`` and no ``rate`` cost nothing on any path."""

    api_key_id: int | None
    name: str
    scopes: frozenset[str]
    users: frozenset[int] | None = None
    expires_at: float | None = None
    # Money leaving users by this key, per window (wallet.service.count_debit).
    debit_limits: tuple[Limit, ...] = ()
    # Requests per window, in each process (access.layer).
    rate: Limit | None = None
    # The key that minted this one through POST /keys (its limits are this key's): its
    # windows and rate bucket count this key's debits and requests (limited_as).
    parent_key_id: int | None = None

    @property
    def limited_as(self) -> int | None:
        """The key whose debit windows and rate this caller's requests count in: its maker's
        for a key minted through POST /keys (one budget for the maker and all it minted),
        else its own."""
        return self.parent_key_id if self.parent_key_id is not None else self.api_key_id

    @property
    def bound(self) -> bool:
        return self.users is not None

    def may_touch(self, user_id: int) -> bool:
        """The one decision of a key's binding: may this caller read or move ``user_id``'s
        money. A caller that may not is told what it would be told of a user that does not
        exist (``user_not_found``), so a bound key learns nothing of other users."""
        return self.users is None or user_id in self.users

    def allows(self, scope: str) -> bool:
        return scope in self.scopes or ALL in self.scopes

    def require(self, scope: str) -> None:
        """Raises ForbiddenError unless this caller has ``scope``."""
        if not self.allows(scope):
            raise ForbiddenError(f"this API key lacks the scope {scope!r}")


# The caller of every request when the operator disabled authentication.
ANONYMOUS = Caller(None, "anonymous", frozenset({ALL}))


def caller_of(scope: MutableMapping[str, Any]) -> Caller:
    caller = scope.get(CALLER_SCOPE_KEY)
    assert isinstance(caller, Caller), "the access layer runs before every protected route"
    return caller
