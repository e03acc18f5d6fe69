"""API keys: create, list, revoke (the CLI's), and the key configured at start."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from tandem.access import keys, repository
from tandem.access.repository import Key
from tandem.core.callers import ALL
from tandem.core.database import Database
from tandem.core.settings import Settings

log = logging.getLogger(__name__)


class KeyCommandError(ValueError):
    """A refusal of the key commands, said to the operator as is."""


# Keys are the owner's to make and revoke: the application's role may not (migration 0015).
_NOT_THE_OWNER = (
    "this database role may not make or revoke keys: run the command with the owner's URL "
    "(TANDEM_DATABASE_DIRECT_URL, as `tandem migrate` has it)"
)


async def create_key(conn: asyncpg.Connection, name: str, scopes: list[str]) -> str:
    """The new key's token (shown once: only its hash is stored). Raises KeyCommandError."""
    try:
        name, scopes = keys.check_name(name), keys.check_scopes(scopes)
    except ValueError as error:
        raise KeyCommandError(str(error)) from error
    token = keys.new_token()
    try:
        inserted = await repository.insert_key(conn, name, keys.digest(token), scopes)
    except asyncpg.InsufficientPrivilegeError as error:
        raise KeyCommandError(_NOT_THE_OWNER) from error
    if not inserted:
        raise KeyCommandError(f"a key named {name!r} exists (revoked keys keep their names)")
    return token


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
