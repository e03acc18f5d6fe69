"""What several commands share: the database URL (an embedded server's when none is
configured), the local development key, the open-files limit and a direct connection."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import shlex
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, NamedTuple, TypeAlias

from tandem.core.settings import Settings, get_settings

log = logging.getLogger("tandem")

# What each command's ``register`` adds its subcommand to (argparse names no public type,
# and its private one is not subscriptable at run time: hence the string).
Subcommands: TypeAlias = "argparse._SubParsersAction[argparse.ArgumentParser]"


def raise_fd_limit() -> int:
    """Raise the soft open-files limit to the hard limit: 10000 concurrent clients need 10000
    sockets on each side. Returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def resolve_database_url(settings: Settings) -> str:
    """The configured URL, or an embedded server's (started now) when none is configured."""
    if settings.database_url:
        return settings.database_url
    from tandem.core.embedded import start_embedded_postgres

    url = start_embedded_postgres(settings.data_dir, cleanup="stop")
    log.info("embedded PostgreSQL under %s", settings.data_dir.resolve())
    return url


DEV_KEY_NAME = "dev"


def dev_key_path(settings: Settings) -> Path:
    return settings.data_dir / "dev-key"


class DevKey(NamedTuple):
    token: str
    path: Path
    # Made by this start (the first): the one time the token itself is printed.
    created: bool


def use_local_dev_key(settings: Settings) -> DevKey | None:
    """On a local start with the embedded database and no key configured: the development
    key under the data folder (made on the first start, mode 0600), configured for the
    instances through the environment. None when a key is configured or the database is not
    the embedded one (a deployment makes its keys itself)."""
    if settings.database_url or settings.configured_api_key() is not None:
        return None
    from tandem.access.keys import new_token

    path = dev_key_path(settings)
    created = not path.exists()
    if created:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_token() + "\n")
    token = path.read_text().strip()
    os.environ["TANDEM_API_KEY"] = token
    os.environ["TANDEM_API_KEY_NAME"] = DEV_KEY_NAME
    return DevKey(token, path, created)


def client_key(given: str | None, settings: Settings) -> str | None:
    """The key a command that calls a running server sends: ``--key``, else TANDEM_API_KEY,
    else the local development key (``make run``'s), if there is one."""
    key = given or settings.configured_api_key()
    if key is None and dev_key_path(settings).exists():
        key = dev_key_path(settings).read_text().strip()
    return key


def key_lines(key: DevKey, base: str) -> list[str]:
    """How to use the development key. The token itself only when it was just made: a log
    kept (or shared) afterwards does not hold it at every start; then the file it is in."""
    if key.created:
        return [
            f"  API key      {key.token}   (development key, made now; kept in {key.path}, "
            "mode 0600: this is the only time it is printed)",
            f"  try          curl -H 'Authorization: Bearer {key.token}' {base}/balance/1",
        ]
    return [
        f"  API key      in {key.path}   (development key, mode 0600; not printed again)",
        f'  try          curl -H "Authorization: Bearer $(cat {shlex.quote(str(key.path))})" '
        f"{base}/balance/1",
    ]


def plain_http(host: str, port: int) -> str:
    """What a start-up line says of the transport: an instance serves plain HTTP (keys and
    the login cookie in clear), and TLS is nginx's in the compose stack."""
    where = "loopback only" if host in ("127.0.0.1", "::1", "localhost") else "other hosts reach it"
    return (
        f"plain HTTP on {host}:{port} ({where}; TLS is terminated by nginx in the compose "
        "stack, docs/deployment.md)"
    )


def migration_url(settings: Settings, url: str) -> str:
    """Where migrations connect: straight to PostgreSQL when the service's URL points at a
    pooler (TANDEM_DATABASE_DIRECT_URL, docs/pooling.md), else the service's own URL."""
    return settings.database_direct_url or url


def with_connection(run: Callable[[Any], Awaitable[int]]) -> int:
    """``run`` on a direct connection to the service's database (the embedded one too: it
    is joined if a server runs, started if not)."""
    import asyncio

    from tandem.core.database import open_connection

    settings = get_settings()
    url = migration_url(settings, resolve_database_url(settings))

    async def main() -> int:
        conn = await open_connection(url, settings, "tandem-cli", statement_deadline=False)
        try:
            return await run(conn)
        finally:
            await conn.close()

    return asyncio.run(main())
