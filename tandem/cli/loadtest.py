"""``tandem loadtest``: concurrent withdrawals against a running service, and the check of
their outcome."""

from __future__ import annotations

import argparse

from tandem.cli.common import Subcommands, client_key, raise_fd_limit
from tandem.core.settings import get_settings


def register(sub: Subcommands) -> None:
    load = sub.add_parser("loadtest", help="fire concurrent withdrawals and check the outcome")
    load.add_argument("--url", default="http://127.0.0.1:8000")
    load.add_argument("--requests", type=int, default=10_000)
    load.add_argument("--amount", type=int, default=2, help="units withdrawn per request")
    load.add_argument("--initial-balance", type=int, default=10_000)
    load.add_argument(
        "--concurrency", type=int, default=None, help="requests in flight (default: all)"
    )
    load.add_argument("--user", type=int, default=None, help="use this user, not a new one")
    load.add_argument("--no-progress", action="store_true")
    load.add_argument(
        "--key",
        default=None,
        help="API key (default: TANDEM_API_KEY, else the local development key)",
    )
    load.set_defaults(func=cmd_loadtest)


def cmd_loadtest(args: argparse.Namespace) -> int:
    from tandem.loadtest import LoadtestOptions, run_loadtest

    raise_fd_limit()
    settings = get_settings()
    key = client_key(args.key, settings)
    return run_loadtest(
        LoadtestOptions(
            api_key=key,
            base_url=args.url,
            requests=args.requests,
            amount=args.amount,
            initial_balance=args.initial_balance,
            concurrency=args.concurrency,
            user_id=args.user,
            progress=not args.no_progress,
        )
    )
