"""``tandem schedule``: check a cron expression before deploying it (``preview``), and manage
schedules on a running server (``list``, ``create``, ``pause``, ``resume``, ``run``,
``delete``: /schedules, with ``--url`` and the key of ``--key``, TANDEM_API_KEY or the local
development key).

The calls use the standard library's HTTP client: the container image has no other."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tandem.cli.common import Subcommands, client_key
from tandem.core.settings import get_settings


def register(sub: Subcommands) -> None:
    schedule = sub.add_parser(
        "schedule", help="schedules: check a cron expression; list, create, pause, run them"
    )
    schedule_sub = schedule.add_subparsers(dest="schedule_command", required=True)
    _register_api_commands(schedule_sub)
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


# --- schedules on a running server ---------------------------------------------------------


class ApiError(Exception):
    """A refusal of the server (its envelope's code and message), or no answer."""


def _register_api_commands(schedule_sub: Any) -> None:
    def command(name: str, help_text: str, func: Any, *, named: bool = True) -> Any:
        parser = schedule_sub.add_parser(name, help=help_text)
        if named:
            parser.add_argument("name", help="the schedule's name")
        parser.add_argument("--url", default="http://127.0.0.1:8000", help="a Tandem instance")
        parser.add_argument(
            "--key", default=None, help="API key (default: TANDEM_API_KEY, else the dev key)"
        )
        parser.set_defaults(func=func)
        return parser

    listing = command(
        "list", "every schedule: name, task, source, version, state", cmd_list, named=False
    )
    listing.add_argument("--task", default=None)
    listing.add_argument("--source", choices=("code", "api"), default=None)
    create = command("create", "create a schedule of a task", cmd_create)
    create.add_argument("--task", required=True, help="a task of the server's code")
    when = create.add_mutually_exclusive_group(required=True)
    when.add_argument("--every", type=float, help="seconds between runs (at least 1)")
    when.add_argument("--cron", help="a cron expression, e.g. '30 2 * * *'")
    create.add_argument("--tz", default=None, help="the cron expression's IANA zone")
    create.add_argument("--params", default=None, help="the task's params, a JSON object")
    create.add_argument("--overlap", choices=("skip", "buffer_one", "cancel_other"))
    create.add_argument("--note", default=None)
    pause = command("pause", "no new runs until resumed (a run going finishes)", cmd_pause)
    pause.add_argument("--note", default=None, help="why (the history keeps it)")
    command("resume", "run again from the next slot", cmd_resume)
    run = command("run", "run now (the overlap policy says what happens if one is going)", cmd_run)
    run.add_argument("--params", default=None, help="this run's params, a JSON object")
    command("delete", "delete an API schedule (its history stays)", cmd_delete)


def _call(args: argparse.Namespace, method: str, path: str, body: Any = None) -> Any:
    import json
    import urllib.error
    import urllib.request

    key = client_key(args.key, get_settings())
    headers = {"Accept": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = None
    if body is not None:
        data = json.dumps(body).encode()
        headers["Content-Type"] = "application/json"
    if not args.url.startswith(("http://", "https://")):
        raise ApiError(f"--url {args.url!r} is not an http(s) URL")
    request = urllib.request.Request(  # noqa: S310 (http(s) only, checked above)
        args.url.rstrip("/") + path, data=data, headers=headers, method=method
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310 (the operator's URL)
            raw = answer.read()
    except urllib.error.HTTPError as refused:
        try:
            error = json.loads(refused.read())["error"]
            raise ApiError(f"{refused.code} {error['code']}: {error['message']}") from None
        except (ValueError, KeyError, TypeError):
            raise ApiError(f"{refused.code} {refused.reason}") from None
    except (urllib.error.URLError, OSError) as failed:
        raise ApiError(f"no answer from {args.url}: {failed}") from None
    return json.loads(raw) if raw else None


def _params(raw: str | None) -> Any:
    import json

    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError as error:
        raise ApiError(f"--params is not JSON: {error}") from None


def _run_api(func: Any) -> Any:
    def wrapped(args: argparse.Namespace) -> int:
        try:
            func(args)
        except ApiError as error:
            print(f"tandem schedule {args.schedule_command}: {error}", file=sys.stderr)
            return 1
        return 0

    wrapped.__doc__ = func.__doc__
    return wrapped


def _line(found: dict[str, Any]) -> str:
    when = (
        f"every {found['every']:g} s"
        if found["every"] is not None
        else (f"cron '{found['cron']}' {found['tz']}")
    )
    return (
        f"{found['name']}  task={found['task']}  {when}  source={found['source']}  "
        f"version={found['version']}  state={found['state']}"
    )


@_run_api
def cmd_list(args: argparse.Namespace) -> None:
    """Every schedule, page after page: name, task, spec, source, version, state, note."""
    from urllib.parse import urlencode

    after = None
    rows = [("NAME", "TASK", "WHEN", "SOURCE", "VERSION", "STATE", "NEXT RUN", "NOTE")]
    while True:
        query = {"limit": 200, "task": args.task, "source": args.source, "after": after}
        page = _call(args, "GET", "/schedules?" + urlencode({k: v for k, v in query.items() if v}))
        for found in page["schedules"]:
            when = (
                f"every {found['every']:g} s"
                if found["every"] is not None
                else f"{found['cron']} ({found['tz']})"
            )
            rows.append(
                (
                    found["name"],
                    found["task"],
                    when,
                    found["source"],
                    str(found["version"]),
                    found["state"],
                    found["next_run_at"] or "-",
                    found["pause_note"] if found["state"] == "paused" else found["note"] or "",
                )
            )
        after = page["next"]
        if after is None:
            break
    widths = [max(len(row[i] or "") for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print(
            "  ".join(
                (cell or "").ljust(width) for cell, width in zip(row, widths, strict=True)
            ).rstrip()
        )


@_run_api
def cmd_create(args: argparse.Namespace) -> None:
    """Create a schedule; prints it."""
    body: dict[str, Any] = {"name": args.name, "task": args.task}
    for field in ("every", "cron", "tz", "overlap", "note"):
        if getattr(args, field) is not None:
            body[field] = getattr(args, field)
    params = _params(args.params)
    if params is not None:
        body["params"] = params
    print(_line(_call(args, "POST", "/schedules", body)))


@_run_api
def cmd_pause(args: argparse.Namespace) -> None:
    body = {} if args.note is None else {"note": args.note}
    print(_line(_call(args, "POST", f"/schedules/{_quoted(args.name)}/pause", body)))


@_run_api
def cmd_resume(args: argparse.Namespace) -> None:
    print(_line(_call(args, "POST", f"/schedules/{_quoted(args.name)}/resume", {})))


@_run_api
def cmd_run(args: argparse.Namespace) -> None:
    params = _params(args.params)
    body = {} if params is None else {"params": params}
    found = _call(args, "POST", f"/schedules/{_quoted(args.name)}/run", body)
    print(f"{_line(found)}  asked for at {found['manual_at']}")


@_run_api
def cmd_delete(args: argparse.Namespace) -> None:
    _call(args, "DELETE", f"/schedules/{_quoted(args.name)}")
    print(f"{args.name}: deleted (its history stays: GET /schedules/{args.name}/history)")


def _quoted(name: str) -> str:
    from urllib.parse import quote

    return quote(name, safe="")
