"""Webhook endpoints: their rules (who may, what a URL may be, where a new one starts, a
rotation's overlap, a replay's cursor). The sending is delivery.py's, the worker relay.py's."""

from __future__ import annotations

import asyncio

from tandem.core.callers import Caller
from tandem.core.errors import ForbiddenError, ValidationError
from tandem.core.ids import INT64_MAX
from tandem.core.pool import ConnectionPool
from tandem.core.settings import Settings
from tandem.events import delivery, repository
from tandem.events.errors import (
    CursorExpiredError,
    EndpointNotFoundError,
    InvalidCursorError,
)
from tandem.events.repository import Endpoint
from tandem.events.service import needs_stream, parse_cursor, parse_types

# Rounds of stamping a new endpoint makes before it takes the stream's end as its start.
_STAMP_ROUNDS = 50


class WebhookUrlRefusedError(ValidationError):
    code = "webhook_url_refused"


def _unbound(caller: Caller) -> None:
    # The policy table refuses bound keys before the route runs; said again where it matters:
    # an endpoint receives every user's events.
    if caller.users is not None:
        raise ForbiddenError("webhook endpoints receive every user's events: unbound keys only")


async def check_url(url: str, settings: Settings) -> str:
    """``url`` if a delivery may go there: http or https, no credentials, and (unless
    TANDEM_WEBHOOKS_ALLOW_PRIVATE) a host resolving to a public address. Checked again at
    every delivery (a DNS answer may change)."""
    try:
        target = delivery.parse_url(url)
        async with asyncio.timeout(settings.webhooks_timeout):
            await delivery.resolve(target, settings.webhooks_allow_private)
    except delivery.TargetRefusedError as error:
        raise _refused(str(error)) from None
    except TimeoutError:
        raise _refused("the URL's host did not resolve in time") from None
    except (OSError, ValueError) as error:
        # ValueError: a host name IDNA refuses (an empty or over-long label).
        raise _refused(f"the URL's host does not resolve: {error}") from None
    return url


def _refused(message: str) -> WebhookUrlRefusedError:
    return WebhookUrlRefusedError(
        message, details=[{"field": "url", "type": "webhook_url_refused", "message": message}]
    )


def _types(types: list[str] | None) -> list[str] | None:
    return None if types is None else parse_types(",".join(types))


async def _stream_end(pool: ConnectionPool) -> int:
    """Where a new endpoint starts: the stream's end once every event committed so far has
    its position (stamped here, if the delivery worker has not yet): it then receives exactly
    the events committed after it was created."""
    async with pool.acquire() as conn:
        for _ in range(_STAMP_ROUNDS):
            stamped, last = await repository.stamp_events(conn, 10_000)
            if last is not None and stamped < 10_000:
                return last
    # The worker holds the stream each time: its end as it stands (events committed just
    # before may come too: at least once, never fewer).
    last, _pruned = await repository.stream_bounds(pool)
    return last


@needs_stream
async def create_endpoint(
    pool: ConnectionPool, settings: Settings, caller: Caller, url: str, types: list[str] | None
) -> tuple[Endpoint, str]:
    """A new endpoint and its secret (shown once)."""
    _unbound(caller)
    wanted = _types(types)
    checked = await check_url(url, settings)
    secret = delivery.new_secret()
    start = await _stream_end(pool)
    made = await repository.create_endpoint(pool, checked, wanted, secret, start, caller.api_key_id)
    return made, secret


@needs_stream
async def get_endpoint(pool: ConnectionPool, caller: Caller, endpoint_id: int) -> Endpoint:
    _unbound(caller)
    found = await repository.get_endpoint(pool, endpoint_id)
    if found is None:
        raise EndpointNotFoundError(endpoint_id)
    return found


@needs_stream
async def list_endpoints(pool: ConnectionPool, caller: Caller) -> list[Endpoint]:
    _unbound(caller)
    return await repository.list_endpoints(pool)


@needs_stream
async def update_endpoint(
    pool: ConnectionPool,
    settings: Settings,
    caller: Caller,
    endpoint_id: int,
    url: str | None,
    types_given: bool,
    types: list[str] | None,
    enabled: bool | None,
) -> Endpoint:
    _unbound(caller)
    wanted = _types(types) if types_given else None
    checked = None if url is None else await check_url(url, settings)
    if enabled:
        # Enabled again with a cursor the retention has passed: the events after it are gone,
        # and the endpoint would never know; a replay from a kept cursor says so.
        found = await repository.get_endpoint(pool, endpoint_id)
        if found is None:
            raise EndpointNotFoundError(endpoint_id)
        _last, pruned = await repository.stream_bounds(pool)
        if found.position < pruned:
            raise CursorExpiredError(found.position, pruned)
    found = await repository.update_endpoint(
        pool, endpoint_id, checked, types_given, wanted, enabled
    )
    if found is None:
        raise EndpointNotFoundError(endpoint_id)
    return found


@needs_stream
async def delete_endpoint(pool: ConnectionPool, caller: Caller, endpoint_id: int) -> None:
    _unbound(caller)
    if not await repository.delete_endpoint(pool, endpoint_id):
        raise EndpointNotFoundError(endpoint_id)


@needs_stream
async def rotate_secret(
    pool: ConnectionPool, caller: Caller, endpoint_id: int, overlap: int
) -> tuple[Endpoint, str]:
    _unbound(caller)
    secret = delivery.new_secret()
    found = await repository.rotate_secret(pool, endpoint_id, secret, overlap)
    if found is None:
        raise EndpointNotFoundError(endpoint_id)
    return found, secret


@needs_stream
async def replay(pool: ConnectionPool, caller: Caller, endpoint_id: int, cursor: str) -> Endpoint:
    """Sends the endpoint's events again from after ``cursor`` (a cursor of GET /events)."""
    _unbound(caller)
    position = parse_cursor(cursor)
    last, pruned = await repository.stream_bounds(pool)
    if position < pruned:
        raise CursorExpiredError(position, pruned)
    if position > last:
        raise InvalidCursorError(f"cursor {position} is past the end of the stream ({last})")
    found = await repository.replay_endpoint(pool, endpoint_id, position)
    if found is None:
        raise EndpointNotFoundError(endpoint_id)
    return found


@needs_stream
async def list_deliveries(
    pool: ConnectionPool, caller: Caller, endpoint_id: int, before: int | None, limit: int
) -> tuple[list[repository.Delivery], int | None]:
    """The endpoint's attempts, newest first, and the ``before`` of the next page."""
    await get_endpoint(pool, caller, endpoint_id)
    rows = await repository.list_deliveries(
        pool, endpoint_id, INT64_MAX if before is None else before, limit + 1
    )
    page = rows[:limit]
    return page, page[-1].id if len(rows) > limit else None
