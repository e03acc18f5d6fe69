"""The change stream as the tests read it: the sequencer's round run by hand (what the
delivery worker runs), and GET /events followed page by page."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx

from tandem.core.database import asyncpg_dsn
from tandem.events import repository


async def stamp(url: str) -> int | None:
    """One round of the sequencer (what the delivery worker runs); the stream's last position."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        return (await repository.stamp_events(conn, 10_000))[1]
    finally:
        await conn.close()


async def follow(
    client: httpx.AsyncClient, after: str | None = None, **params: Any
) -> tuple[list[dict[str, Any]], str]:
    """Every event after ``after``, page by page (small pages: the paging is tested too), and
    the cursor after the last."""
    events: list[dict[str, Any]] = []
    cursor = after
    while True:
        query = {"limit": 7, **params, **({} if cursor is None else {"after": cursor})}
        response = await client.get("/events", params=query)
        assert response.status_code == 200, response.text
        page = response.json()
        events += page["events"]
        if page["next"] == cursor or not page["events"]:
            return events, page["next"]
        cursor = page["next"]


async def cursor_now(client: httpx.AsyncClient, url: str) -> str:
    """The stream's end: a cursor after everything committed so far."""
    await stamp(url)
    _, cursor = await follow(client)
    return cursor
