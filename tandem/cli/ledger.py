"""``tandem ledger verify``: the wallet journal's invariants, checked over every user and
every hold."""

from __future__ import annotations

import argparse
import sys

from tandem.cli.common import Subcommands, migration_url, resolve_database_url
from tandem.core.settings import get_settings


def register(sub: Subcommands) -> None:
    ledger = sub.add_parser("ledger", help="the wallet's journal")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = ledger_sub.add_parser(
        "verify",
        help="every balance = the sum of its entries, each entry = previous + amount, "
        "held = the user's active holds, each hold captured at most once",
    )
    verify.set_defaults(func=cmd_ledger_verify)


def cmd_ledger_verify(_: argparse.Namespace) -> int:
    """Check the ledger's invariants over every user and hold; exit 1 on any mismatch, 2 past the
    deadline. A verification already running (the cron's) is waited for, never a failure."""
    import asyncio

    import asyncpg

    from tandem.core.database import open_connection
    from tandem.wallet.repository import verify_ledger

    settings = get_settings()
    url = migration_url(settings, resolve_database_url(settings))

    def waiting() -> None:
        print(
            "a ledger verification is already running; waiting for it to end",
            file=sys.stderr,
            flush=True,
        )

    async def run() -> int:
        conn = await open_connection(
            url, settings, "tandem-ledger-verify", statement_deadline=False
        )
        try:
            found = await verify_ledger(conn, settings.ledger_verify_timeout, wait=waiting)
        except asyncpg.QueryCanceledError:
            print(
                "the verification ran past TANDEM_LEDGER_VERIFY_TIMEOUT "
                f"({settings.ledger_verify_timeout:g} s): raise it for a ledger this size",
                file=sys.stderr,
            )
            return 2
        finally:
            await conn.close()
        assert found is not None  # waited for the one running rather than skipping
        print(f"users: {found.users}")
        print(f"entries: {found.entries}")
        print(f"holds: {found.holds_checked}")
        for user_id, balance, journal, entries in found.balances:
            print(
                f"MISMATCH user {user_id}: balance {balance}, "
                f"sum of its {entries} entries {journal}"
            )
        for entry_id, user_id, amount, balance, previous in found.chain:
            print(
                f"MISMATCH entry {entry_id} of user {user_id}: balance {balance}, "
                f"previous {previous} + amount {amount} (or dated before the previous entry)"
            )
        for _, what in found.holds:
            print(f"MISMATCH {what}")
        print(f"mismatches: {found.mismatches}")
        return 1 if found.mismatches else 0

    return asyncio.run(run())
