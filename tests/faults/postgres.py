"""A PostgreSQL server one test owns, so it can stop, restart and kill it.

Fault tests crash the database; the suite's shared server (and the machine's one on :5432) must
never be the one crashed, so each of these tests starts its own. It uses the PostgreSQL 16
binaries in the ``pgserver`` wheel, so it works on a machine that has only Python.

The postmaster is our own child process (``postgres`` started directly, not through
``pg_ctl start``, which orphans it): we know its pid, see at once if it exits during start, and
reap it after ``kill()``. An orphan would be reaped by PID 1, which in a container may never do
it, and a zombie postmaster still passes PostgreSQL's liveness check of a stale
``postmaster.pid``, so the next start would refuse.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg

from tests.faults.system import (
    as_user,
    chown_to,
    kill_all,
    make_reachable,
    postgres_bin_dir,
    process_tree,
    service_user,
)
from tests.support import free_port

START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# --no-sync: nothing to keep across an OS crash (see fsync below), and it saves a second.
INITDB_FLAGS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")

# What `pg_ctl stop -m MODE` sends; we signal our child ourselves and wait for it.
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

_T = TypeVar("_T")


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine from sync code, also when called from an async test: that loop is
    blocked on us, so the coroutine gets its own loop in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


class ThrowawayPostgres:
    """A server in a new temporary folder, listening on 127.0.0.1 only; ``url`` connects as the
    superuser ``postgres`` (trust auth). The port is kept across restarts."""

    def __init__(self, env: Mapping[str, str] | None = None, trusted: Sequence[str] = ()) -> None:
        # Extra environment of the server (a fake clock's, say).
        self._env = dict(env or {})
        # Networks (CIDR) let in without a password besides this host (a container network):
        # then the server listens on every address, for those networks only.
        self._trusted = list(trusted)
        self._owner = service_user() if os.geteuid() == 0 else None
        self._base = Path(tempfile.mkdtemp(prefix="tandem-faultpg-"))
        self.data_dir = self._base / "data"
        self._log_path = self.data_dir / "postgres.log"
        self._process: subprocess.Popen[bytes] | None = None
        self._ever_started = False
        self.port = free_port()
        self.url = self._url()
        try:
            self._init_cluster()
        except BaseException:
            shutil.rmtree(self._base, ignore_errors=True)
            raise

    def _url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _init_cluster(self) -> None:
        bin_dir = postgres_bin_dir()
        self.data_dir.mkdir(mode=0o700)
        if self._owner is not None:
            # The service user runs the binaries in the venv and owns the data folder.
            self._base.chmod(0o755)
            make_reachable([bin_dir, self._base], self._owner)
            chown_to(self._owner, self.data_dir)
        initdb = subprocess.run(
            [str(bin_dir / "initdb"), "-D", str(self.data_dir), "-U", "postgres", *INITDB_FLAGS],
            capture_output=True,
            text=True,
            cwd=self._base,
            check=False,
            **as_user(self._owner),
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        settings = {
            "listen_addresses": "'*'" if self._trusted else "'127.0.0.1'",
            "unix_socket_directories": f"'{self.data_dir}'",
            "max_connections": "300",
            "shared_buffers": "'32MB'",
            # We test process crashes, not OS crashes: the page cache survives a SIGKILL. A
            # commit still waits for its WAL write, so committed means recoverable.
            "fsync": "off",
            "synchronous_commit": "on",
            "huge_pages": "off",
            "log_destination": "'stderr'",
            "logging_collector": "off",
            "log_line_prefix": "'%m [%p] '",
        }
        with (self.data_dir / "postgresql.conf").open("a") as conf:
            conf.write("\n# tests/faults/postgres.py\n")
            conf.writelines(f"{name} = {value}\n" for name, value in settings.items())
        with (self.data_dir / "pg_hba.conf").open("a") as hba:
            hba.writelines(f"host all all {network} trust\n" for network in self._trusted)

    def start(self) -> None:
        """Start and return once a real connection runs ``SELECT 1`` (after a crash that
        includes WAL recovery). Before the first successful start a taken port is replaced by
        a new one (another process won the free_port() race); afterwards it is an error."""
        if self.is_running():
            return
        for _ in range(5):
            log_offset = self._log_path.stat().st_size if self._log_path.exists() else 0
            self._spawn()
            try:
                ready = _run_coroutine(self._wait_ready)
            except BaseException:
                self.kill()
                raise
            if ready:
                self._ever_started = True
                return
            with self._log_path.open("rb") as log:
                log.seek(log_offset)
                tail = log.read().decode(errors="replace")
            self._process = None
            if self._ever_started or "could not bind" not in tail:
                raise RuntimeError(f"postgres exited during start:\n{tail}")
            self.port = free_port()
            self.url = self._url()
        raise RuntimeError("postgres found no free port in 5 tries")

    def _spawn(self) -> None:
        with self._log_path.open("ab") as log:
            chown_to(self._owner, self._log_path)
            self._process = subprocess.Popen(
                [
                    str(postgres_bin_dir() / "postgres"),
                    "-D",
                    str(self.data_dir),
                    "-p",
                    str(self.port),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                # Its own session: a Ctrl-C meant for pytest does not shut it down under us.
                start_new_session=True,
                env={**os.environ, **self._env},
                **as_user(self._owner),
            )

    async def _wait_ready(self) -> bool:
        """True once it answers; False if the process exited."""
        assert self._process is not None
        deadline = time.monotonic() + START_TIMEOUT
        while self._process.poll() is None:
            try:
                conn = await asyncpg.connect(self.url, timeout=2)
            except (
                OSError,
                TimeoutError,
                asyncpg.CannotConnectNowError,  # starting up, or recovering
                asyncpg.ConnectionDoesNotExistError,
            ):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"postgres not ready in {START_TIMEOUT} s:\n{self.log()}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            try:
                await conn.fetchval("SELECT 1")
            finally:
                await conn.close()
            return True
        return False

    def stop(self, mode: Literal["smart", "fast", "immediate"] = "fast") -> None:
        """Stop as ``pg_ctl stop -m MODE`` would. ``smart`` waits for clients to disconnect;
        ``immediate`` is crash-like (no checkpoint: the next start recovers from the WAL).
        The postmaster exits only after its children, so nothing is left running."""
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        process.send_signal(_STOP_SIGNALS[mode])
        try:
            process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            raise TimeoutError(f"postgres did not stop ({mode}) in {STOP_TIMEOUT} s") from None
        self._process = None

    def restart(self, mode: Literal["fast", "immediate"] = "fast") -> None:
        self.stop(mode)
        self.start()

    def kill(self) -> None:
        """SIGKILL the postmaster and every process under it, as a crash of the whole server
        (OOM killer, container kill). Left alone, the backends would exit by themselves a bit
        later, and until then their shared memory blocks the next start. postmaster.pid stays
        behind, stale; the next start replaces it and recovers from the WAL."""
        process = self._process
        if process is None or process.poll() is not None:
            self._process = None
            return
        postmaster = process.pid
        survivors = kill_all(lambda: process_tree([postmaster]))
        process.wait()
        self._process = None
        if survivors:
            raise RuntimeError(f"postgres processes still alive after SIGKILL: {sorted(survivors)}")

    def is_running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def log(self) -> str:
        """The server's log (every start appends to it)."""
        try:
            return self._log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def _discard(self) -> None:
        try:
            self.stop("immediate")
        except TimeoutError:
            self.kill()
        finally:
            shutil.rmtree(self._base, ignore_errors=True)


@contextmanager
def throwaway_postgres(
    env: Mapping[str, str] | None = None, trusted: Sequence[str] = ()
) -> Iterator[ThrowawayPostgres]:
    """A started server; stopped (immediate: nothing to keep) and deleted afterwards, also when
    the test fails."""
    server = ThrowawayPostgres(env, trusted)
    try:
        server.start()
        yield server
    finally:
        server._discard()
