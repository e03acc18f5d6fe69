"""The one command-line entry point: ``tandem serve | cluster | migrate | keys | ledger verify
| loadtest``."""

from __future__ import annotations

import argparse
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from tandem.core.settings import Settings, get_settings
from tandem.observability.logging import configure_logging

log = logging.getLogger("tandem")

# Seconds uvicorn lets open requests finish after SIGTERM (after the scheduler has drained).
# A container's stop grace period must exceed this plus TANDEM_SCHEDULER_DRAIN_TIMEOUT.
GRACEFUL_SHUTDOWN_SECONDS = 10


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


def use_local_dev_key(settings: Settings) -> str | None:
    """On a local start with the embedded database and no key configured: the development
    key under the data folder (made on the first start, mode 0600), configured for the
    instances through the environment. None when a key is configured or the database is not
    the embedded one (a deployment makes its keys itself)."""
    if settings.database_url or settings.configured_api_key() is not None:
        return None
    from tandem.access.keys import new_token

    path = dev_key_path(settings)
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(new_token() + "\n")
    token = path.read_text().strip()
    os.environ["TANDEM_API_KEY"] = token
    os.environ["TANDEM_API_KEY_NAME"] = DEV_KEY_NAME
    return token


def key_lines(token: str, base: str) -> list[str]:
    path = dev_key_path(get_settings())
    return [
        f"  API key      {token}   (development key, kept in {path})",
        f"  try          curl -H 'Authorization: Bearer {token}' {base}/balance/1",
    ]


def migration_url(settings: Settings, url: str) -> str:
    """Where migrations connect: straight to PostgreSQL when the service's URL points at a
    pooler (TANDEM_DATABASE_DIRECT_URL, docs/pooling.md), else the service's own URL."""
    return settings.database_direct_url or url


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from tandem.core.migrations import upgrade_to_head

    settings = get_settings()
    dev_key = use_local_dev_key(settings)
    url = resolve_database_url(settings)
    # Child processes (workers) read settings from the environment.
    os.environ["TANDEM_DATABASE_URL"] = url
    get_settings.cache_clear()
    settings = get_settings()
    if settings.migrate_on_start and not args.no_migrate:
        upgrade_to_head(migration_url(settings, url))
    limit = raise_fd_limit()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    also = f" and alone on :{args.direct_port}" if args.direct_port is not None else ""
    log.info("serving on http://%s:%d%s (docs: /docs, fd limit %d)", host, port, also, limit)
    if dev_key is not None:
        log.info("\n".join(key_lines(dev_key, f"http://{host}:{port}")))
    if settings.auth_disabled:
        log.warning("authentication is DISABLED (TANDEM_AUTH_DISABLED): every route is open")
    # uvicorn re-raises SIGTERM after its graceful shutdown; by default that kills the process
    # before atexit handlers run, and the embedded PostgreSQL would be left running. Exit
    # normally instead, so they do.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    from tandem.core.http import GuardedHttpToolsProtocol, Limits

    Limits.max_header_bytes = settings.http_max_header_bytes
    Limits.max_body_bytes = settings.http_max_body_bytes
    Limits.header_timeout = settings.http_header_timeout
    Limits.body_timeout = settings.http_body_timeout
    Limits.max_connections = settings.http_max_connections
    config = uvicorn.Config(
        "tandem.main:create_asgi_app",
        factory=True,
        host=host,
        port=port,
        loop="uvloop",
        http=GuardedHttpToolsProtocol,
        backlog=settings.backlog,
        access_log=args.access_log,
        log_level=settings.log_level,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_SECONDS,
        timeout_keep_alive=settings.keep_alive_timeout,
    )
    if args.reuse_port or args.direct_port is not None:
        # Several instances on one port: the kernel spreads connections over them (this is
        # how `tandem cluster` gives N instances one entry port without a proxy). A direct
        # port reaches this instance alone (for Prometheus, or to look at one instance).
        sockets = [_listen(host, port, reuse_port=args.reuse_port)]
        if args.direct_port is not None:
            sockets.append(_listen(host, args.direct_port, reuse_port=False))
        uvicorn.Server(config).run(sockets=sockets)
    else:
        uvicorn.Server(config).run()
    return 0


def _listen(host: str, port: int, *, reuse_port: bool) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    return sock


def cmd_cluster(args: argparse.Namespace) -> int:
    """N real instances (own processes, own instance ids) on one database and one port."""
    import time

    from tandem.core.migrations import upgrade_to_head

    settings = get_settings()
    dev_key = use_local_dev_key(settings)
    url = resolve_database_url(settings)
    upgrade_to_head(migration_url(settings, url))
    env = {**os.environ, "TANDEM_DATABASE_URL": url, "TANDEM_MIGRATE_ON_START": "false"}
    command = [sys.executable, "-m", "tandem", "serve", "--reuse-port", "--no-migrate"]
    command += ["--host", args.host, "--port", str(args.port)]
    direct = [args.port + 1 + i for i in range(args.instances)] if args.direct_ports else []
    # Handlers first: a SIGTERM or Ctrl-C while the instances start must still stop them all.
    stopping = False

    def stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    children: list[subprocess.Popen[bytes]] = []
    try:
        for i in range(args.instances):
            extra = ["--direct-port", str(direct[i])] if direct else []
            children.append(subprocess.Popen([*command, *extra], env=env))
        base = f"http://{args.host}:{args.port}"
        urls = [f"http://{args.host}:{port}" for port in direct] or [base]
        if _wait_live(urls, children, lambda: stopping):
            lines = [
                f"{len(children)} instances on one database, one entry port:",
                f"  status page  {base}/",
                f"  API docs     {base}/docs",
                f"  tasks        {base}/tasks    instances {base}/instances",
            ]
            if dev_key is not None:
                lines += key_lines(dev_key, base)
            for child, port in zip(children, direct, strict=False):
                lines.append(f"  instance pid {child.pid}: http://{args.host}:{port}/metrics")
            log.info("\n".join(lines))
        while not stopping and any(c.poll() is None for c in children):
            time.sleep(0.2)
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)  # each drains its runs to the others
        deadline = time.monotonic() + 20
        for child in children:
            try:
                child.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.kill()
        log.info("cluster stopped")
    return 0


def _wait_live(
    urls: list[str], children: list[subprocess.Popen[bytes]], stopping: Callable[[], bool]
) -> bool:
    """Until every URL answers /health/live, so the URLs are printed once they work, after
    the instances' start-up lines. False if 60 s pass, a child exits or we are stopping."""
    import time
    import urllib.request

    deadline = time.monotonic() + 60
    pending = list(urls)
    while pending and time.monotonic() < deadline:
        if stopping() or any(c.poll() is not None for c in children):
            return False
        try:
            with urllib.request.urlopen(f"{pending[0]}/health/live", timeout=1):  # noqa: S310
                pending.pop(0)
        except OSError:
            time.sleep(0.2)
    return not pending


def cmd_migrate(_: argparse.Namespace) -> int:
    from tandem.core.migrations import grant_app_role, head_revision, upgrade_to_head

    settings = get_settings()
    url = migration_url(settings, resolve_database_url(settings))
    upgrade_to_head(url)
    print(f"database at revision {head_revision()}")
    if settings.database_app_role:
        grant_app_role(url, settings.database_app_role)
        print(f"granted the application's rights to {settings.database_app_role}")
    return 0


def _with_connection(run: Callable[[Any], Awaitable[int]]) -> int:
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


def cmd_keys_create(args: argparse.Namespace) -> int:
    from tandem.access import service

    async def run(conn: Any) -> int:
        try:
            token = await service.create_key(conn, args.name, args.scope)
        except service.KeyCommandError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        print(f"created API key {args.name!r} with scopes {', '.join(sorted(set(args.scope)))}")
        print("the token is shown once; send it as Authorization: Bearer <token>")
        print(token)
        return 0

    return _with_connection(run)


def cmd_keys_list(_: argparse.Namespace) -> int:
    from tandem.access import service

    def when(value: Any) -> str:
        return "-" if value is None else value.isoformat(timespec="seconds")

    async def run(conn: Any) -> int:
        rows = [("NAME", "SCOPES", "CREATED", "LAST USED", "REVOKED")]
        for key in await service.list_keys(conn):
            rows.append(
                (
                    key.name,
                    ",".join(key.scopes),
                    when(key.created_at),
                    when(key.last_used_at),
                    when(key.revoked_at),
                )
            )
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
        return 0

    return _with_connection(run)


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

    return _with_connection(run)


def cmd_ledger_verify(_: argparse.Namespace) -> int:
    """Check the ledger's invariants over every user; exit 1 on any mismatch."""
    import asyncio

    from tandem.core.database import open_connection
    from tandem.wallet.repository import verify_ledger

    settings = get_settings()
    url = migration_url(settings, resolve_database_url(settings))

    async def run() -> int:
        conn = await open_connection(
            url, settings, "tandem-ledger-verify", statement_deadline=False
        )
        try:
            found = await verify_ledger(conn)
        finally:
            await conn.close()
        print(f"users: {found.users}")
        print(f"entries: {found.entries}")
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
        print(f"mismatches: {found.mismatches}")
        return 1 if found.mismatches else 0

    return asyncio.run(run())


def cmd_loadtest(args: argparse.Namespace) -> int:
    from tandem.loadtest import LoadtestOptions, run_loadtest

    raise_fd_limit()
    settings = get_settings()
    key = args.key or settings.configured_api_key()
    if key is None and dev_key_path(settings).exists():
        key = dev_key_path(settings).read_text().strip()
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tandem", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run one instance (embedded PostgreSQL if no URL)")
    serve.add_argument("--host", default=None)
    serve.add_argument("--port", type=int, default=None)
    serve.add_argument("--no-migrate", action="store_true", help="do not migrate on start")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument(
        "--reuse-port", action="store_true", help="share the port with other instances"
    )
    serve.add_argument(
        "--direct-port", type=int, default=None, help="also listen here, on this instance alone"
    )
    serve.set_defaults(func=cmd_serve)

    cluster = sub.add_parser("cluster", help="run N instances on one database and one port")
    cluster.add_argument("--instances", type=int, default=5)
    cluster.add_argument("--host", default="127.0.0.1")
    cluster.add_argument("--port", type=int, default=8000)
    cluster.add_argument(
        "--no-direct-ports",
        dest="direct_ports",
        action="store_false",
        help="do not give instance i its own port (entry port + i) as well",
    )
    cluster.set_defaults(func=cmd_cluster)

    migrate = sub.add_parser("migrate", help="apply database migrations once")
    migrate.set_defaults(func=cmd_migrate)

    from tandem.core.callers import SCOPES

    keys = sub.add_parser("keys", help="API keys: create, list, revoke")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="make a key; its token is printed once, last")
    create.add_argument("--name", required=True)
    create.add_argument(
        "--scope", action="append", required=True, choices=SCOPES, help="repeat for more"
    )
    create.set_defaults(func=cmd_keys_create)
    keys_sub.add_parser("list", help="every key (tokens are never shown)").set_defaults(
        func=cmd_keys_list
    )
    revoke = keys_sub.add_parser("revoke", help="refuse a key from now on (it is kept)")
    revoke.add_argument("name")
    revoke.set_defaults(func=cmd_keys_revoke)

    ledger = sub.add_parser("ledger", help="the wallet's journal")
    ledger_sub = ledger.add_subparsers(dest="ledger_command", required=True)
    verify = ledger_sub.add_parser(
        "verify", help="every balance = the sum of its entries, each entry = previous + amount"
    )
    verify.set_defaults(func=cmd_ledger_verify)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(get_settings().log_level)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
