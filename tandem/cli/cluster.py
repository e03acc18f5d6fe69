"""``tandem cluster``: N real instances on one database and one entry port."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable

from tandem.cli.common import (
    Subcommands,
    key_lines,
    migration_url,
    plain_http,
    resolve_database_url,
    use_local_dev_key,
)
from tandem.core.settings import get_settings

log = logging.getLogger("tandem")


def register(sub: Subcommands) -> None:
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


def cmd_cluster(args: argparse.Namespace) -> int:
    """N real instances (own processes, own instance ids) on one database and one port."""
    from tandem.core.migrations import upgrade_to_head

    settings = get_settings()
    dev_key = use_local_dev_key(settings)
    url = resolve_database_url(settings)
    waits = upgrade_to_head(migration_url(settings, url))
    if waits is not None:
        log.warning("%s", waits)
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
                f"{len(children)} instances on one database, one entry port, "
                f"{plain_http(args.host, args.port)}:",
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
