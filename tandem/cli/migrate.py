"""``tandem migrate``: apply the database migrations once (and grant the app role its
rights)."""

from __future__ import annotations

import argparse

from tandem.cli.common import Subcommands, migration_url, resolve_database_url
from tandem.core.settings import get_settings


def register(sub: Subcommands) -> None:
    migrate = sub.add_parser("migrate", help="apply database migrations once")
    migrate.set_defaults(func=cmd_migrate)


def cmd_migrate(_: argparse.Namespace) -> int:
    from tandem.access.functions import OWNER_DEFINED
    from tandem.core.migrations import grant_app_role, head_revision, upgrade_to_head

    settings = get_settings()
    url = migration_url(settings, resolve_database_url(settings))
    upgrade_to_head(url)
    print(f"database at revision {head_revision()}")
    if settings.database_app_role:
        grant_app_role(url, settings.database_app_role, OWNER_DEFINED)
        print(f"granted the application's rights to {settings.database_app_role}")
    return 0
