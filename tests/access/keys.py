"""API keys for the access tests, made and revoked through the service the CLI uses, and the
key cache's lookup counters."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable

import asyncpg
import httpx
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tandem.access import service
from tandem.core.database import asyncpg_dsn

LOOKUPS = "tandem_access_key_lookups_total"
AVOIDED = "tandem_access_key_lookups_avoided_total"


async def make_key(
    database_url: str,
    name: str,
    *scopes: str,
    revoked: bool = False,
    known_to: httpx.AsyncClient | None = None,
    users: list[int] | None = None,
    expires_in: float | None = None,
    debit_limits: tuple[str, ...] = (),
    rate: str | None = None,
) -> str:
    """A new key's token (``revoked``: revoked at once; ``users``: bound to them;
    ``expires_in``: seconds it lives; with the limits given, as ``tandem keys create
    --debit-limit/--rate`` takes them). With ``known_to``, returns once that app accepts the
    key (at once, unless its lookups of unknown tokens are spent)."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        # One transaction: no reload of a running app can see a revoked key live in between.
        async with conn.transaction():
            token = await service.create_key(
                conn, name, list(scopes), users, expires_in, list(debit_limits), rate
            )
            if revoked:
                await service.revoke_key(conn, name)
    finally:
        await conn.close()
    if known_to is not None:
        async with asyncio.timeout(10):
            # A refusal announces nothing: polled.
            while (await known_to.get("/openapi.json", headers=bearer(token))).status_code == 401:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
    return token


async def revoke_key(database_url: str, name: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await service.revoke_key(conn, name)
    finally:
        await conn.close()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def lookup_counts() -> dict[str, float]:
    """This process's key-lookup counters, by result and by reason avoided."""
    return _counts(family.samples for family in REGISTRY.collect())


def scraped_lookup_counts(exposition: str) -> dict[str, float]:
    """The same counters, from a server's /metrics page."""
    return _counts(family.samples for family in text_string_to_metric_families(exposition))


def _counts(sample_lists: Iterable[list[Sample]]) -> dict[str, float]:
    counts: dict[str, float] = {}
    for samples in sample_lists:
        for sample in samples:
            if sample.name == LOOKUPS:
                counts[sample.labels["result"]] = sample.value
            elif sample.name == AVOIDED:
                counts[sample.labels["reason"]] = sample.value
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    """What each counter gained (the ones that gained nothing left out)."""
    gained = {name: after.get(name, 0.0) - before.get(name, 0.0) for name in after}
    return {name: value for name, value in gained.items() if value}
