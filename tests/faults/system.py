"""What the fault harnesses (PostgreSQL, Patroni, PgBouncer) share about the machine: the
PostgreSQL binaries, the unprivileged user the servers run as when the tests run as root, letting
that user reach what it needs, and finding, killing and waiting for processes.

PostgreSQL and PgBouncer refuse to run as root: as root, they run as the ``tandem-pg`` system
user, created once (by whichever harness or pytest run needs it first). A folder it must pass
through may be closed to it (pyenv under ``/root``, mode 0700): such a folder gets a POSIX ACL
entry letting only that user *traverse* it (``--x``, no listing, nobody else), which is the
least the machine has to give.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pwd
import shutil
import signal
import socket
import stat
import struct
import subprocess
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import suppress
from pathlib import Path
from typing import Any

SERVICE_USER = "tandem-pg"
# Concurrent creators of the user (other pytest runs) queue on a lock of the folder that holds
# the passwd files: a fixed place, never replaced, and no file of ours left behind.
_USER_LOCK = "/etc"


def postgres_bin_dir() -> Path:
    """pgserver's PostgreSQL 16 binaries: initdb, postgres, pg_ctl, pg_basebackup and
    pg_rewind are all there, and they find their own libpq, so no system PostgreSQL is
    needed."""
    with warnings.catch_warnings():
        # pgserver imports platformdirs, which warns when XDG_RUNTIME_DIR is unset (containers,
        # CI); the suite turns warnings into errors.
        warnings.simplefilter("ignore")
        from pgserver import _commands

    return Path(_commands.POSTGRES_BIN_PATH)


# --- the unprivileged user ------------------------------------------------------------------


def service_user() -> pwd.struct_passwd:
    """``tandem-pg``, created if missing. Idempotent and safe when runs race. ``useradd`` does
    not always keep out a concurrent ``useradd`` (in a container, six at once all succeeded
    and the last one's files won, so the others had handed out a uid nobody has), so creators
    queue on a lock of ours. A ``useradd`` that fails anyway (the user exists, or something
    else holds the passwd files) is retried through the lookup rather than trusted."""
    with suppress(KeyError):
        return pwd.getpwnam(SERVICE_USER)
    useradd = shutil.which("useradd") or shutil.which(
        "useradd", path="/usr/sbin:/sbin:/usr/bin:/bin"
    )
    if useradd is None:
        raise RuntimeError(f"running as root and no `useradd` to create {SERVICE_USER!r}")
    lock = os.open(_USER_LOCK, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for _ in range(50):
            with suppress(KeyError):
                return pwd.getpwnam(SERVICE_USER)
            created = subprocess.run(
                [
                    useradd,
                    "--system",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    SERVICE_USER,
                ],
                capture_output=True,
                check=False,
            )
            if created.returncode != 0:
                time.sleep(0.1)
    finally:
        os.close(lock)
    raise RuntimeError(f"could not create the system user {SERVICE_USER!r}")


def as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """``subprocess`` arguments that run the child as ``user`` (nothing for None: as we are).
    Dropping root by Popen itself: no runuser/su parent between us and the server, so our
    signals reach it directly. ``extra_groups=[]`` drops root's supplementary groups too."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


def chown_to(user: pwd.struct_passwd | None, *paths: Path) -> None:
    """Give the paths to ``user`` (nothing for None)."""
    if user is not None:
        for path in paths:
            os.chown(path, user.pw_uid, user.pw_gid)


# POSIX ACLs as Linux stores them in the ``system.posix_acl_access`` extended attribute: a
# little-endian version (2), then (tag u16, permissions u16, id u32) entries sorted by tag and
# id. Written directly so that no `acl` package (setfacl) is needed.
_ACL_XATTR = "system.posix_acl_access"
_ACL_VERSION = 2
_ACL_USER_OBJ = 0x01
_ACL_USER = 0x02
_ACL_GROUP_OBJ = 0x04
_ACL_GROUP = 0x08
_ACL_MASK = 0x10
_ACL_OTHER = 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF
_ACL_EXECUTE = 1


def _grant_traverse(directory: Path, user: pwd.struct_passwd) -> None:
    """Add ``user:<uid>:--x`` to the folder's ACL (merged with any ACL already there)."""
    uid = user.pw_uid
    try:
        raw = os.getxattr(directory, _ACL_XATTR)
    except OSError as error:
        if error.errno != errno.ENODATA:
            raise
        mode = directory.stat().st_mode
        entries = {
            (_ACL_USER_OBJ, _ACL_UNDEFINED_ID): (mode >> 6) & 7,
            (_ACL_GROUP_OBJ, _ACL_UNDEFINED_ID): (mode >> 3) & 7,
            (_ACL_OTHER, _ACL_UNDEFINED_ID): mode & 7,
        }
    else:
        (version,) = struct.unpack_from("<I", raw)
        if version != _ACL_VERSION:
            raise RuntimeError(f"{directory}: unknown ACL format {version}")
        entries = {(tag, ident): perm for tag, perm, ident in struct.iter_unpack("<HHI", raw[4:])}
    if entries.get((_ACL_USER, uid), 0) & _ACL_EXECUTE:
        return
    entries[(_ACL_USER, uid)] = entries.get((_ACL_USER, uid), 0) | _ACL_EXECUTE
    mask_key = (_ACL_MASK, _ACL_UNDEFINED_ID)
    if mask_key in entries:
        entries[mask_key] |= _ACL_EXECUTE
    else:
        # A named entry needs a mask; as wide as the group class was, plus our execute bit,
        # so nobody already allowed in loses anything.
        entries[mask_key] = _ACL_EXECUTE | entries[(_ACL_GROUP_OBJ, _ACL_UNDEFINED_ID)]
        for (tag, _), perm in entries.items():
            if tag == _ACL_GROUP:
                entries[mask_key] |= perm
    payload = struct.pack("<I", _ACL_VERSION) + b"".join(
        struct.pack("<HHI", tag, perm, ident) for (tag, ident), perm in sorted(entries.items())
    )
    try:
        os.setxattr(directory, _ACL_XATTR, payload)
    except OSError as error:
        raise RuntimeError(
            f"cannot let {user.pw_name} traverse {directory} ({error}): `chmod o+x` it by hand"
        ) from error


def make_reachable(paths: Iterable[Path], user: pwd.struct_passwd) -> None:
    """Let the user traverse every folder on the way to the paths (a path that is a folder
    included) that it could not enter (by owner or "other" bits; group bits are ignored: the
    user's own group owns nothing here)."""
    seen: set[Path] = set()
    for path in paths:
        for folder in [path, *path.parents] if path.is_dir() else list(path.parents):
            if folder in seen:
                continue
            seen.add(folder)
            info = folder.stat()
            if info.st_uid == user.pw_uid or info.st_mode & stat.S_IXOTH:
                continue
            _grant_traverse(folder, user)


# --- processes ------------------------------------------------------------------------------


def pids() -> Iterator[int]:
    """Every process's pid, from /proc."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            yield int(entry.name)


def _stat_fields(pid: int) -> list[str]:
    """``/proc/<pid>/stat`` after the command, from the state on ("pid (comm) state ppid
    ...": comm may hold spaces and parentheses)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()


def process_tree(roots: Iterable[int]) -> set[int]:
    """The roots and all their descendants (a process that exits meanwhile is skipped)."""
    children: dict[int, list[int]] = {}
    for pid in pids():
        try:
            parent = int(_stat_fields(pid)[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(parent, []).append(pid)
    found: set[int] = set()
    todo = list(roots)
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo.extend(children.get(pid, []))
    return found


def alive(pid: int) -> bool:
    """Running, or at least not yet a zombie: a killed server's children are reparented to
    PID 1, which may never reap them (in a container), but a zombie holds no shared memory and
    no port."""
    try:
        return _stat_fields(pid)[0] != "Z"
    except (OSError, IndexError):
        return False


def kill_all(find: Callable[[], set[int]], timeout: float = 10.0) -> set[int]:
    """Freeze every process ``find`` reports, again until no new one appears (a forking
    parent's latest child), so none can fork or react to another's death (a machine dies all
    at once); then SIGKILL them all and wait until they are gone. Returns those still alive
    after ``timeout`` (none, normally)."""
    frozen: set[int] = set()
    for _ in range(20):
        found = find() - frozen
        if not found:
            break
        for pid in found:
            with suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
        frozen |= found
    for pid in frozen:
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while True:
        left = {pid for pid in frozen if alive(pid)}
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.01)


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether a TCP connection to the port succeeds."""
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex((host, port)) == 0


def wait_until(
    ready: Callable[[], bool],
    *,
    process: subprocess.Popen[bytes],
    timeout: float,
    what: str,
    until: str,
    log: Callable[[], str],
    interval: float = 0.05,
) -> None:
    """Poll ``ready`` until it is true; RuntimeError if the process exits first, TimeoutError
    after ``timeout`` seconds, both with the process's ``log``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{log()}")
        if ready():
            return
        time.sleep(interval)
    raise TimeoutError(f"{what} not {until} in {timeout} s:\n{log()}")
