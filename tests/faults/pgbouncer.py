"""A real PgBouncer (Debian's package) in front of the suite's PostgreSQL.

Why a real one: what breaks behind a transaction-mode pooler (asyncpg's named prepared
statements landing on another server connection, startup parameters PgBouncer refuses) is
PgBouncer's behaviour, not something a fake would reproduce faithfully. Each harness writes its
own ini in a temporary folder and listens on a free loopback port, so the packaged service
(Debian's on :6432, if it runs) is neither needed nor touched.

PgBouncer refuses to run as root. As root the harness runs it as an unprivileged user: the
owner of the upstream's Unix socket folder when only that owner can reach it (the embedded
PostgreSQL keeps its socket in its 0700 data folder, owned by the ``pgserver`` user), otherwise
a ``tandem-pg`` system user it creates once. As anyone else it runs as the current user.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy.engine import URL, make_url

from tests.faults.system import (
    as_user,
    chown_to,
    make_reachable,
    port_open,
    service_user,
    wait_until,
)
from tests.support import free_port, require_tool

START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0


@dataclass
class PgBouncer:
    """A running PgBouncer: ``url`` is the upstream URL with PgBouncer's host and port."""

    port: int
    url: str
    folder: Path
    process: subprocess.Popen[bytes]

    def log(self) -> str:
        """PgBouncer's log file; before it opened that file (a bad ini, say) the log is only on
        its stderr, which is kept as well (and repeats the file's lines, hence not both)."""
        for name in ("pgbouncer.log", "console.log"):
            path = self.folder / name
            text = path.read_text(errors="replace") if path.exists() else ""
            if text:
                return text
        return ""


def _quote(value: str) -> str:
    """A userlist.txt field: double-quoted, a double quote doubled."""
    return '"' + value.replace('"', '""') + '"'


def _upstream(url: URL) -> tuple[str, int]:
    """Host (or Unix socket folder) and port of the upstream, from the URL or its ``host`` /
    ``port`` query parameters (how libpq-style URLs name a socket folder)."""
    host = url.host or url.query.get("host")
    port = url.port or url.query.get("port") or 5432
    if isinstance(host, tuple):  # ?host=a&host=b: PgBouncer forwards to one server
        host = host[0]
    if isinstance(port, tuple):
        port = port[0]
    return str(host or "127.0.0.1"), int(port)


def _run_as(upstream_host: str) -> pwd.struct_passwd | None:
    """Whom PgBouncer runs as: None (the current user) unless we are root; as root, the owner
    of a Unix socket folder that only its owner may enter, else the service user."""
    if os.geteuid() != 0:
        return None
    if upstream_host.startswith("/"):
        info = os.stat(upstream_host)
        if info.st_uid != 0 and not info.st_mode & stat.S_IXOTH:
            return pwd.getpwuid(info.st_uid)
    return service_user()


def _write_config(
    folder: Path,
    *,
    port: int,
    upstream_host: str,
    upstream_port: int,
    user: str,
    password: str,
    pool_mode: str,
    default_pool_size: int,
    max_client_conn: int,
) -> Path:
    """The ini and the auth file. ``auth_type = trust`` still needs the user listed; its
    password there is also what PgBouncer sends upstream, if the upstream asks for one."""
    (folder / "userlist.txt").write_text(f"{_quote(user)} {_quote(password)}\n")
    ini = folder / "pgbouncer.ini"
    ini.write_text(
        "\n".join(
            [
                "[databases]",
                # Any database name goes to the same name upstream: one harness serves every
                # fresh test database.
                f"* = host={upstream_host} port={upstream_port}",
                "",
                "[pgbouncer]",
                "listen_addr = 127.0.0.1",
                f"listen_port = {port}",
                f"unix_socket_dir = {folder}",
                "auth_type = trust",
                f"auth_file = {folder / 'userlist.txt'}",
                f"pidfile = {folder / 'pgbouncer.pid'}",
                f"logfile = {folder / 'pgbouncer.log'}",
                f"pool_mode = {pool_mode}",
                f"default_pool_size = {default_pool_size}",
                f"max_client_conn = {max_client_conn}",
                # Fail a test fast rather than queue a client for PgBouncer's default 120 s.
                "query_wait_timeout = 10",
                "server_connect_timeout = 5",
                "",
            ]
        )
    )
    return ini


def _stop(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM (PgBouncer 1.18: immediate shutdown, clients disconnected), SIGKILL if it
    lingers."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextmanager
def pgbouncer(
    upstream_url: str,
    *,
    pool_mode: str = "transaction",
    default_pool_size: int = 20,
    max_client_conn: int = 2000,
) -> Iterator[PgBouncer]:
    """PgBouncer forwarding to ``upstream_url``'s server, in the foreground; stopped and its
    folder deleted on exit, whatever happened inside."""
    binary = require_tool("pgbouncer")
    upstream = make_url(upstream_url)
    upstream_host, upstream_port = _upstream(upstream)
    port = free_port()
    url = upstream.set(
        host="127.0.0.1",
        port=port,
        query={k: v for k, v in upstream.query.items() if k not in ("host", "port")},
    ).render_as_string(hide_password=False)

    folder = Path(tempfile.mkdtemp(prefix="tandem-pgbouncer-"))
    process: subprocess.Popen[bytes] | None = None
    try:
        ini = _write_config(
            folder,
            port=port,
            upstream_host=upstream_host,
            upstream_port=upstream_port,
            user=upstream.username or pwd.getpwuid(os.geteuid()).pw_name,
            password=upstream.password or "",
            pool_mode=pool_mode,
            default_pool_size=default_pool_size,
            max_client_conn=max_client_conn,
        )
        account = _run_as(upstream_host)
        if account is not None:
            chown_to(account, folder, *folder.iterdir())
            make_reachable([folder], account)
        with (folder / "console.log").open("wb") as console:
            process = subprocess.Popen(
                [binary, str(ini)],
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                cwd=folder,
                **as_user(account),
            )
        bouncer = PgBouncer(port=port, url=url, folder=folder, process=process)
        # A TCP connect, not a protocol-level check: that would need an event loop, and this
        # context manager may be entered from inside one.
        wait_until(
            lambda: port_open(port),
            process=process,
            timeout=START_TIMEOUT,
            what="pgbouncer",
            until="listening",
            log=bouncer.log,
        )
        yield bouncer
    finally:
        if process is not None:
            _stop(process)
        with suppress(OSError):
            shutil.rmtree(folder)
