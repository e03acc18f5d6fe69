"""``tandem keys create | list | revoke``: the API keys, on a direct connection."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tandem.cli.common import Subcommands, with_connection
from tandem.core.callers import SCOPES
from tandem.core.settings import get_settings


def register(sub: Subcommands) -> None:
    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key; its token is printed once, last")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--scope", action="append", required=True, choices=SCOPES, help="repeat for more"
    )
    create.add_argument(
        "--user",
        action="append",
        type=int,
        metavar="ID",
        help="bind the key to this user (repeat for more): it reads and moves only their money",
    )
    create.add_argument(
        "--expires-in", type=float, metavar="SECONDS", help="refuse the key after this long"
    )
    create.add_argument(
        "--debit-limit",
        action="append",
        default=[],
        metavar="AMOUNT/PERIOD",
        help="at most AMOUNT out of users per minute, hour or day (UTC windows); repeat for "
        "more periods; past it 429 debit_limit_exceeded (off unless given)",
    )
    create.add_argument(
        "--rate",
        metavar="N/PERIOD",
        help="at most N requests per s, minute or hour, in each instance; past it 429 "
        "rate_limited (off unless given)",
    )
    create.set_defaults(func=cmd_keys_create)
    keys_sub.add_parser("list", help="every key (tokens are never shown)").set_defaults(
        func=cmd_keys_list
    )
    revoke = keys_sub.add_parser("revoke", help="refuse a key from now on (it is kept)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_keys_revoke)


def cmd_keys_create(args: argparse.Namespace) -> int:
    from tandem.access import service

    async def run(conn: Any) -> int:
        try:
            token = await service.create_key(
                conn,
                args.name,
                args.scope,
                args.user,
                args.expires_in,
                args.debit_limit,
                args.rate,
            )
        except service.KeyCommandError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"created API key {args.name!r} with scopes {', '.join(sorted(set(args.scope)))}")
        if args.user:
            print(f"bound to the users {', '.join(map(str, sorted(set(args.user))))}")
        if args.expires_in is not None:
            print(f"expires in {args.expires_in:g} s")
        print("the token is shown once; send it as Authorization: Bearer <token>")
        # Alone on the last line, for scripts (`tail -n 1`); every instance accepts it at
        # once (it looks a key it does not know up by its hash).
        print(token)
        return 0

    return with_connection(run)


def cmd_keys_list(_: argparse.Namespace) -> int:
    from tandem.access import service

    def when(value: Any) -> str:
        return "-" if value is None else value.isoformat(timespec="seconds")

    async def run(conn: Any) -> int:
        rows = [("NAME", "SCOPES", "CREATED", "LAST USED", "REVOKED", "USERS", "EXPIRES", "LIMITS")]
        for key in await service.list_keys(conn):
            rows.append(
                (
                    key.name,
                    ",".join(key.scopes),
                    when(key.created_at),
                    when(key.last_used_at),
                    when(key.revoked_at),
                    "*" if key.bound_user_ids is None else ",".join(map(str, key.bound_user_ids)),
                    when(key.expires_at),
                    service.describe_limits(key.limits),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        return 0

    return with_connection(run)


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    from tandem.access import service

    async def run(conn: Any) -> int:
        try:
            await service.revoke_key(conn, args.name)
        except service.KeyCommandError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        seconds = get_settings().auth_cache_ttl
        print(f"revoked {args.name!r}; every instance refuses it within {seconds:g} s")
        return 0

    return with_connection(run)
