"""API key tokens: made, hashed and checked here, nowhere else.

A token is ``tdm_`` + 32 random bytes (URL-safe base64): 256 bits, so a plain SHA-256 of it
is what is stored and looked up. Password hashes (bcrypt, argon2) are slow on purpose to resist
guessing low-entropy secrets; a random 256-bit token cannot be guessed, and a fast hash keeps
the lookup one index probe (the approach of GitHub's and Stripe's tokens).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from tandem.access.repository import Limits
from tandem.core.callers import PERIODS, SCOPES, Limit, period_name
from tandem.core.ids import INT64_MAX

# The longest life `tandem keys create --expires-in` gives (an operator's key; keys made
# through POST /keys live at most 24 hours: the owner's function keeps that).
EXPIRES_IN_MAX = 10 * 365 * 24 * 3600.0
TOKEN_PREFIX = "tdm_"  # noqa: S105  (a prefix, not a secret)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What a token looks like; anything else is refused before any lookup.
_TOKEN_RE = re.compile(r"tdm_[A-Za-z0-9_-]{43}")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def well_formed(token: str) -> bool:
    return _TOKEN_RE.fullmatch(token) is not None


def check_name(name: str) -> str:
    if NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid key name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_scopes(scopes: list[str]) -> list[str]:
    if not scopes:
        raise ValueError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; known: {', '.join(SCOPES)}")
    return sorted(set(scopes))


def check_users(users: list[int]) -> list[int]:
    """The users a key is bound to: at least one, each a positive 64-bit id."""
    if not users:
        raise ValueError("a bound key needs at least one user")
    bad = [u for u in users if not 0 < u <= INT64_MAX]
    if bad:
        raise ValueError(f"invalid user id {bad[0]}: a positive 64-bit integer")
    return sorted(set(users))


# The windows a limit may name (core.callers.PERIODS): a debit limit per minute, hour or
# day; a rate also per second.
_PERIOD_ALIASES = {"s": "second", "min": "minute", "h": "hour", "d": "day"}
# The one mapping of a debit window (seconds) to the field of repository.Limits (the column
# of a key's row) that holds it.
_DEBIT_COLUMNS = {60: "debit_per_minute", 3600: "debit_per_hour", 86400: "debit_per_day"}
DEBIT_PERIODS = tuple(period_name(seconds) for seconds in _DEBIT_COLUMNS)
RATE_PERIODS = ("second", "minute", "hour")


def parse_limit(text: str, periods: tuple[str, ...]) -> Limit:
    """``AMOUNT/PERIOD`` (e.g. ``5000/hour``, ``10/s``) as a Limit; raises ValueError."""
    amount, _, period = text.strip().partition("/")
    period = _PERIOD_ALIASES.get(period.strip().lower(), period.strip().lower())
    if not amount.strip().isdigit() or period not in periods:
        raise ValueError(
            f"invalid limit {text!r}: expected AMOUNT/PERIOD, AMOUNT a positive whole number, "
            f"PERIOD one of {', '.join(periods)}"
        )
    value = int(amount)
    if not 0 < value <= INT64_MAX:
        raise ValueError(f"invalid limit {text!r}: the amount must be 1..{INT64_MAX}")
    return Limit(value, PERIODS[period])


def check_debit_limits(texts: list[str]) -> dict[int, int]:
    """Each window's debit limit (seconds -> amount); one limit per window."""
    limits: dict[int, int] = {}
    for text in texts:
        limit = parse_limit(text, DEBIT_PERIODS)
        if limit.seconds in limits:
            raise ValueError(f"more than one debit limit per {period_name(limit.seconds)}")
        limits[limit.seconds] = limit.amount
    return limits


def describe(limit: Limit) -> str:
    return f"{limit.amount}/{period_name(limit.seconds)}"


def stored_limits(debits: dict[int, int], rate: Limit | None) -> Limits:
    """A key's limits as its row holds them: ``debits`` (window seconds -> amount, as
    check_debit_limits gives them) and a rate (None: off)."""
    columns: dict[str, int | None] = {
        column: debits.get(seconds) for seconds, column in _DEBIT_COLUMNS.items()
    }
    return Limits(
        **columns,
        rate_requests=None if rate is None else rate.amount,
        rate_seconds=None if rate is None else rate.seconds,
    )


def debit_limits(limits: Limits) -> tuple[Limit, ...]:
    """The debit limits a key's row holds, shortest window first."""
    stored = limits._asdict()
    return tuple(
        Limit(stored[column], seconds)
        for seconds, column in _DEBIT_COLUMNS.items()
        if stored[column] is not None
    )


def rate_limit(limits: Limits) -> Limit | None:
    """The request rate a key's row holds, or None."""
    if limits.rate_requests is None or limits.rate_seconds is None:
        return None
    return Limit(limits.rate_requests, limits.rate_seconds)
