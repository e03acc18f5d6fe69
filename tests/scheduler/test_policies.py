"""Missed-slot policies, timeouts and retries on real server processes (intervals of a second,
backoffs of a fraction of one), and what GET /tasks says of each task's schedule."""

from __future__ import annotations

import itertools
from collections import Counter
from datetime import datetime, timedelta
from pathlib import Path

from tandem.scheduler.schedules import Cron
from tests.scheduler.cluster import (
    as_if_down_for,
    assert_history_consistent,
    database_now,
    instances_of,
    probe_overlaps,
    start_cluster,
    stop_all,
)
from tests.scheduler.registries import RETRY_BACKOFF, TIMEOUT
from tests.support import LEASE, http_get, query, wait_for


def _history(url: str, task: str) -> list[dict[str, object]]:
    rows = query(
        url,
        "SELECT h.scheduled_for, h.attempt, h.status, h.error, h.instance_id, h.fence, "
        "h.started_at, h.finished_at FROM task_history h JOIN tasks t ON t.id = h.task_id "
        "WHERE t.name = $1 ORDER BY h.fence",
        task,
    )
    return [dict(r) for r in rows]


def test_each_missed_slot_policy_after_downtime(cron_db: str, tmp_path: Path) -> None:
    """Everything stopped for an hour of three 1 s tasks: on restart `coalesce` runs once for
    the missed hour, `skip` records the missed slots as one skipped claim and runs none of
    them, `catch_up` runs the newest 5 missed slots one after another; then each is back on
    its grid. GET /tasks shows each policy, and the cron task's expression, zone and next
    slot (its first slot after now, by the database clock)."""
    (server,) = start_cluster(cron_db, tmp_path, "missed", 1)
    try:
        wait_for(lambda: len(_history(cron_db, "CatchUp")) >= 2, 15)
        tasks = {t["name"]: t for t in http_get(f"{server.url}/tasks").json()["tasks"]}
    finally:
        server.stop()
    nightly = tasks["Nightly"]
    assert (nightly["schedule"], nightly["timezone"]) == ("30 2 * * *", "Europe/Berlin")
    assert nightly["interval_seconds"] == 25 * 3600  # its longest gap: a fall-back night
    expected_next = Cron("30 2 * * *", "Europe/Berlin").first_after(database_now(cron_db))
    assert nightly["next_run_at"].replace("Z", "+00:00") == expected_next.isoformat()
    assert {name: t["missed_slots"] for name, t in tasks.items()} == {
        "Coalesce": "coalesce",
        "Skip": "skip",
        "CatchUp": "catch_up",
        "Nightly": "coalesce",
    }
    assert tasks["Coalesce"]["schedule"] is None
    assert tasks["Coalesce"]["timezone"] is None
    as_if_down_for(cron_db, "1 hour")
    restarted_at = database_now(cron_db)

    def after_restart(task: str, until: datetime | None = None) -> list[dict[str, object]]:
        """The runs of missed and regular slots since the restart that ended by ``until``
        (a run drained at shutdown is retried first, as attempt 2 of its slot: not a missed
        slot's run)."""
        return [
            r
            for r in _history(cron_db, task)
            if r["started_at"] > restarted_at
            and r["attempt"] == 1
            and r["finished_at"] is not None
            and (until is None or r["finished_at"] <= until)
        ]

    (server,) = start_cluster(cron_db, tmp_path, "missed", 1)
    try:
        wait_for(
            lambda: (
                len(after_restart("CatchUp")) >= 7
                and len(after_restart("Coalesce")) >= 3
                and len(after_restart("Skip")) >= 3
            ),
            30,
        )
        # Only runs that ended before the stop began count: one still going then (or
        # claimed as it began) is the stop's, recorded cancelled, not a policy's.
        stopping_at = database_now(cron_db)
    finally:
        server.stop()
    # About one run a second after the first claims, each task.
    most = (stopping_at - restarted_at).total_seconds() + 2

    coalesce = after_restart("Coalesce", stopping_at)
    missed = [r for r in coalesce if r["scheduled_for"] < restarted_at]
    assert [r["status"] for r in missed] == ["succeeded"]
    assert 3 <= len(coalesce) <= most

    # skip: no slot of the missed hour runs: a slot runs only within its grace (0.5 s) of its
    # time; the first claim either records the hour as one skipped run, or (landing within
    # the grace of the newest slot) runs that one alone.
    skip = after_restart("Skip", stopping_at)
    skipped = [r for r in skip if r["status"] == "skipped"]
    assert len(skipped) <= 1
    assert all("missed slots from" in str(r["error"]) for r in skipped)
    ran = [r for r in skip if r["status"] == "succeeded"]
    assert len(ran) + len(skipped) == len(skip)
    for run in ran:
        assert run["started_at"] - run["scheduled_for"] <= timedelta(seconds=0.5)  # type: ignore[operator]
    assert all(r["scheduled_for"] > restarted_at - timedelta(seconds=1) for r in ran)  # type: ignore[operator]
    assert 3 <= len(skip) <= most

    # catch_up, capped at 5: the first claim after the restart runs the oldest of the newest
    # five slots due at that moment, the next claims the four after it, one after another;
    # each once, then back on the grid.
    catch_up = after_restart("CatchUp", stopping_at)
    first, caught = catch_up[0], catch_up[:5]
    slots = [r["scheduled_for"] for r in caught]
    assert [b - a for a, b in itertools.pairwise(slots)] == [timedelta(seconds=1)] * 4
    assert slots[4] <= first["started_at"] < slots[4] + timedelta(seconds=1)  # type: ignore[operator]
    assert [r["status"] for r in caught] == ["succeeded"] * 5
    assert len({r["scheduled_for"] for r in catch_up}) == len(catch_up)
    assert len(catch_up) >= 7  # then back on the grid
    assert probe_overlaps(cron_db) == 0
    assert_history_consistent(cron_db)


def test_timeouts_and_retries_keep_every_guarantee(cron_db: str, tmp_path: Path) -> None:
    """Three instances, three tasks whose every run outlasts its 0.5 s timeout and one that
    fails twice: each attempt is cancelled at its timeout (timed_out) or fails, is retried
    after its backoff (between half and all of 0.4 s, then 0.8 s, by the database clock) as
    its own history row for the same slot with the next attempt number, never overlaps the
    previous attempt, carries a new fence, and stops after 3 attempts; the attempts are
    spread over the instances; Flaky succeeds at its third."""
    # The tasks come due once all three instances are live (a definition's upsert keeps the
    # next slot of an existing row), so the first attempts are spread too: an instance that
    # started alone would claim all four, and the late ones would join level with it.
    query(
        cron_db,
        'INSERT INTO tasks (name, "interval", function_name, next_run_at) '
        "SELECT name, interval '1 hour', 'tbd', clock_timestamp() + interval '1 hour' "
        "FROM unnest($1::text[]) AS name",
        ["Stuck1", "Stuck2", "Stuck3", "Flaky"],
    )
    servers = start_cluster(cron_db, tmp_path, "retrying", 3)
    exit_codes: list[int] = []
    try:
        instances_of(cron_db, servers, LEASE)
        query(cron_db, "UPDATE tasks SET next_run_at = clock_timestamp()")

        def settled() -> bool:
            """Twelve attempts ended, none running and no retry pending: with the next slots
            an hour away nothing more can start, so the stop below has nothing to drain."""
            rows = query(
                cron_db,
                "SELECT (SELECT count(*) FROM task_history WHERE status <> 'running') AS ended, "
                "(SELECT count(*) FROM tasks WHERE is_running OR retry_at IS NOT NULL) AS busy",
            )
            return rows[0]["ended"] >= 12 and rows[0]["busy"] == 0

        wait_for(settled, 30)
    finally:
        exit_codes = stop_all(servers)
    assert exit_codes == [0, 0, 0]
    instances: list[object] = []
    for task in ("Stuck1", "Stuck2", "Stuck3", "Flaky"):
        rows = _history(cron_db, task)
        assert [r["attempt"] for r in rows] == [1, 2, 3], (task, rows)
        assert len({r["scheduled_for"] for r in rows}) == 1
        if task == "Flaky":
            assert [r["status"] for r in rows] == ["failed", "failed", "succeeded"]
            assert "RuntimeError: attempt 1 fails" in str(rows[0]["error"])
        else:
            assert [r["status"] for r in rows] == ["timed_out"] * 3
            assert rows[0]["error"] == f"timed out after {TIMEOUT.total_seconds():g} s"
            for row in rows:
                ran = row["finished_at"] - row["started_at"]  # type: ignore[operator]
                assert TIMEOUT * 0.9 <= ran < TIMEOUT + timedelta(seconds=1.5)
        for attempt, (earlier, later) in enumerate(itertools.pairwise(rows), start=1):
            backoff = RETRY_BACKOFF * 2 ** (attempt - 1)
            waited = later["started_at"] - earlier["finished_at"]  # type: ignore[operator]
            # At least half the backoff; at most all of it plus a claim's delays (a poll, and
            # the steal delay when fair share holds the claim back).
            assert backoff / 2 <= waited < backoff + timedelta(seconds=2.5), (task, attempt)
            assert later["fence"] > earlier["fence"]  # type: ignore[operator]
        instances += [r["instance_id"] for r in rows]
    # Twelve claims over three instances, fair share within its slack.
    per_instance = Counter(instances)
    assert len(per_instance) == 3
    assert max(per_instance.values()) - min(per_instance.values()) <= 2, per_instance
    assert probe_overlaps(cron_db) == 0
    assert_history_consistent(cron_db)
    pending = query(cron_db, "SELECT count(*) AS n FROM tasks WHERE retry_at IS NOT NULL")
    assert pending[0]["n"] == 0
