"""``tandem migrate``: apply the database migrations once (and grant the app role its
rights)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tandem.cli.common import Subcommands, migration_url, resolve_database_url, with_connection
from tandem.core.settings import get_settings


def register(sub: Subcommands) -> None:
    migrate = sub.add_parser("migrate", help="apply database migrations once")
    migrate.set_defaults(func=cmd_migrate)


def cmd_migrate(_: argparse.Namespace) -> int:
    from tandem.core.migrations import grant_app_role, head_revision, upgrade_to_head
    from tandem.functions import DECLARED

    settings = get_settings()
    url = migration_url(settings, resolve_database_url(settings))
    waits = upgrade_to_head(url)
    if waits is None:
        print(f"database at revision {head_revision()}")
    else:
        # Not a failure: this release runs on the revision before the contract.
        print(f"database at revision {waits.before}")
        print(f"note: {waits}")
    if settings.database_app_role:
        grant_app_role(url, settings.database_app_role, DECLARED)
        print(f"granted the application's rights to {settings.database_app_role}")
    if settings.configured_api_key() is not None:
        return _register_configured_key()
    return 0


def _register_configured_key() -> int:
    """The configured key (TANDEM_API_KEY[_FILE]), registered by the owner: after migration
    0015 the application's role may not insert keys."""
    from tandem.access import service

    settings = get_settings()
    token = settings.configured_api_key()
    assert token is not None

    async def run(conn: Any) -> int:
        try:
            there = await service.ensure_configured_key(conn, token, settings.api_key_name)
        except service.KeyCommandError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        if not there:
            print(
                f"error: the name {settings.api_key_name!r} belongs to another key (set "
                "TANDEM_API_KEY_NAME, or revoke the other)",
                file=sys.stderr,
            )
            return 2
        print(f"the configured API key {settings.api_key_name!r} is registered")
        return 0

    return with_connection(run)
