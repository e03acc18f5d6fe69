"""Every live API key, held in each process: no round trip on the hot path, and no way for an
anonymous client to make the database work by sending tokens.

The key table is small (people make keys; requests do not), so each process loads all live
keys (their SHA-256, name and scopes) at start and again every ``ttl`` seconds, in the
background. A request's token is hashed and looked up in memory. A revocation reaches every
instance within ``ttl`` plus one load: each load replaces the whole set. If the keys could not
be reloaded for ``max(2 * ttl, 5 s)`` (the database is unreachable), the cache fails closed:
requests are no longer trusted: the next request reloads them first (one load shared by the
requests that wait for it), and is answered ``503 database_unavailable`` if that fails,
rather than trusting a list a revocation may have changed. The keys used since the last load
are dated in the same refresh (``last_used_at``, one statement).

A key made since the last load works at once, on every instance: a well-formed token the
cache does not hold is looked up by its hash (one probe of a unique index, live keys only,
like the load) and, when found, kept until the next load, which keeps it only while it is
live. What keeps guessed tokens from costing the database anything:

- a token found unknown is remembered as such for ``UNKNOWN_TOKEN_MEMORY`` seconds (a key
  made later has a token nobody could have sent before, and the next load brings it anyway:
  the set of loaded keys is consulted first);
- requests with the same unknown token at once share one lookup (single flight);
- at most ``lookups_per_second`` lookups per process (as many at once); past that, an
  unknown token is refused without one.

A lookup that a load overtook (the load began after it) answers its own request but is not
kept: only a load may decide what stays, so a key revoked meanwhile is not brought back.

A key with an expiry (``api_keys.expires_at``) is refused from that instant on, by the wall
clock of the process (``wall_clock``), whatever the loads: each one carries its expiry.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

from tandem.access import keys, repository
from tandem.core.callers import Caller
from tandem.core.database import Database
from tandem.core.errors import AppError, DatabaseUnavailableError
from tandem.observability.metrics import ACCESS_KEY_LOOKUPS, ACCESS_KEY_LOOKUPS_AVOIDED

log = logging.getLogger(__name__)

# Seconds a token found unknown is refused without a lookup. With the lookup limit this also
# bounds the memory it takes: at most lookups_per_second * UNKNOWN_TOKEN_MEMORY tokens.
UNKNOWN_TOKEN_MEMORY = 60.0

_FOUND = ACCESS_KEY_LOOKUPS.labels("found")
_UNKNOWN = ACCESS_KEY_LOOKUPS.labels("unknown")
_FAILED = ACCESS_KEY_LOOKUPS.labels("failed")
_REMEMBERED = ACCESS_KEY_LOOKUPS_AVOIDED.labels("remembered")
_SHARED = ACCESS_KEY_LOOKUPS_AVOIDED.labels("shared")
_LIMITED = ACCESS_KEY_LOOKUPS_AVOIDED.labels("limited")


def caller_for(row: repository.LiveKey) -> Caller:
    """The caller a live key makes: its binding, its expiry, and its limits (none unless set
    on the key)."""
    users = None if row.bound_user_ids is None else frozenset(row.bound_user_ids)
    limits = row.limits
    if limits == _NO_LIMITS:
        return Caller(row.id, row.name, frozenset(row.scopes), users, row.expires_at)
    return Caller(
        row.id,
        row.name,
        frozenset(row.scopes),
        users,
        row.expires_at,
        keys.debit_limits(limits),
        keys.rate_limit(limits),
        row.parent_key_id,
    )


_NO_LIMITS = repository.Limits()


class KeysNotLoadedError(DatabaseUnavailableError):
    def __init__(self) -> None:
        super().__init__("the API keys could not be loaded from the database; retry")


class TokenBucket:
    """A token bucket: ``rate`` per second, up to ``burst`` at once."""

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self._rate = rate
        self._burst = burst
        self._tokens = burst
        self._at = now

    def take(self, now: float) -> bool:
        self._tokens = min(self._burst, self._tokens + (now - self._at) * self._rate)
        self._at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def wait(self) -> float:
        """Seconds until the next take can succeed (as of the last take)."""
        return max(0.0, (1.0 - self._tokens) / self._rate)


class KeyCache:
    def __init__(
        self,
        database: Database,
        ttl: float,
        *,
        lookups_per_second: float,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._database = database
        self._ttl = ttl
        self._trusted_for = max(2 * ttl, 5.0)
        self._clock = clock
        self._wall_clock = wall_clock
        self._keys: dict[bytes, Caller] = {}
        self._loaded_at = float("-inf")
        # Incremented by every load that starts: a lookup that a load overtook is not kept.
        self._loads = 0
        self._used: set[int] = set()
        self._task: asyncio.Task[None] | None = None
        self._reloading: asyncio.Future[None] | None = None
        self._unknown: dict[bytes, float] = {}  # token hash -> refused without lookup until
        self._lookups: dict[bytes, asyncio.Future[Caller | None]] = {}
        self._allowance = TokenBucket(lookups_per_second, max(1.0, lookups_per_second), clock())

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
        be trusted, reloads them first; raises DatabaseUnavailableError if it cannot, or if
        the lookup of a token it does not hold fails."""
        if self._clock() - self._loaded_at > self._trusted_for:
            await self._reload_now()
        if not keys.well_formed(token):
            return None
        sha256 = keys.digest(token)
        caller = self._keys.get(sha256)
        if caller is None:
            caller = await self._look_up(sha256)
        if caller is None:
            return None
        if caller.expires_at is not None and caller.expires_at <= self._wall_clock():
            return None  # expired since it was loaded (or looked up)
        if caller.api_key_id is not None:
            self._used.add(caller.api_key_id)
        return caller

    async def refresh(self) -> None:
        """Reload every live key, and date the ones used since the last refresh."""
        self._loads += 1
        used, self._used = self._used, set()
        try:
            rows = await repository.live_keys(self._database.pool, sorted(used))
        except BaseException:
            self._used |= used
            raise
        self._keys = {row.sha256: caller_for(row) for row in rows}
        # Counted at the end too: a lookup that began while this load was on its way may have
        # seen a key live that this load's statement, run later, found revoked; it must not
        # put that key back into the keys just loaded.
        self._loads += 1
        self._loaded_at = now = self._clock()
        self._unknown = {sha256: until for sha256, until in self._unknown.items() if until > now}

    # --- a token the cache does not hold -------------------------------------------------

    async def _look_up(self, sha256: bytes) -> Caller | None:
        now = self._clock()
        if self._unknown.get(sha256, now) > now:
            _REMEMBERED.inc()
            return None
        pending = self._lookups.get(sha256)
        if pending is not None:
            _SHARED.inc()
        elif self._allowance.take(now):
            pending = asyncio.ensure_future(self._query(sha256, self._loads))
            self._lookups[sha256] = pending
            pending.add_done_callback(lambda done: self._looked_up(sha256, done))
        else:
            _LIMITED.inc()
            return None
        # shield: one waiter cancelled (its client went away) must not cancel the others'.
        return await asyncio.shield(pending)

    async def _query(self, sha256: bytes, loads: int) -> Caller | None:
        try:
            row = await repository.live_key_by_hash(self._database.pool, sha256)
        except AppError:
            _FAILED.inc()
            raise  # the pool's own classification (database_unavailable)
        except Exception as error:
            _FAILED.inc()
            raise KeysNotLoadedError() from error
        if row is None:
            _UNKNOWN.inc()
            self._unknown[sha256] = self._clock() + UNKNOWN_TOKEN_MEMORY
            return None
        _FOUND.inc()
        caller = caller_for(row)
        if self._loads == loads:
            # No load began since the lookup did, so none can have dropped this key after
            # the lookup saw it live: keep it until the next load decides.
            self._keys[sha256] = caller
        return caller

    def _looked_up(self, sha256: bytes, done: asyncio.Future[Caller | None]) -> None:
        if self._lookups.get(sha256) is done:
            del self._lookups[sha256]
        if not done.cancelled():
            done.exception()  # retrieved here too: every waiter may have gone

    # --- loads ---------------------------------------------------------------------------

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
