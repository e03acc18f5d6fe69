"""Every live API key, held in each process: no round trip on the hot path, and no way for an
anonymous client to make the database work by sending tokens.

The key table is small (people make keys; requests do not), so each process loads all live
keys (their SHA-256, name and scopes) at start and again every ``ttl`` seconds, in the
background. A request's token is hashed and looked up in memory. A revocation or a new key
reaches every instance within ``ttl`` plus one load. If the keys could not be reloaded for
``max(2 * ttl, 5 s)`` (the database is unreachable), the cache fails closed: requests are
no longer trusted: the next request reloads them first (one load shared by the requests that
wait for it), and is answered ``503 database_unavailable`` if that fails, rather than
trusting a list a revocation may have changed. The
keys used since the last load are dated in the same refresh (``last_used_at``, one statement).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from tandem.access import keys, repository
from tandem.core.callers import Caller
from tandem.core.database import Database
from tandem.core.errors import AppError, DatabaseUnavailableError

log = logging.getLogger(__name__)


class KeysNotLoadedError(DatabaseUnavailableError):
    def __init__(self) -> None:
        super().__init__("the API keys could not be loaded from the database; retry")


class KeyCache:
    def __init__(self, database: Database, ttl: float) -> None:
        self._database = database
        self._ttl = ttl
        self._trusted_for = max(2 * ttl, 5.0)
        self._keys: dict[bytes, Caller] = {}
        self._loaded_at = float("-inf")
        self._used: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._reloading: asyncio.Future[None] | None = None

    async def start(self) -> None:
        """Load once (failures are retried by the refresh loop) and start refreshing."""
        await self._refresh_quietly()
        self._task = asyncio.create_task(self._refresh_forever(), name="tandem-api-keys")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def resolve(self, token: str) -> Caller | None:
        """The live key this token belongs to, or None. When the keys in memory are too old to
        be trusted, reloads them first; raises DatabaseUnavailableError if it cannot."""
        if time.monotonic() - self._loaded_at > self._trusted_for:
            await self._reload_now()
        if not keys.well_formed(token):
            return None
        caller = self._keys.get(keys.digest(token))
        if caller is not None and caller.api_key_id is not None:
            self._used.add(caller.api_key_id)
        return caller

    async def refresh(self) -> None:
        """Reload every live key, and date the ones used since the last refresh."""
        used, self._used = self._used, set()
        try:
            rows = await repository.live_keys(self._database.hot, sorted(used))
        except BaseException:
            self._used |= used
            raise
        self._keys = {row.sha256: Caller(row.id, row.name, frozenset(row.scopes)) for row in rows}
        self._loaded_at = time.monotonic()

    async def _reload_now(self) -> None:
        if self._reloading is None:
            self._reloading = asyncio.ensure_future(self.refresh())
            self._reloading.add_done_callback(self._reloaded)
        try:
            # shield: one waiter cancelled (its client went away) must not cancel the others'.
            await asyncio.shield(self._reloading)
        except AppError:
            raise  # the pool's own classification (database_unavailable)
        except Exception as error:
            raise KeysNotLoadedError() from error

    def _reloaded(self, done: asyncio.Future[None]) -> None:
        self._reloading = None
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._ttl)
            await self._refresh_quietly()

    async def _refresh_quietly(self) -> None:
        try:
            await self.refresh()
        except Exception as error:
            log.warning("cannot load the API keys (%s); retrying in %g s", error, self._ttl)
