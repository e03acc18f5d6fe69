"""API keys: create, list, revoke (the CLI's), the key configured at start, and keys bound to
users made for another key (POST /keys)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime

import asyncpg

from tandem.access import keys, repository
from tandem.access.errors import REFUSALS
from tandem.access.repository import Key
from tandem.core.callers import ALL, Caller, Limit
from tandem.core.database import Database
from tandem.core.errors import ValidationError
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings

log = logging.getLogger(__name__)


class KeyCommandError(ValueError):
    """A refusal of the key commands, said to the operator as is."""


async def create_key(
    conn: asyncpg.Connection,
    name: str,
    scopes: list[str],
    users: list[int] | None = None,
    expires_in: float | None = None,
    debit_limits: list[str] | None = None,
    rate: str | None = None,
) -> str:
    """The new key's token (shown once: only its hash is stored). ``users``: bound to these
    users (None: every user); ``expires_in``: seconds it lives (None: until revoked). Limits
    are off unless given: ``debit_limits`` (``AMOUNT/PERIOD``, a period at most once) and
    ``rate`` (``N/PERIOD``). Raises KeyCommandError."""
    try:
        name, scopes = keys.check_name(name), keys.check_scopes(scopes)
        users = None if users is None else keys.check_users(users)
        if expires_in is not None and not 0 < expires_in <= keys.EXPIRES_IN_MAX:
            raise ValueError(f"--expires-in must be 1..{keys.EXPIRES_IN_MAX:g} seconds")
        debits = keys.check_debit_limits(debit_limits or [])
        per = None if rate is None else keys.parse_limit(rate, keys.RATE_PERIODS)
    except ValueError as error:
        raise KeyCommandError(str(error)) from error
    limits = repository.Limits(
        debits.get(60),
        debits.get(3600),
        debits.get(86400),
        None if per is None else per.amount,
        None if per is None else per.seconds,
    )
    token = keys.new_token()
    made = await repository.insert_key(
        conn, name, keys.digest(token), scopes, users, expires_in, limits
    )
    if not made:
        raise KeyCommandError(f"a key named {name!r} exists (revoked keys keep their names)")
    return token


@dataclass(frozen=True, slots=True)
class BoundKey:
    name: str
    token: str  # shown once
    scopes: list[str]
    users: list[int]
    expires_at: datetime


async def create_bound_key(
    pool: ConnectionPool,
    caller: Caller,
    name: str,
    scopes: list[str],
    users: list[int],
    expires_in: int,
) -> BoundKey:
    """A key bound to ``users``, made for ``caller`` by the owner's function, which refuses
    anything but: at least one existing user, scopes among wallet:read/wallet:write and the
    caller's, 1 s to 24 h, a live unbound caller with keys:write. Raises the AppError of each
    refusal (tandem/access/errors.py); the token is made here, only its SHA-256 leaves."""
    try:
        keys.check_name(name)
    except ValueError as error:
        raise ValidationError(
            str(error), details=[{"field": "name", "type": "pattern", "message": str(error)}]
        ) from error
    # A caller without a key (authentication disabled) has no row the function could read.
    caller_id = -1 if caller.api_key_id is None else caller.api_key_id
    token = keys.new_token()
    made = await repository.create_bound_key(
        pool, caller_id, name, keys.digest(token), scopes, users, expires_in
    )
    if made.outcome != "ok":
        refusal, message = REFUSALS[made.outcome]
        raise refusal(message)
    assert made.expires_at is not None
    return BoundKey(name, token, sorted(set(scopes)), sorted(set(users)), made.expires_at)


def describe_limits(limits: repository.Limits) -> str:
    """``debit 5000/hour,20000/day rate 10/second``, or ``-`` for none."""
    debits = [
        keys.describe(Limit(amount, seconds))
        for amount, seconds in (
            (limits.debit_per_minute, 60),
            (limits.debit_per_hour, 3600),
            (limits.debit_per_day, 86400),
        )
        if amount is not None
    ]
    said = [f"debit {','.join(debits)}"] if debits else []
    if limits.rate_requests is not None and limits.rate_seconds is not None:
        said.append(f"rate {keys.describe(Limit(limits.rate_requests, limits.rate_seconds))}")
    return " ".join(said) or "-"


async def list_keys(conn: asyncpg.Connection) -> list[Key]:
    return await repository.list_keys(conn)


async def revoke_key(conn: asyncpg.Connection, name: str) -> None:
    """Raises KeyCommandError when no key has this name; revoking twice is a no-op."""
    if await repository.revoke_key(conn, name) is None:
        raise KeyCommandError(f"no key named {name!r}")


async def ensure_configured_key(conn: asyncpg.Connection, token: str, name: str) -> None:
    """Register the key given to the server (TANDEM_API_KEY, a compose secret, the local
    development key) with every scope, unless it is there already. Never revives a revoked
    key, never replaces another key of that name: both are logged as errors."""
    if not keys.well_formed(token):
        raise KeyCommandError(
            "the configured API key is not a Tandem token (tdm_ and 43 URL-safe characters): "
            'make one with `tandem keys create`, or `python -c "import secrets; '
            "print('tdm_' + secrets.token_urlsafe(32))\"`"
        )
    try:
        keys.check_name(name)
    except ValueError as error:
        raise KeyCommandError(f"TANDEM_API_KEY_NAME: {error}") from error
    sha256 = keys.digest(token)
    if await repository.insert_key(conn, name, sha256, [ALL]):
        log.info("registered the configured API key %r (scope all)", name)
        return
    found = await repository.key_by_name(conn, name, sha256)
    if found is None or not found[1]:
        log.error(
            "the configured API key was not registered: the name %r belongs to another key "
            "(set TANDEM_API_KEY_NAME, or revoke the other)",
            name,
        )


async def register_configured_key(settings: Settings, database: Database) -> None:
    """The configured key (TANDEM_API_KEY or its file), registered once the schema is there:
    an instance may start before its migrations, so it tries again until it can."""
    token = settings.configured_api_key()
    if token is None:
        return
    while True:
        try:
            async with database.pool.acquire() as conn:
                await ensure_configured_key(conn, token, settings.api_key_name)
            return
        except KeyCommandError as error:
            log.error("%s", error)
            return
        except Exception as error:
            log.warning("cannot register the configured API key yet (%s); retrying", error)
            await asyncio.sleep(1.0)
