"""Schedules, missed-slot policies and backoff: pure functions of database instants."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from collections import Counter
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from pydantic import BaseModel

from tandem.cli import main
from tandem.scheduler.claims import plan_claim
from tandem.scheduler.registry import Registry, TaskDefinition
from tandem.scheduler.repository import ClaimedRun
from tandem.scheduler.schedules import (
    Cron,
    Every,
    MissedSlots,
    default_grace,
    plan,
    preview,
    retry_after,
    retry_delay,
)
from tests.support import free_port

BERLIN = ZoneInfo("Europe/Berlin")
NIGHTLY = Cron("30 2 * * *", "Europe/Berlin")
S = timedelta(seconds=1)


class Required(BaseModel):
    """Params with a field that has no default: a code schedule could not run them."""

    customer: int


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def local_days(slots: list[datetime]) -> Counter[str]:
    return Counter(slot.astimezone(BERLIN).date().isoformat() for slot in slots)


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        # Spring forward (02:00 CET -> 03:00 CEST at 01:00Z): 02:30 does not exist that
        # night; the job runs once, when the gap ends.
        (
            "2027-03-26T12:00:00Z",
            ["2027-03-27T01:30:00Z", "2027-03-28T01:00:00Z", "2027-03-29T00:30:00Z"],
        ),
        # Fall back (03:00 CEST -> 02:00 CET at 01:00Z): 02:30 happens twice; the job runs
        # at the first only.
        (
            "2027-10-29T12:00:00Z",
            ["2027-10-30T00:30:00Z", "2027-10-31T00:30:00Z", "2027-11-01T01:30:00Z"],
        ),
    ],
)
def test_a_nightly_job_runs_once_per_local_day_across_dst(start: str, expected: list[str]) -> None:
    slots = preview(NIGHTLY, at(start), 3)
    assert slots == [at(e) for e in expected]
    assert set(local_days(slots).values()) == {1}
    # A whole year: one run per local day, every day.
    year = preview(NIGHTLY, at("2027-01-01T00:00:00Z"), 365)
    assert set(local_days(year).values()) == {1}
    assert len(local_days(year)) == 365


def test_the_next_slot_is_always_later_also_inside_a_fall_back_hour() -> None:
    """From any instant of the repeated hour, the next slot is after it (cronsim counts from
    the local wall time, which puts the day's first 02:30 before an instant in the second
    02:xx), and the last slot at or before it is the first 02:30."""
    moment = at("2027-10-31T00:30:00Z")
    while moment < at("2027-10-31T02:00:00Z"):
        following = NIGHTLY.first_after(moment)
        assert following > moment
        assert following in (at("2027-10-31T00:30:00Z"), at("2027-11-01T01:30:00Z"))
        assert NIGHTLY.last_at_or_before(moment) == at("2027-10-31T00:30:00Z")
        moment += timedelta(minutes=7)


def test_a_frequent_cron_job_keeps_real_time_across_dst() -> None:
    """Every 30 minutes stays every 30 minutes of real time through both transitions."""
    every_half_hour = Cron("*/30 * * * *", "Europe/Berlin")
    for start in ("2027-03-27T23:00:00Z", "2027-10-30T23:00:00Z"):
        slots = preview(every_half_hour, at(start), 10)
        assert {b - a for a, b in pairwise(slots)} == {timedelta(minutes=30)}


def test_new_york_and_a_range_of_hours_across_dst() -> None:
    """Negative offsets, and a range in the hour field: once per listed hour per local day."""
    new_york = ZoneInfo("America/New_York")
    every_hour = Cron("0 1-3 * * *", "America/New_York")
    # 2027-03-14 02:00 EST -> 03:00 EDT; 2027-11-07 02:00 EDT -> 01:00 EST.
    for start in ("2027-03-13T12:00:00Z", "2027-11-06T12:00:00Z"):
        slots = preview(every_hour, at(start), 9)
        days = Counter(s.astimezone(new_york).date() for s in slots)
        assert len(slots) == len(set(slots))
        assert max(days.values()) <= 3
    nightly = Cron("30 2 * * *", "America/New_York")
    year = preview(nightly, at("2027-01-01T00:00:00Z"), 365)
    assert set(Counter(s.astimezone(new_york).date() for s in year).values()) == {1}


def test_nominal_interval_is_the_longest_gap() -> None:
    """What the "not succeeding" alert allows: a weekday schedule's weekend, a seasonal one's
    months off."""
    assert Cron("*/5 9-17 * * 1-5").nominal_interval == timedelta(
        days=2, hours=15, minutes=5
    )  # Fri 17:55 to Mon 09:00
    assert Cron("*/10 * * 6 *").nominal_interval > timedelta(days=330)
    assert NIGHTLY.nominal_interval == timedelta(hours=25)  # the fall-back night
    assert Every(10 * S).nominal_interval == 10 * S


def test_interval_grid() -> None:
    grid = at("2027-01-01T00:00:00Z")
    every = Every(10 * S)
    assert every.first_after(grid, grid) == grid + 10 * S
    assert every.first_after(grid + 25 * S, grid) == grid + 30 * S
    assert every.last_at_or_before(grid + 25 * S, grid) == grid + 20 * S
    assert every.newest(grid + 25 * S, grid, 2) == [grid + 10 * S, grid + 20 * S]
    assert every.newest(grid + 25 * S, grid, 10) == [grid, grid + 10 * S, grid + 20 * S]


def test_missed_slot_policies() -> None:
    """A 10 s task due at `due`, claimed 35 s later (slots due+0..due+30 passed)."""
    due = at("2027-01-01T00:00:00Z")
    now, every, grace = due + 35 * S, Every(10 * S), 3 * S

    def decide(policy: str, moment: datetime = now) -> tuple[object, object]:
        decided = plan(every, MissedSlots(policy), due, moment, grace=grace, catch_up_limit=2)
        return decided.run_slot, decided.next_slot

    # coalesce: one run (for the oldest slot), then the first slot after now
    assert decide("coalesce") == (due, due + 40 * S)
    # skip: the newest slot is 5 s late, past its grace: nothing runs
    assert decide("skip") == (None, due + 40 * S)
    # skip, 2 s after a slot: that slot still runs, the older ones are skipped
    assert decide("skip", due + 32 * S) == (due + 30 * S, due + 40 * S)
    # catch_up, capped at 2: the newest two missed slots, oldest first, back to back
    assert decide("catch_up") == (due + 20 * S, due + 30 * S)
    assert plan(
        every, MissedSlots.CATCH_UP, due + 30 * S, now, grace=grace, catch_up_limit=2
    ) == plan(every, MissedSlots.COALESCE, due + 30 * S, now, grace=grace, catch_up_limit=2)
    # on time, every policy runs the slot
    for policy in MissedSlots:
        assert plan(every, policy, due, due + S, grace=grace, catch_up_limit=2).run_slot == due


def test_missed_slot_policies_of_a_cron_task() -> None:
    """A nightly job after three nights down."""
    due = at("2027-03-27T01:30:00Z")
    now = at("2027-03-30T12:00:00Z")

    def decide(policy: MissedSlots, limit: int = 10) -> tuple[object, object]:
        decided = plan(
            NIGHTLY, policy, due, now, grace=default_grace(NIGHTLY), catch_up_limit=limit
        )
        return decided.run_slot, decided.next_slot

    tonight = at("2027-03-31T00:30:00Z")
    assert decide(MissedSlots.COALESCE) == (due, tonight)
    assert decide(MissedSlots.SKIP) == (None, tonight)
    assert decide(MissedSlots.CATCH_UP) == (due, at("2027-03-28T01:00:00Z"))
    assert decide(MissedSlots.CATCH_UP, 2) == (
        at("2027-03-29T00:30:00Z"),
        at("2027-03-30T00:30:00Z"),
    )
    assert default_grace(NIGHTLY) == timedelta(seconds=60)
    assert default_grace(Every(10 * S)) == 10 * S


def test_a_retry_that_plans_the_next_slot_keeps_the_catch_up() -> None:
    """A claimer died before planning (its run lost, its slot retried): the retry's claimer
    plans the next slot, and with catch_up that is the slot right after the retried one."""
    due = at("2027-01-01T00:00:00Z")
    for limit, expected in ((1, due + 30 * S), (10, due + 10 * S)):
        definition = registry_definition(limit)
        retry = ClaimedRun(1, "CatchUp", "f", 2, due, due + 35 * S, True, 2, True)
        planned = plan_claim(retry, definition)
        assert planned is not None
        assert (planned.run_slot, planned.next_slot) == (due, expected)


def registry_definition(limit: int) -> TaskDefinition:
    registry = Registry()
    registry.task("CatchUp", 10 * S, missed="catch_up", catch_up_limit=limit)(_noop)
    found = registry.get("CatchUp")
    assert found is not None
    return found


async def _noop(ctx: object) -> None:
    pass


def test_retry_backoff_doubles_with_equal_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    base, cap = timedelta(seconds=10), timedelta(seconds=60)
    for attempt, full in ((1, 10), (2, 20), (3, 40), (4, 60), (40, 60)):
        delays = [retry_delay(attempt, base, cap, rng).total_seconds() for _ in range(200)]
        assert full / 2 <= min(delays) < max(delays) <= full
        assert max(delays) - min(delays) > full / 4  # jittered, not constant


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"cron": "61 * * * *"}, "bad cron expression '61 * * * *': Bad minute"),
        ({"cron": "* * *"}, "Wrong number of fields"),
        ({"cron": "0 0 30 2 *"}, "Bad day-of-month"),
        ({"cron": "0 3 * * *", "tz": "Europe/Berln"}, "unknown time zone 'Europe/Berln'"),
        ({"cron": "0 3 * * *", "tz": "../../etc/passwd"}, "unknown time zone"),
        ({"every": S, "cron": "* * * * *"}, "takes one of every= and cron=, not both"),
        ({"every": S, "params": dict}, "params must be a pydantic model class"),
        ({"every": S, "overlap": "queue"}, "overlap='queue' is not one of skip"),
        ({"every": S, "params": Required}, "a code schedule runs with its params model's"),
        ({"every": -S}, "an interval must be positive"),
        ({"every": S, "missed": "later"}, "missed='later' is not one of coalesce, skip"),
        ({"every": S, "max_attempts": 0}, "max_attempts must be at least 1"),
        ({"every": S, "timeout": timedelta(0)}, "timeout must be positive"),
        ({"every": S, "catch_up_limit": 0}, "catch_up_limit must be at least 1"),
        # With seconds, cronsim has no DST rule: a fixed time would be skipped or doubled.
        ({"cron": "0 30 2 * * *", "tz": "Europe/Berlin"}, "use the 5-field form"),
    ],
)
def test_a_bad_definition_fails_at_registration(options: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match="task 'Bad'") as raised:
        Registry().task("Bad", **options)  # type: ignore[arg-type]
    assert message in str(raised.value)


def test_schedule_preview_prints_utc_then_local(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["schedule", "preview", "30 2 * * *", "--tz", "Europe/Berlin"]
    assert main([*argv, "--from", "2027-03-27T12:00:00Z", "--count", "3"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2027-03-28T01:00:00Z  2027-03-28 03:00:00 CEST (+0200)",
        "2027-03-29T00:30:00Z  2027-03-29 02:30:00 CEST (+0200)",
        "2027-03-30T00:30:00Z  2027-03-30 02:30:00 CEST (+0200)",
    ]
    # Without an offset, --from is local time in the zone.
    assert main([*argv, "--from", "2027-10-31T02:45:00", "--count", "1"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "2027-11-01T01:30:00Z  2027-11-01 02:30:00 CET (+0100)"
    ]
    assert main([*argv[:2], "61 * * * *"]) == 2
    assert "bad cron expression" in capsys.readouterr().err
    assert main([*argv, "--from", "yesterday"]) == 2
    assert "not an ISO 8601 instant" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*argv, "--count", "0"])


def test_a_server_with_a_bad_schedule_does_not_start(postgres_url: str, tmp_path: Path) -> None:
    """A registry with an unknown zone: `tandem serve` exits non-zero, and says which task
    and what is wrong."""
    (tmp_path / "badtasks.py").write_text(
        "from tandem.scheduler.registry import Registry\n"
        "registry = Registry()\n"
        "@registry.task('nightly', cron='30 2 * * *', tz='Europe/Berln')\n"
        "async def nightly(ctx): ...\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(tmp_path),
        "TANDEM_DATABASE_URL": postgres_url,
        "TANDEM_SCHEDULER_TASKS": "badtasks:registry",
    }
    serve = [sys.executable, "-m", "tandem", "serve", "--port", str(free_port()), "--no-migrate"]
    done = subprocess.run(serve, env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert "task 'nightly': unknown time zone 'Europe/Berln'" in done.stderr


POLICY = {"max_attempts": 3, "backoff": 10 * S, "backoff_max": 60 * S}


def test_a_failed_or_timed_out_attempt_is_retried_after_its_backoff_while_attempts_last() -> None:
    """Attempts 1 and 2 of 3 that failed or timed out are retried after retry_delay's backoff
    (between half and all of 10 s, then of 20 s); the third is not retried."""
    for status in ("failed", "timed_out"):
        for attempt, full in ((1, 10), (2, 20)):
            delay = retry_after(status, None, attempt, **POLICY, rng=random.Random(attempt))
            assert delay is not None
            assert full / 2 <= delay.total_seconds() <= full
        assert retry_after(status, None, 3, **POLICY) is None
        # A task's own timeout stops its run too: a timed-out run is still a failure.
        assert retry_after(status, "timed_out", 1, **POLICY) is not None


def test_a_run_its_instance_gave_up_is_retried_at_once_whatever_its_attempt() -> None:
    """Drained at shutdown, self-fenced, or stopped with its lost session: the run did not
    fail, so its slot is retried at once, even past max_attempts (and with none left: a task
    of one attempt)."""
    for reason in ("drained", "self_fenced", "session_lost"):
        for attempt in (1, 3, 7):
            assert retry_after("cancelled", reason, attempt, **POLICY) == timedelta(0)
        single = {**POLICY, "max_attempts": 1}
        assert retry_after("cancelled", reason, 1, **single) == timedelta(0)
        # A body that failed on its way out was still given up: at once, not after a backoff.
        assert retry_after("failed", reason, 1, **POLICY) == timedelta(0)


def test_no_retry_after_a_success_or_a_takeover() -> None:
    """A body that succeeded is done, even one that finished while it was being stopped; a
    run taken over by another instance (fenced) is that instance's to finish."""
    for reason in (None, "drained", "self_fenced", "session_lost", "timed_out", "fenced"):
        assert retry_after("succeeded", reason, 1, **POLICY) is None
    assert retry_after("cancelled", "fenced", 1, **POLICY) is None
    assert retry_after("cancelled", None, 1, **POLICY) is None
