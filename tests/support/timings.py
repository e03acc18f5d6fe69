"""Time in the tests: waiting for a condition (never a fixed sleep followed by a count), and
the cluster cron's compressed timings."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable


def wait_for(
    predicate: Callable[[], object],
    timeout: float,
    what: str = "condition",
    *,
    step: float = 0.1,
) -> None:
    """Poll ``predicate`` until it is true; fail the test after ``timeout`` seconds, saying
    ``what`` was awaited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(step)
    raise AssertionError(f"{what}: not met within {timeout} s")


async def eventually(predicate: Callable[[], object], within: float) -> None:
    """``wait_for`` for async tests: poll without blocking the event loop."""
    async with asyncio.timeout(within):
        while not predicate():  # noqa: ASYNC110  (state changes announce nothing to wait on)
            await asyncio.sleep(0.02)


async def until(condition: Callable[[], Awaitable[object]], within: float) -> None:
    """``eventually`` for a condition that must itself await (a query, a request)."""
    async with asyncio.timeout(within):
        while not await condition():  # noqa: ASYNC110  (see eventually)
            await asyncio.sleep(0.05)


# The cluster cron's timings for the tests: compressed, but with room for five Python
# processes and PostgreSQL on two shared cores: a heartbeat can be late by a second without a
# run being self-fenced.
POLL, LEASE = 0.2, 3.0
CRON_TIMINGS = {
    "TANDEM_SCHEDULER_ENABLED": "true",
    "TANDEM_MAINTENANCE_ENABLED": "false",
    "TANDEM_SCHEDULER_POLL_INTERVAL": str(POLL),
    "TANDEM_SCHEDULER_HEARTBEAT_INTERVAL": "0.5",
    "TANDEM_SCHEDULER_LEASE": str(LEASE),
    "TANDEM_SCHEDULER_SELF_FENCE_AFTER": "2.0",
    "TANDEM_SCHEDULER_STEAL_AFTER": "1.0",
    "TANDEM_LOG_LEVEL": "warning",
}


def cron_settings() -> dict[str, str]:
    """CRON_TIMINGS as keyword arguments of ``Settings`` (for an app run in process)."""
    prefix = "TANDEM_"
    return {key[len(prefix) :].lower(): value for key, value in CRON_TIMINGS.items()}
