"""Fixtures of the fault tests: a PostgreSQL of the test's own (never the suite's), and a
fresh database on it. A module may define its own (the older ones still do)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.faults.postgres import ThrowawayPostgres, throwaway_postgres
from tests.support import fresh_database


@pytest.fixture
def pg() -> Iterator[ThrowawayPostgres]:
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def pg_url(pg: ThrowawayPostgres) -> Iterator[str]:
    with fresh_database(pg.url) as url:
        yield url
