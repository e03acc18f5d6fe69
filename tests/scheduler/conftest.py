"""Fixtures of the cluster cron's tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.scheduler.registries import PROBE_TABLE
from tests.support import empty_database, query


@pytest.fixture
def cron_db(postgres_url: str) -> Iterator[str]:
    """A migrated database of the test's own, with the probe table."""
    from tandem.core.migrations import upgrade_to_head

    with empty_database(postgres_url) as url:
        upgrade_to_head(url)
        query(url, PROBE_TABLE)
        yield url
