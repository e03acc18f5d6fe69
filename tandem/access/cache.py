"""Verified keys, cached in the process: no extra round trip on the hot path.

A token's lookup (one index probe) is remembered for ``ttl`` seconds, found or not, so a
revocation reaches every instance within ``ttl`` plus one lookup. Concurrent requests with a
token not in the cache share one lookup (a 10000-request burst makes one query, not 10000).
The cache is bounded: past ``max_entries`` the expired entries go, then the oldest.
"""

from __future__ import annotations

import asyncio
import time

from tandem.access import keys, repository
from tandem.core.callers import Caller
from tandem.core.database import Database


class KeyCache:
    def __init__(self, database: Database, ttl: float, max_entries: int = 10_000) -> None:
        self._database = database
        self._ttl = ttl
        self._max = max_entries
        self._entries: dict[bytes, tuple[float, Caller | None]] = {}
        self._loading: dict[bytes, asyncio.Future[Caller | None]] = {}

    async def resolve(self, token: str) -> Caller | None:
        """The live key this token belongs to, or None. Raises the pool's
        DatabaseUnavailableError when it cannot be looked up."""
        if not keys.well_formed(token):
            return None
        sha256 = keys.digest(token)
        hit = self._entries.get(sha256)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        loading = self._loading.get(sha256)
        if loading is None:
            loading = asyncio.ensure_future(self._load(sha256))
            self._loading[sha256] = loading
            loading.add_done_callback(lambda _: self._loading.pop(sha256, None))
        # shield: one waiter cancelled (its client went away) must not cancel the others'.
        return await asyncio.shield(loading)

    async def _load(self, sha256: bytes) -> Caller | None:
        found = await repository.lookup(self._database.hot, sha256)
        caller = None if found is None else Caller(found.id, found.name, frozenset(found.scopes))
        now = time.monotonic()
        if len(self._entries) >= self._max:
            self._evict(now)
        self._entries[sha256] = (now + self._ttl, caller)
        return caller

    def _evict(self, now: float) -> None:
        for sha256 in [k for k, (until, _) in self._entries.items() if until <= now]:
            del self._entries[sha256]
        excess = len(self._entries) - self._max // 2
        for sha256 in list(self._entries)[: max(excess, 0)]:
            del self._entries[sha256]
