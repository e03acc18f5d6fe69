"""Browser sessions: what the login cookie holds instead of the key.

A login makes a session: a random token (``tds_`` + 256 bits) for the cookie, of which only
the SHA-256 is stored, with the key, the issue and expiry times (``COOKIE_MAX_AGE``) and, once
the person logs out, the end. Every request carrying the cookie looks its session up in the
database (one probe of a unique index, ``LIVE_SESSION``): no process keeps a session, so a
logout or a revocation of the key on any instance refuses the cookie on every instance at the
next request. People make these requests, not services: one indexed query each is cheap.

What keeps made-up cookies from costing the database anything, as for unknown bearer tokens
(cache.py): a cookie that is not a session token is refused without a query; a token found
dead is remembered as such for ``UNKNOWN_TOKEN_MEMORY`` seconds; and a token this process has
not seen live (issued here or found live) is looked up only within ``lookups_per_second``.

What keeps logins from costing without bound: a login goes through the key's own rate, as
any request of the key does (layer.py); this process remembers at most ``SEEN_MAX`` session
tokens as seen live (the least recently used forgotten first: such a token is then looked up
within the allowance again); housekeeping deletes the sessions ended or expired over a day
ago (maintenance.py). A session starts only through the owner's function, from the key's
raw token (repository.START_SESSION): the application's role cannot write one.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable

from tandem.access import keys, repository
from tandem.access.cache import UNKNOWN_TOKEN_MEMORY, TokenBucket, caller_for
from tandem.core.callers import Caller
from tandem.core.database import Database

# A browser session lasts at most this long (seconds); the key itself may live on.
COOKIE_MAX_AGE = 12 * 3600
SESSION_PREFIX = "tds_"
_TOKEN_RE = re.compile(r"tds_[A-Za-z0-9_-]{43}")
# Session tokens remembered as seen live, per process (about 200 bytes each: 2 MB at most).
SEEN_MAX = 10_000


class Sessions:
    def __init__(
        self,
        database: Database,
        *,
        lookups_per_second: float,
        max_age: int = COOKIE_MAX_AGE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self.max_age = max_age
        self._clock = clock
        # Token hash -> until when it is looked up without the allowance (seen live here);
        # least recently used first, at most SEEN_MAX.
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._unknown: dict[bytes, float] = {}  # token hash -> refused without lookup until
        self._allowance = TokenBucket(lookups_per_second, max(1.0, lookups_per_second), clock())

    async def start(self, key_token: str) -> str | None:
        """A new session of the key whose token is ``key_token`` (typed in the login form:
        the database hashes it and checks the key is live); the session's token, for the
        cookie (only its hash is stored), or None when no live key has that token. Raises
        DatabaseUnavailableError when it cannot be stored."""
        token = SESSION_PREFIX + secrets.token_urlsafe(32)
        sha256 = keys.digest(token)
        key_id = await repository.start_session(
            self._database.pool, key_token, sha256, self.max_age
        )
        if key_id is None:
            return None
        self._remember_seen(sha256)
        return token

    async def resolve(self, token: str) -> Caller | None:
        """The caller of the live session with this token, or None (ended, expired, its key
        revoked, never issued). Raises DatabaseUnavailableError when the lookup fails."""
        if _TOKEN_RE.fullmatch(token) is None:
            return None
        sha256 = keys.digest(token)
        now = self._clock()
        if self._unknown.get(sha256, now) > now:
            return None
        if self._seen.get(sha256, now) <= now and not self._allowance.take(now):
            return None
        row = await repository.live_session(self._database.pool, sha256)
        if row is None:
            self._seen.pop(sha256, None)
            self._unknown = {h: until for h, until in self._unknown.items() if until > now}
            self._unknown[sha256] = now + UNKNOWN_TOKEN_MEMORY
            return None
        self._remember_seen(sha256)
        return caller_for(row)

    async def end(self, token: str) -> None:
        """Ends the session with this token, on every instance at once (a no-op for a token
        that names no live session)."""
        if _TOKEN_RE.fullmatch(token) is None:
            return
        sha256 = keys.digest(token)
        await repository.end_session(self._database.pool, sha256)
        self._seen.pop(sha256, None)

    def _remember_seen(self, sha256: bytes) -> None:
        self._seen[sha256] = self._clock() + self.max_age
        self._seen.move_to_end(sha256)
        while len(self._seen) > SEEN_MAX:
            self._seen.popitem(last=False)
