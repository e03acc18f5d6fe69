"""The change stream's rules: cursors, who sees what, and waiting for what comes next.

A cursor is a position of the stream (tandem_stamp_events_v1 gives positions in one order
that every reader shares, never skipping one), spelled as its decimal number. ``next`` is
the position the reader has seen through: the last event of a full page, else the end of
what was scanned (all of it committed: repository.READ_EVENTS).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

import asyncpg

from tandem.core.callers import Caller
from tandem.core.errors import UserNotFoundError
from tandem.core.ids import INT64_MAX
from tandem.core.pool import ConnectionPool
from tandem.events import repository
from tandem.events.errors import (
    CursorExpiredError,
    EventsUnavailableError,
    InvalidCursorError,
    UnknownEventTypeError,
)
from tandem.events.models import EVENT_TYPES
from tandem.wallet.repository import user_exists

log = logging.getLogger(__name__)

# A page's largest size and its default; the longest a read may wait for events (seconds).
PAGE_MAX = 1000
PAGE_DEFAULT = 100
WAIT_MAX = 30.0
# A filtered read scans at most this many positions after its cursor (an index range), and
# tells the reader how far it looked: a rare type or user never makes one read scan the
# whole stream.
SCAN_WINDOW = 10_000
# How often a process looks at the stream's end while some request waits for events
# (seconds): one short read for all its waiters together, on a pool connection held only
# for that read.
WATCH_INTERVAL = 0.1


P = ParamSpec("P")
R = TypeVar("R")


def needs_stream(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """``function``, answering 503 events_unavailable while the database is below migration
    0019 (its tables and functions missing, during a rolling deploy) instead of failing."""

    @functools.wraps(function)
    async def checked(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await function(*args, **kwargs)
        except (asyncpg.UndefinedTableError, asyncpg.UndefinedFunctionError) as error:
            raise EventsUnavailableError() from error

    return checked


def parse_cursor(raw: str) -> int:
    """A cursor as a client sends it: the decimal position, 0 for the stream's start."""
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > INT64_MAX:
        raise InvalidCursorError(f"invalid cursor {raw[:40]!r}: a cursor is what 'next' gave")
    return int(raw)


def parse_types(raw: str | None) -> list[str] | None:
    """``types``: event types separated by commas; None: every type."""
    if raw is None:
        return None
    types = list(dict.fromkeys(t.strip() for t in raw.split(",")))
    unknown = [t for t in types if t not in EVENT_TYPES]
    if unknown or not types:
        raise UnknownEventTypeError(
            f"unknown event type {(unknown or [''])[0][:60]!r}; known: {', '.join(EVENT_TYPES)}",
            details=[
                {"field": "types", "type": "unknown_event_type", "message": t} for t in unknown
            ],
        )
    return types


@dataclass(frozen=True, slots=True)
class EventPage:
    """Events as JSON texts (what the API lists and webhooks send) and the cursor after them."""

    events: list[str]
    next: int

    def to_json_bytes(self) -> bytes:
        return f'{{"events":[{",".join(self.events)}],"next":"{self.next}"}}'.encode()


def _users_for(caller: Caller, user_id: int | None) -> list[int] | None:
    """Whose events ``caller`` reads: every user's (None) for an unbound key without a filter;
    else the filter's user, which a bound key must be bound to (else: no such user, as on
    every route), or all of a bound key's users."""
    if user_id is not None:
        if not caller.may_touch(user_id):
            raise UserNotFoundError(user_id)
        return [user_id]
    if caller.users is None:
        return None
    return sorted(caller.users)


def _as_seen_by(caller: Caller, body: str) -> str:
    """An event as a bound key may see it: a transfer's or a capture's legs of its users only,
    and a payer's held amount only to a key bound to the payer."""
    event: dict[str, Any] = json.loads(body)
    data = event["data"]
    if "legs" in data:
        data["legs"] = [leg for leg in data["legs"] if caller.may_touch(leg["userId"])]
    if "held" in data and not caller.may_touch(data["userId"]):
        del data["held"]
    return json.dumps(event, separators=(",", ":"))


@needs_stream
async def read_events(
    pool: ConnectionPool,
    caller: Caller,
    after: int | None,
    types: list[str] | None,
    user_id: int | None,
    limit: int,
) -> EventPage:
    """Up to ``limit`` events after the cursor ``after`` (None: from the oldest kept)."""
    users = _users_for(caller, user_id)
    page = await repository.read_events(pool, after or 0, limit, types, users, SCAN_WINDOW)
    if after is not None and after < page.pruned_through:
        raise CursorExpiredError(after, page.pruned_through)
    if page.start > page.last_position:
        raise InvalidCursorError(
            f"cursor {page.start} is past the end of the stream ({page.last_position}): a "
            "cursor is what 'next' gave"
        )
    if user_id is not None and not page.events and not await user_exists(pool, user_id):
        # As every route tells of a user that does not exist (a bound key is told the same
        # of a user it is not bound to, above).
        raise UserNotFoundError(user_id)
    bodies = [e.body for e in page.events]
    if caller.users is not None:
        bodies = [_as_seen_by(caller, body) for body in bodies]
    if len(page.events) == limit:
        next_position = page.events[-1].position
    else:
        next_position = min(page.last_position, page.start + SCAN_WINDOW)
    return EventPage(bodies, next_position)


async def wait_for_events(
    pool: ConnectionPool,
    watch: StreamWatch,
    caller: Caller,
    after: int | None,
    types: list[str] | None,
    user_id: int | None,
    limit: int,
    wait: float,
) -> EventPage:
    """``read_events``, and while it finds nothing, for up to ``wait`` seconds, again each
    time the stream moves past where it was read (no connection held while waiting)."""
    deadline = time.monotonic() + wait
    page = await read_events(pool, caller, after, types, user_id, limit)
    while not page.events:
        left = deadline - time.monotonic()
        if left <= 0 or not await watch.wait_past(page.next, left):
            break
        page = await read_events(pool, caller, page.next, types, user_id, limit)
    return page


class StreamWatch:
    """Where the stream ends, for a process's waiting requests: they wait on an asyncio
    condition, woken by ``moved`` (the delivery worker's own stamping, or a notification)
    or by one poll loop that runs only while someone waits."""

    def __init__(self, pool_of: Any, interval: float = WATCH_INTERVAL, poll: bool = True) -> None:
        # pool_of: a callable returning the process's request pool (opened at start); poll:
        # False when ``moved`` is always called (the delivery worker's own stamping).
        self._pool_of = pool_of
        self._interval = interval
        self._poll_enabled = poll
        self._last = 0
        self._waiters = 0
        self._moved = asyncio.Condition()
        self._poller: asyncio.Task[None] | None = None

    @property
    def last_position(self) -> int:
        return self._last

    def moved(self, last_position: int) -> None:
        """The stream now ends at ``last_position`` (or later)."""
        if last_position > self._last:
            self._last = last_position
            asyncio.get_running_loop().create_task(self._wake())

    async def _wake(self) -> None:
        async with self._moved:
            self._moved.notify_all()

    async def wait_past(self, position: int, within: float) -> bool:
        """Whether the stream moved past ``position`` within ``within`` seconds."""
        if self._last > position:
            return True
        self._waiters += 1
        if self._poll_enabled and (self._poller is None or self._poller.done()):
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        try:
            async with self._moved:
                await asyncio.wait_for(self._moved.wait_for(lambda: self._last > position), within)
            return True
        except TimeoutError:
            return False
        finally:
            self._waiters -= 1

    async def _poll(self) -> None:
        while self._waiters > 0:
            try:
                last, _pruned = await repository.stream_bounds(self._pool_of())
            except Exception as error:  # the next read answers the failure; keep watching
                log.debug("the stream's end could not be read: %r", error)
            else:
                self.moved(last)
            await asyncio.sleep(self._interval)

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
