"""When a task is due: every fixed interval (a grid of slots) or at the times of a cron
expression in a time zone; what becomes of the slots missed while no instance could run
them; and how long a failed run waits before its retry.

Everything here is pure: the runner hands in instants read from the database clock (every
"now" below is one), so no instance's wall clock ever decides when a task runs.

Cron expressions are evaluated by cronsim (https://github.com/cuu508/cronsim, the evaluator
of healthchecks.io): no dependencies, maintained (2.8 in 2026-11), typed, and its handling of
daylight-saving changes is Debian cron's: a job whose local time falls into a spring-forward
gap runs once, when the gap ends; in a fall-back its local time occurs twice and it runs at
the first. croniter, the other candidate, had its maintenance stop and restart (its
maintainer announced its end in 2024) and schedules gap jobs differently by version.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from functools import cached_property
from itertools import pairwise
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from cronsim import CronSim, CronSimError

_TICK = timedelta(microseconds=1)
# The nominal interval of a cron schedule (what the "task not succeeding" alert and the
# status page use): the longest gap between this many slots from a fixed instant, so every
# instance computes the same number.
_NOMINAL_SLOTS = 64
_NOMINAL_DAYS = 400
_NOMINAL_FROM = datetime(2026, 1, 1, tzinfo=UTC)


class ScheduleError(ValueError):
    """A cron expression or time zone that cannot be used; the message says which and why."""


class MissedSlots(StrEnum):
    """What a claim does with the slots that passed while no instance ran the task (after
    downtime, a pause of the whole cluster, or a run that outlasted several slots)."""

    # One run for all of them, then back on schedule (the default, and what a run that
    # overran its interval always got).
    COALESCE = "coalesce"
    # Only a slot still within its grace runs (the newest, if it is); the others are skipped
    # (logged; when none runs, recorded as one 'skipped' run), and the task waits for its
    # next slot.
    SKIP = "skip"
    # Each missed slot runs, oldest first, back to back (each its own claim, so spread like
    # any run), up to a cap: the newest ``catch_up_limit`` of them.
    CATCH_UP = "catch_up"


@dataclass(frozen=True)
class Every:
    """A fixed interval: the slots are a grid through any one of them (``grid``)."""

    interval: timedelta

    def __post_init__(self) -> None:
        if self.interval <= timedelta(0):
            raise ScheduleError(f"an interval must be positive, not {self.interval}")

    @property
    def nominal_interval(self) -> timedelta:
        return self.interval

    def first_after(self, moment: datetime, grid: datetime) -> datetime:
        """The first slot strictly after ``moment``."""
        return grid + self.interval * (((moment - grid) // self.interval) + 1)

    def last_at_or_before(self, moment: datetime, grid: datetime) -> datetime:
        return grid + self.interval * ((moment - grid) // self.interval)

    def newest(self, moment: datetime, since: datetime, limit: int) -> list[datetime]:
        """Up to ``limit`` slots in [since, moment] (``since`` a slot), the newest ones,
        oldest first."""
        last = self.last_at_or_before(moment, since)
        count = min(limit, (last - since) // self.interval + 1)
        return [last - self.interval * k for k in reversed(range(count))]

    def scaled(self, factor: float) -> Every:
        return Every(self.interval * factor)

    def describe(self) -> str:
        return f"every {self.interval.total_seconds():g} s"


@dataclass(frozen=True)
class Cron:
    """A cron expression (5 fields, or 6 with seconds first) in an IANA time zone."""

    expression: str
    timezone: str = "UTC"

    def __post_init__(self) -> None:
        if not isinstance(self.expression, str) or not self.expression.strip():
            raise ScheduleError("a cron expression must be a non-empty string")
        try:
            zone = ZoneInfo(self.timezone)
        except (ZoneInfoNotFoundError, ValueError, TypeError) as error:
            raise ScheduleError(
                f"unknown time zone {self.timezone!r}: use an IANA name such as "
                f"'Europe/Berlin' or 'UTC' ({error})"
            ) from None
        try:
            first = next(CronSim(self.expression, _NOMINAL_FROM.astimezone(zone)), None)
        except CronSimError as error:
            raise ScheduleError(f"bad cron expression {self.expression!r}: {error}") from None
        if first is None:
            raise ScheduleError(f"cron expression {self.expression!r} never matches")
        fields = self.expression.split()
        fixed_time = not fields[-5].startswith("*") and not fields[-4].startswith("*")
        if len(fields) == 6 and fixed_time and _has_dst(zone):
            # cronsim applies Debian cron's DST rule to 5-field expressions only: with
            # seconds, a fixed time of day would be skipped in a spring-forward gap and run
            # twice in a fall-back hour.
            raise ScheduleError(
                f"cron expression {self.expression!r} has a seconds field and a fixed time of "
                f"day in {self.timezone}, which has daylight saving: use the 5-field form "
                "(minute first), which runs once per day across the changes"
            )

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)  # zoneinfo caches its zones

    def first_after(self, moment: datetime, grid: datetime | None = None) -> datetime:
        """The first slot strictly after ``moment`` (``grid`` is ignored: a cron schedule has
        its own)."""
        for slot in CronSim(self.expression, moment.astimezone(self.zone)):
            # In a fall-back hour cronsim counts from the local wall time, which can put a
            # fixed-time job's first occurrence before ``moment``: that one has passed.
            if slot > moment:
                return slot.astimezone(UTC)
        raise ScheduleError(f"cron expression {self.expression!r} has no slot after {moment}")

    def last_at_or_before(self, moment: datetime, grid: datetime | None = None) -> datetime:
        # cronsim counts backwards from strictly before its start: start just after. Inside a
        # fall-back hour it counts from the wall time too, and can step over the day's first
        # occurrence (earlier in real time): walk forward again to the last one passed.
        start = (moment + _TICK).astimezone(self.zone)
        slot = next(CronSim(self.expression, start, reverse=True), None)
        if slot is None:
            raise ScheduleError(f"cron expression {self.expression!r} has no slot before {moment}")
        last = slot.astimezone(UTC)
        while (following := self.first_after(last)) <= moment:
            last = following
        return last

    def newest(self, moment: datetime, since: datetime, limit: int) -> list[datetime]:
        last = self.last_at_or_before(moment)
        if last < since:
            return [since]
        found = [last]
        for slot in CronSim(self.expression, last.astimezone(self.zone), reverse=True):
            if slot < since or len(found) == limit:
                break
            found.append(slot.astimezone(UTC))
        return found[::-1]

    @cached_property  # some 1,200 evaluations: once per schedule, not per use
    def nominal_interval(self) -> timedelta:
        # The gaps between the first slots, and the gap around each day of a year (a
        # weekday or seasonal schedule's longest gap is far from its first slots).
        slots = preview(self, _NOMINAL_FROM, _NOMINAL_SLOTS)
        gaps = [b - a for a, b in pairwise(slots)]
        for day in range(0, _NOMINAL_DAYS):
            probe = _NOMINAL_FROM + timedelta(days=day, hours=12)
            gaps.append(self.first_after(probe) - self.last_at_or_before(probe))
        return max(gaps)

    def scaled(self, factor: float) -> Cron:
        # The calendar does not compress.
        return self

    def describe(self) -> str:
        return f"cron {self.expression!r} in {self.timezone}"


Schedule = Every | Cron


def _has_dst(zone: ZoneInfo) -> bool:
    """The zone's offset changes within a year (checked around 2026)."""
    offsets = {
        datetime(2026, month, 1, tzinfo=UTC).astimezone(zone).utcoffset() for month in range(1, 13)
    }
    return len(offsets) > 1


def schedule_of(interval: timedelta, expression: str | None, timezone: str | None) -> Schedule:
    """The schedule a task's row describes (its stored interval is already scaled)."""
    if expression is None:
        return Every(interval)
    return Cron(expression, timezone or "UTC")


@dataclass(frozen=True)
class Plan:
    """What a claim of the slot ``due`` does, decided at ``now``."""

    # The slot this run stands for; None: the due slots were all missed (policy skip).
    run_slot: datetime | None
    # The slot the task is due at next (may be <= now while catching up).
    next_slot: datetime
    # The slots passed over by this claim (not run), for the history, if any.
    note: str | None = None


def _passed_over(first: datetime, last: datetime, *, inclusive: bool) -> str:
    span = "to" if inclusive else "up to, not including,"
    return f"missed slots from {first.isoformat()} {span} {last.isoformat()} skipped"


def plan(
    schedule: Schedule,
    policy: MissedSlots,
    due: datetime,
    now: datetime,
    *,
    grace: timedelta,
    catch_up_limit: int,
) -> Plan:
    """The run and the next slot for a claim at ``now`` of a task due at ``due`` (<= now)."""
    after = schedule.first_after(now, due)
    if policy is MissedSlots.COALESCE:
        return Plan(due, after)
    if policy is MissedSlots.SKIP:
        latest = schedule.last_at_or_before(now, due)
        if latest < due:  # ``due`` was not a slot of this schedule (a changed schedule)
            latest = due
        if now - latest <= grace:
            note = None if latest == due else _passed_over(due, latest, inclusive=False)
            return Plan(latest, after, note)
        return Plan(None, after, _passed_over(due, latest, inclusive=True))
    first = schedule.newest(now, due, catch_up_limit)[0]
    note = None if first == due else _passed_over(due, first, inclusive=False)
    return Plan(first, schedule.first_after(first, due), note)


def default_grace(schedule: Schedule) -> timedelta:
    """How late a slot may start and still count as on time: 60 s, or the interval when that
    is shorter (a claim is normally up to a poll late: a shorter grace would skip on time
    runs of a short task)."""
    return min(timedelta(seconds=60), schedule.nominal_interval)


def retry_delay(
    attempt: int, base: timedelta, cap: timedelta, rng: random.Random | None = None
) -> timedelta:
    """The wait before the retry of failed attempt ``attempt`` (1 = the first run):
    exponential (``base`` doubled per attempt, at most ``cap``) with "equal jitter": between
    half of it and all of it, so retries stay spaced out yet tasks that failed together (the
    database was away) do not all come back in the same instant."""
    full = min(cap, base * (1 << min(attempt - 1, 30)))
    draw = rng.random() if rng is not None else random.random()
    return full / 2 + full / 2 * draw


# Why an instance gave up a run of its own accord (shutdown, its own deadline, its database
# session gone): nothing is wrong with the run, so its slot is retried at once, as the same
# slot's next attempt.
GIVEN_UP = frozenset({"drained", "self_fenced", "session_lost"})


def retry_after(
    status: str,
    stopped_because: str | None,
    attempt: int,
    *,
    max_attempts: int,
    backoff: timedelta,
    backoff_max: timedelta,
    rng: random.Random | None = None,
) -> timedelta | None:
    """How long after its end attempt ``attempt`` of a slot is retried, or None: no retry.

    ``status`` is how the attempt ended (succeeded, failed, timed_out, cancelled),
    ``stopped_because`` why its instance stopped it, if it did. A body that succeeded is never
    retried (even one that finished although it was asked to stop); a run given up by its
    instance (GIVEN_UP) is retried at once, whatever its attempt, since it did not fail; a
    failed or timed-out attempt is retried after retry_delay while attempts are left; any
    other end (cancelled because another instance took the run over) is not retried here."""
    if status == "succeeded":
        return None
    if stopped_because in GIVEN_UP:
        return timedelta(0)
    if status not in ("failed", "timed_out") or attempt >= max_attempts:
        return None
    return retry_delay(attempt, backoff, backoff_max, rng)


def preview(schedule: Schedule, start: datetime, count: int) -> list[datetime]:
    """The next ``count`` slots strictly after ``start`` (UTC)."""
    slots: list[datetime] = []
    moment = start
    for _ in range(count):
        moment = schedule.first_after(moment, start)
        slots.append(moment)
    return slots
