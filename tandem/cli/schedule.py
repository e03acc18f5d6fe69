"""``tandem schedule preview``: check a cron expression before deploying it."""

from __future__ import annotations

import argparse
import sys

from tandem.cli.common import Subcommands


def register(sub: Subcommands) -> None:
    schedule = sub.add_parser("schedule", help="cron schedules: check one before deploying it")
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True)
    show = schedule_sub.add_parser(
        "preview", help="the next starts of a cron expression: UTC instant, then local time"
    )
    show.add_argument("expression", help="5 fields (or 6, seconds first), e.g. '30 2 * * *'")
    show.add_argument("--tz", default="UTC", help="IANA time zone, e.g. Europe/Berlin")
    show.add_argument(
        "--from",
        dest="start",
        default=None,
        help="ISO 8601 instant to count from (default: now); without an offset, local in --tz",
    )
    show.add_argument("--count", type=_count, default=10, help="how many starts (1-1000)")
    show.set_defaults(func=cmd_schedule_preview)


def cmd_schedule_preview(args: argparse.Namespace) -> int:
    """The next starts of a cron expression in a zone: UTC instant first, then local time."""
    from datetime import UTC, datetime

    from tandem.scheduler.schedules import Cron, ScheduleError, preview

    try:
        schedule = Cron(args.expression, args.tz)
    except ScheduleError as error:
        print(f"tandem schedule preview: {error}", file=sys.stderr)
        return 2
    if args.start is None:
        start = datetime.now(UTC)  # a preview only: the scheduler itself reads the database's
    else:
        try:
            start = datetime.fromisoformat(args.start)
        except ValueError:
            print(
                f"tandem schedule preview: --from {args.start!r} is not an ISO 8601 instant "
                "(e.g. 2026-03-28T00:00:00Z; without an offset it is local time in --tz)",
                file=sys.stderr,
            )
            return 2
        if start.tzinfo is None:
            start = start.replace(tzinfo=schedule.zone)
    for slot in preview(schedule, start.astimezone(UTC), args.count):
        local = slot.astimezone(schedule.zone)
        print(
            f"{slot.strftime('%Y-%m-%dT%H:%M:%SZ')}  "
            f"{local.strftime('%Y-%m-%d %H:%M:%S')} {local.tzname()} ({local.strftime('%z')})"
        )
    return 0


def _count(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 1000:
        raise argparse.ArgumentTypeError("must be between 1 and 1000")
    return value
