"""``tandem serve``: one instance (uvicorn), on the embedded PostgreSQL if no URL is set."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys

from tandem.cli.common import (
    Subcommands,
    key_lines,
    migration_url,
    plain_http,
    raise_fd_limit,
    resolve_database_url,
    use_local_dev_key,
)
from tandem.core.settings import get_settings

log = logging.getLogger("tandem")

# Seconds uvicorn lets open requests finish after SIGTERM (after the scheduler has drained).
# A container's stop grace period must exceed this plus TANDEM_SCHEDULER_DRAIN_TIMEOUT.
GRACEFUL_SHUTDOWN_SECONDS = 10


def register(sub: Subcommands) -> None:
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
        waits = upgrade_to_head(migration_url(settings, url))
        if waits is not None:
            log.warning("%s", waits)
    limit = raise_fd_limit()
    host = args.host or settings.host
    port = args.port if args.port is not None else settings.port
    also = f" and alone on :{args.direct_port}" if args.direct_port is not None else ""
    log.info(
        "serving on http://%s:%d%s (docs: /docs, fd limit %d), %s",
        host,
        port,
        also,
        limit,
        plain_http(host, port),
    )
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
        # Naming the server and its version helps only whoever looks for a known weakness.
        server_header=False,
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
