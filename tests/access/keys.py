"""API keys for the access tests, made and revoked through the service the CLI uses."""

from __future__ import annotations

import asyncpg

from tandem.access import service
from tandem.core.database import asyncpg_dsn


async def make_key(database_url: str, name: str, *scopes: str, revoked: bool = False) -> str:
    """A new key's token (``revoked``: revoked before its first use, so never cached)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        token = await service.create_key(conn, name, list(scopes))
        if revoked:
            await service.revoke_key(conn, name)
    finally:
        await conn.close()
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
