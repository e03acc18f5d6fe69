"""A token the key cache does not hold is looked up by its hash: a key works as soon as it is
made, a revoked key is never found, and unknown tokens cost the database at most one lookup
each, shared by concurrent requests and capped per process. In process, against the real
database; lookups are counted by the cache's Prometheus counters."""

from __future__ import annotations

import asyncio

import pytest

from tandem.access.cache import KeyCache
from tandem.access.keys import new_token
from tandem.core.database import Database
from tests.access.keys import delta, lookup_counts, make_key, revoke_key

LIMIT = 3.0  # lookups per second, and at once


class Clock:
    """A monotonic clock the test moves: the lookup limit's refill is then exact."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def cache(database: Database, clock: Clock) -> KeyCache:
    """A cache loaded once; it reloads only when a test says so (no refresh loop)."""
    keys = KeyCache(database, 2.0, lookups_per_second=LIMIT, clock=clock)
    await keys.refresh()
    return keys


async def test_a_key_made_after_the_load_works_at_once(cache: KeyCache, database_url: str) -> None:
    """Made after the cache's load: found by its hash on its first use, then held."""
    token = await make_key(database_url, "made-later", "wallet:read")
    before = lookup_counts()
    caller = await cache.resolve(token)
    assert caller is not None
    assert caller.name == "made-later"
    assert caller.scopes == frozenset({"wallet:read"})
    assert (await cache.resolve(token)) == caller
    assert delta(before, lookup_counts()) == {"found": 1}


async def test_a_revoked_key_is_never_found_by_its_hash(cache: KeyCache, database_url: str) -> None:
    """The lookup reads live keys only, as the load does."""
    token = await make_key(database_url, "revoked-before-use", "all", revoked=True)
    before = lookup_counts()
    assert await cache.resolve(token) is None
    assert delta(before, lookup_counts()) == {"unknown": 1}


async def test_a_key_found_by_its_hash_is_dropped_by_the_load_after_its_revocation(
    cache: KeyCache, database_url: str
) -> None:
    """Revocation reaches a key the lookup brought in like any other: the next load."""
    token = await make_key(database_url, "found-then-revoked", "all")
    assert await cache.resolve(token) is not None
    await revoke_key(database_url, "found-then-revoked")
    await cache.refresh()
    before = lookup_counts()
    assert await cache.resolve(token) is None
    assert delta(before, lookup_counts()) == {"unknown": 1}, "looked up again, not held"


async def test_an_unknown_token_is_looked_up_once(cache: KeyCache) -> None:
    """Found unknown, a token is refused from memory afterwards."""
    token = new_token()
    before = lookup_counts()
    for _ in range(20):
        assert await cache.resolve(token) is None
    assert delta(before, lookup_counts()) == {"unknown": 1, "remembered": 19}


async def test_concurrent_requests_with_one_unknown_token_share_one_lookup(
    cache: KeyCache,
) -> None:
    """Single flight: 50 requests at once, one query."""
    token = new_token()
    before = lookup_counts()
    assert await asyncio.gather(*(cache.resolve(token) for _ in range(50))) == [None] * 50
    assert delta(before, lookup_counts()) == {"unknown": 1, "shared": 49}


async def test_lookups_past_the_limit_are_refused_without_one(
    cache: KeyCache, clock: Clock, database_url: str
) -> None:
    """Distinct random tokens: LIMIT lookups at once, then LIMIT per second; the rest are
    refused with no query (a key made meanwhile waits for the limit, or the next load)."""
    before = lookup_counts()
    for _ in range(20):
        assert await cache.resolve(new_token()) is None
    assert delta(before, lookup_counts()) == {"unknown": LIMIT, "limited": 20 - LIMIT}

    token = await make_key(database_url, "made-while-limited", "all")
    before = lookup_counts()
    assert await cache.resolve(token) is None
    assert delta(before, lookup_counts()) == {"limited": 1}

    clock.now += 1.0  # a second's worth of lookups
    assert await cache.resolve(token) is not None
    assert delta(before, lookup_counts()) == {"limited": 1, "found": 1}
