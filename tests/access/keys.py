"""API keys for the access tests, made and revoked through the service the CLI uses."""

from __future__ import annotations

import asyncio

import asyncpg
import httpx

from tandem.access import service
from tandem.core.database import asyncpg_dsn


async def make_key(
    database_url: str,
    name: str,
    *scopes: str,
    revoked: bool = False,
    known_to: httpx.AsyncClient | None = None,
) -> str:
    """A new key's token (``revoked``: revoked at once). With ``known_to``, returns once that
    app has loaded the key (its cache reloads the keys every TTL)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        token = await service.create_key(conn, name, list(scopes))
        if revoked:
            await service.revoke_key(conn, name)
    finally:
        await conn.close()
    if known_to is not None:
        async with asyncio.timeout(10):
            # A reload announces nothing: polled.
            while (await known_to.get("/openapi.json", headers=bearer(token))).status_code == 401:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}
