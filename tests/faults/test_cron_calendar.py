"""A nightly cron task in a zone with daylight saving, across both transitions, on real
server processes over a PostgreSQL whose clock (the only one the scheduler reads) is faked
with libfaketime and moved ahead to just before each night's slot."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from tandem.core.migrations import upgrade_to_head
from tests.faults.postgres import throwaway_postgres
from tests.scheduler.cluster import assert_history_consistent, start_cluster, stop_all
from tests.scheduler.registries import PROBE_TABLE
from tests.support import FakeClock, query, wait_for

BERLIN = ZoneInfo("Europe/Berlin")
LEAD = timedelta(seconds=3)  # the clock is set this long before a slot


def at(text: str) -> datetime:
    return datetime.fromisoformat(text)


@pytest.fixture
def clock() -> Iterator[FakeClock]:
    faked = FakeClock()
    yield faked
    faked.close()


def _runs(url: str) -> list[dict[str, object]]:
    return [
        dict(r)
        for r in query(
            url,
            "SELECT scheduled_for, started_at, finished_at, status, attempt, error, instance_id "
            "FROM task_history ORDER BY fence",
        )
    ]


def _finished(url: str) -> list[dict[str, object]]:
    return [r for r in _runs(url) if r["status"] != "running"]


def _next_run(url: str) -> datetime:
    rows = query(url, "SELECT next_run_at FROM tasks WHERE name = 'Nightly'")
    moment: datetime = rows[0]["next_run_at"]
    return moment


@pytest.mark.parametrize(
    ("first_slot", "nights"),
    [
        # 2027-03-28, 02:00 CET -> 03:00 CEST: 02:30 does not exist; it runs at 03:00.
        pytest.param(
            "2027-03-28T01:00:00+00:00",
            [("2027-03-28T01:00:00+00:00", None), ("2027-03-29T00:30:00+00:00", None)],
            id="spring-forward",
        ),
        # 2027-10-31, 03:00 CEST -> 02:00 CET: 02:30 happens twice; it runs at the first, and
        # the clock is then set just before the second (01:30Z), where nothing may run.
        pytest.param(
            "2027-10-31T00:30:00+00:00",
            [
                ("2027-10-31T00:30:00+00:00", "2027-10-31T01:30:00+00:00"),
                ("2027-11-01T01:30:00+00:00", None),
            ],
            id="fall-back",
        ),
    ],
)
def test_a_nightly_task_runs_once_per_local_day_across_dst(
    clock: FakeClock,
    tmp_path: Path,
    first_slot: str,
    nights: list[tuple[str, str | None]],
) -> None:
    """'30 2 * * *' in Europe/Berlin, two instances: the next slot is planned from the
    database clock as the DST rule says, the task runs once at it (on one instance), and
    once per local day, never at the repeated hour's second 02:30."""
    clock.set(at(first_slot) - timedelta(hours=12))
    with throwaway_postgres(clock.env) as postgres:
        url = postgres.url
        upgrade_to_head(url)
        query(url, PROBE_TABLE)
        servers = start_cluster(url, tmp_path, "nightly", 2)
        try:
            wait_for(lambda: query(url, "SELECT 1 FROM tasks WHERE name = 'Nightly'"), 20)
            assert _next_run(url) == at(first_slot)
            for number, (slot, repeated) in enumerate(nights, start=1):
                clock.set(at(slot) - LEAD)
                # Finished before the clock moves on: a step of the database clock past a
                # lease expires it (the run would be recorded lost and retried).
                wait_for(lambda n=number: len(_finished(url)) >= n, 15)  # type: ignore[misc]
                wait_for(lambda s=slot: _next_run(url) > at(s), 5)  # type: ignore[misc]
                if repeated is not None:
                    clock.set(at(repeated) - LEAD)
                    time.sleep(LEAD.total_seconds() + 2)  # past the second 02:30
                    assert len(_runs(url)) == number
        finally:
            exit_codes = stop_all(servers)
        runs = _runs(url)
        assert_history_consistent(url)
    assert exit_codes == [0, 0]
    assert [(r["scheduled_for"], r["status"], r["attempt"]) for r in runs] == [
        (at(slot), "succeeded", 1) for slot, _ in nights
    ], runs
    for run in runs:
        late = run["started_at"] - run["scheduled_for"]  # type: ignore[operator]
        assert timedelta(0) <= late < timedelta(seconds=3)
    days = Counter(r["scheduled_for"].astimezone(BERLIN).date() for r in runs)  # type: ignore[attr-defined]
    assert sorted(days.values()) == [1, 1]
    assert len(days) == len(nights)
