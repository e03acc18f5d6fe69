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
from tandem.core.callers import ALL, Caller
from tandem.core.database import Database
from tandem.core.errors import ValidationError
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings

log = logging.getLogger(__name__)


class KeyCommandError(ValueError):
    """A refusal of the key commands, said to the operator as is."""


# Keys are the owner's to make and revoke: the application's role may not (migration 0015).
_NOT_THE_OWNER = (
    "this database role may not make or revoke keys: run the command with the owner's URL "
    "(TANDEM_DATABASE_DIRECT_URL, as `tandem migrate` has it)"
)


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
    limits = keys.stored_limits(debits, per)
    token = keys.new_token()
    try:
        made = await repository.insert_key(
            conn, name, keys.digest(token), scopes, users, expires_in, limits
        )
    except asyncpg.InsufficientPrivilegeError as error:
        raise KeyCommandError(_NOT_THE_OWNER) from error
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
    debits = [keys.describe(limit) for limit in keys.debit_limits(limits)]
    said = [f"debit {','.join(debits)}"] if debits else []
    rate = keys.rate_limit(limits)
    if rate is not None:
        said.append(f"rate {keys.describe(rate)}")
    return " ".join(said) or "-"


async def list_keys(conn: asyncpg.Connection) -> list[Key]:
    return await repository.list_keys(conn)


async def revoke_key(conn: asyncpg.Connection, name: str) -> None:
    """Raises KeyCommandError when no key has this name; revoking twice is a no-op."""
    try:
        revoked = await repository.revoke_key(conn, name)
    except asyncpg.InsufficientPrivilegeError as error:
        raise KeyCommandError(_NOT_THE_OWNER) from error
    if revoked is None:
        raise KeyCommandError(f"no key named {name!r}")


# How a key is registered when the application's role may not insert keys (after migration
# 0015): by the owner, which `tandem migrate` is when it is given the key.
REGISTER_AS_OWNER = (
    "run `tandem migrate` with TANDEM_API_KEY (or TANDEM_API_KEY_FILE) set, or `tandem keys "
    "create` on the owner's URL (TANDEM_DATABASE_DIRECT_URL), as docs/access.md says"
)


async def ensure_configured_key(conn: asyncpg.Connection, token: str, name: str) -> bool:
    """Register the key given to the server (TANDEM_API_KEY, a compose secret, the local
    development key) with every scope, unless it is there already; True when it is there
    now. Never revives a revoked key, never replaces another key of that name: both are
    logged as errors. A key already there is found without an INSERT, so a role that may not
    insert keys (the application's, after migration 0015) finds its key too; one that is
    not there raises asyncpg.InsufficientPrivilegeError on such a role."""
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
    found = await repository.key_by_name(conn, name, sha256)
    if found is None and await repository.insert_key(conn, name, sha256, [ALL]):
        log.info("registered the configured API key %r (scope all)", name)
        return True
    found = found or await repository.key_by_name(conn, name, sha256)
    if found is None or not found[1]:
        log.error(
            "the configured API key was not registered: the name %r belongs to another key "
            "(set TANDEM_API_KEY_NAME, or revoke the other)",
            name,
        )
        return False
    return True


async def register_configured_key(settings: Settings, database: Database) -> None:
    """The configured key (TANDEM_API_KEY or its file), registered once the schema is there:
    an instance may start before its migrations, so it tries again until it can. On the
    application's role after migration 0015 it can only be found: registering it is the
    owner's (REGISTER_AS_OWNER), and the instance says so and serves without it."""
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
        except asyncpg.InsufficientPrivilegeError:
            log.error(
                "the configured API key %r is not registered, and this database role may not "
                "register keys: %s",
                settings.api_key_name,
                REGISTER_AS_OWNER,
            )
            return
        except Exception as error:
            log.warning("cannot register the configured API key yet (%s); retrying", error)
            await asyncio.sleep(1.0)
