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
import pwd
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, Literal, TypeVar

import asyncpg

from tests.support import free_port

# PostgreSQL refuses to run as root: as root, the server runs as this system user.
SERVICE_USER = "tandem-pg"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 30.0
# --no-sync: nothing to keep across an OS crash (see fsync below), and it saves a second.
INITDB_FLAGS = ("--auth=trust", "--encoding=UTF8", "--locale=C", "--no-sync", "--no-instructions")

# What `pg_ctl stop -m MODE` sends; we signal our child ourselves and wait for it.
_STOP_SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

_T = TypeVar("_T")


def _bin_dir() -> Path:
    with warnings.catch_warnings():
        # pgserver imports platformdirs, which warns when XDG_RUNTIME_DIR is unset; the suite
        # turns warnings into errors.
        warnings.simplefilter("ignore")
        from pgserver._commands import POSTGRES_BIN_PATH
    return Path(POSTGRES_BIN_PATH)


def _service_user() -> pwd.struct_passwd:
    """The unprivileged user, created if missing. Two pytest runs may race to create it: the
    loser's useradd fails ("exists", or the passwd file is locked), so failures are retried
    through getpwnam rather than trusted."""
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise RuntimeError(f"running as root and no `useradd` to create {SERVICE_USER!r}")
    for _ in range(50):
        try:
            return pwd.getpwnam(SERVICE_USER)
        except KeyError:
            pass
        created = subprocess.run(
            [useradd, "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", SERVICE_USER],
            capture_output=True,
            check=False,
        )
        if created.returncode != 0:
            time.sleep(0.1)
    raise RuntimeError(f"could not create the system user {SERVICE_USER!r}")


def _allow_traversal(path: Path) -> None:
    """Add o+x (traverse, not list) to every ancestor that lacks it, so the service user can
    reach its data folder."""
    for folder in path.parents:
        mode = folder.stat().st_mode
        if not mode & stat.S_IXOTH:
            folder.chmod(stat.S_IMODE(mode) | stat.S_IXOTH)


def _check_reachable(bin_dir: Path) -> None:
    """The service user must reach the binaries in the venv; we do not open up a folder such
    as /root for it (unlike the data folder's, under /tmp), so say what is wrong instead."""
    for folder in bin_dir.parents:
        if not folder.stat().st_mode & stat.S_IXOTH:
            raise RuntimeError(
                f"{SERVICE_USER} cannot reach {bin_dir}: {folder} is not traversable (o+x); "
                "put the venv elsewhere or chmod o+x that folder"
            )


def _run_coroutine(factory: Callable[[], Coroutine[Any, Any, _T]]) -> _T:
    """Run a coroutine from sync code, also when called from an async test: that loop is
    blocked on us, so the coroutine gets its own loop in a thread."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(factory())
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(lambda: asyncio.run(factory())).result()


def _parent_pids() -> dict[int, int]:
    parents = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
            fields = (entry / "stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        parents[int(entry.name)] = int(fields[1])
    return parents


def _descendants(pid: int) -> list[int]:
    parents = _parent_pids()
    found: list[int] = []
    frontier = [pid]
    while frontier:
        current = frontier.pop()
        children = [child for child, parent in parents.items() if parent == current]
        found.extend(children)
        frontier.extend(children)
    return found


def _gone(pid: int) -> bool:
    """Exited, or a zombie: a killed postmaster's children are reparented to PID 1, which may
    never reap them, but a zombie holds no shared memory and no port."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return True
    return state == "Z"


class ThrowawayPostgres:
    """A server in a new temporary folder, listening on 127.0.0.1 only; ``url`` connects as the
    superuser ``postgres`` (trust auth). The port is kept across restarts."""

    def __init__(self) -> None:
        self._owner = _service_user() if os.geteuid() == 0 else None
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

    def _as_owner(self) -> dict[str, Any]:
        if self._owner is None:
            return {}
        # extra_groups=[] drops root's supplementary groups too.
        return {"user": self._owner.pw_uid, "group": self._owner.pw_gid, "extra_groups": []}

    def _init_cluster(self) -> None:
        self.data_dir.mkdir(mode=0o700)
        if self._owner is not None:
            _check_reachable(_bin_dir())
            self._base.chmod(0o755)
            _allow_traversal(self._base)
            os.chown(self.data_dir, self._owner.pw_uid, self._owner.pw_gid)
        initdb = subprocess.run(
            [str(_bin_dir() / "initdb"), "-D", str(self.data_dir), "-U", "postgres", *INITDB_FLAGS],
            capture_output=True,
            text=True,
            cwd=self._base,
            check=False,
            **self._as_owner(),
        )
        if initdb.returncode != 0:
            raise RuntimeError(f"initdb failed ({initdb.returncode}):\n{initdb.stderr}")
        settings = {
            "listen_addresses": "'127.0.0.1'",
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
            if self._owner is not None:
                os.chown(self._log_path, self._owner.pw_uid, self._owner.pw_gid)
            self._process = subprocess.Popen(
                [str(_bin_dir() / "postgres"), "-D", str(self.data_dir), "-p", str(self.port)],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._base,
                # Its own session: a Ctrl-C meant for pytest does not shut it down under us.
                start_new_session=True,
                **self._as_owner(),
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
        # Frozen, the postmaster cannot fork between our listing its children and killing them.
        os.kill(process.pid, signal.SIGSTOP)
        children = _descendants(process.pid)
        process.kill()
        for pid in children:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        process.wait()
        self._process = None
        deadline = time.monotonic() + 10
        while not all(_gone(pid) for pid in children):
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres children still alive after SIGKILL: {children}")
            time.sleep(0.01)

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
def throwaway_postgres() -> Iterator[ThrowawayPostgres]:
    """A started server; stopped (immediate: nothing to keep) and deleted afterwards, also when
    the test fails."""
    server = ThrowawayPostgres()
    try:
        server.start()
        yield server
    finally:
        server._discard()
