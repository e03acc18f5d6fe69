"""Fixtures (a real PostgreSQL server for the session, fresh databases, the app in process, real
server processes) and the tiers of the suite.

Tiers. A test that starts a process (a `tandem` instance, nginx, Prometheus, a browser, a
PostgreSQL of its own, a tool's run) is marked ``slow``; one that runs a container (podman) is
marked ``container`` as well. Nobody marks tests by hand: ``pytest_collection_modifyitems``
reads, for every collected test, the code of the test function and of every fixture in its
closure, and follows each global name it uses (a function or class of tests/ or bench/, or an
attribute of a module it names) down to what starts a process:

- ``subprocess`` (Popen, run, ...), ``asyncio.create_subprocess_*``, ``os.fork``/``system``/
  ``spawn*``/``exec*``, and Tandem's embedded PostgreSQL (pgserver): ``slow``;
- anything defined in ``tests.deploy.containers`` (podman): ``container`` (and ``slow``).

A test whose fixtures start a server is slow by its fixtures; one that calls
``start_server`` (or a helper of its own module that does) is slow by its code. The one
exception is the session's shared PostgreSQL (``embedded_postgres``): every test uses it, and
it starts once. ``make test-fast`` runs ``-m "not slow and not container"`` with
TANDEM_TEST_NO_PROCESSES=1, under which starting any process inside a test (its fixtures
included) raises ProcessForbiddenError: a test the reading above missed (say, a process
started through an object's method the reading cannot follow) fails in the fast tier
instead of passing slowly, and the fix is to reach the process through a function it can
follow.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import fcntl
import inspect
import os
import shutil
import subprocess
import tempfile
import types
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tandem.core import embedded
from tandem.core.database import Database
from tandem.core.embedded import EmbeddedPostgres
from tandem.core.hotpool import HotPool
from tandem.core.settings import Settings
from tests.support import (
    API_KEY,
    AUTH,
    NO_PROCESSES_ENV,
    REPO,
    Server,
    allow_processes,
    app_settings,
    forbid_processes,
    fresh_database,
    in_process,
    install_process_guard,
    start_server,
)

# Inherited by every process the suite starts: each registers the suite's key at start.
os.environ["TANDEM_API_KEY"] = API_KEY

__all__ = ["in_process"]  # kept importable from here for the modules that still do


# --- the tiers ---------------------------------------------------------------------------------

SLOW, CONTAINER = "slow", "container"
# What starts a process, by object (identity: an alias or a re-export is the same object).
SPAWNERS: dict[object, str] = {}
for _module, _names in (
    (
        subprocess,
        ("Popen", "run", "call", "check_call", "check_output", "getoutput", "getstatusoutput"),
    ),
    (asyncio, ("create_subprocess_exec", "create_subprocess_shell")),
    (
        os,
        (
            "fork",
            "forkpty",
            "system",
            "popen",
            "posix_spawn",
            "posix_spawnp",
            "spawnv",
            "spawnve",
            "spawnl",
            "execv",
            "execve",
            "execvp",
        ),
    ),
    (embedded, ("EmbeddedPostgres", "start_embedded_postgres")),
):
    for _name in _names:
        if hasattr(_module, _name):
            SPAWNERS[getattr(_module, _name)] = SLOW
# Everything defined in these modules runs containers.
CONTAINER_MODULES = ("tests.deploy.containers",)
# Fixtures not read: the session's one shared server (see the module's docstring).
SHARED_FIXTURES = frozenset({"embedded_postgres"})
# Where the code the reading follows lives (the suite's and the benches' own helpers).
FOLLOWED = (str(REPO / "tests"), str(REPO / "bench"))


def _defined_here(obj: object) -> bool:
    try:
        path = inspect.getsourcefile(obj)  # type: ignore[arg-type]
    except TypeError:
        return False
    return path is not None and path.startswith(FOLLOWED)


class _Reader:
    """What each function or class reaches: a set of markers, memoised."""

    def __init__(self) -> None:
        self._seen: dict[int, set[str]] = {}

    def of_object(self, obj: object) -> set[str]:
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        obj = inspect.unwrap(obj) if callable(obj) else obj  # type: ignore[arg-type]
        try:
            if obj in SPAWNERS:
                return {SPAWNERS[obj]}
        except TypeError:  # unhashable
            return set()
        module = getattr(obj, "__module__", None) or ""
        if module.startswith(CONTAINER_MODULES):
            return {CONTAINER, SLOW}
        if isinstance(obj, types.FunctionType) and _defined_here(obj):
            return self.of_function(obj)
        if isinstance(obj, type) and _defined_here(obj):
            return self.of_class(obj)
        return set()

    def of_class(self, cls: type) -> set[str]:
        key = id(cls)
        if key in self._seen:
            return self._seen[key]
        found = self._seen[key] = set()
        for member in vars(cls).values():
            if isinstance(member, staticmethod | classmethod):
                member = member.__func__
            if isinstance(member, property):
                members = [member.fget, member.fset, member.fdel]
            else:
                members = [member]
            for function in members:
                if isinstance(function, types.FunctionType):
                    found |= self.of_function(function)
        return found

    def of_function(self, function: Callable[..., Any]) -> set[str]:
        function = inspect.unwrap(function)
        key = id(function)
        if key in self._seen:
            return self._seen[key]
        found = self._seen[key] = set()
        code = getattr(function, "__code__", None)
        if code is None:
            return found
        names = _names(code)
        scope = getattr(function, "__globals__", {})
        for name in names:
            if name not in scope or hasattr(builtins, name):
                continue
            obj = scope[name]
            if isinstance(obj, types.ModuleType):
                for attribute in names:
                    found |= self.of_object(getattr(obj, attribute, None))
            else:
                found |= self.of_object(obj)
        for cell in getattr(function, "__closure__", None) or ():
            with contextlib.suppress(ValueError):  # an empty cell
                found |= self.of_object(cell.cell_contents)
        return found


def _names(code: types.CodeType) -> set[str]:
    """The global and attribute names a code object and the code nested in it use."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _names(const)
    return names


def tier_markers(item: pytest.Function, reader: _Reader) -> set[str]:
    """The markers the test's own code and its fixtures' code call for."""
    found = reader.of_function(item.obj)
    definitions = item._fixtureinfo.name2fixturedefs
    for name in item.fixturenames:
        if name in SHARED_FIXTURES or name not in definitions:
            continue
        found |= reader.of_function(definitions[name][-1].func)
    return found


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reader = _Reader()
    distributed = config.pluginmanager.hasplugin("xdist")
    for item in items:
        if not isinstance(item, pytest.Function):
            continue
        markers = tier_markers(item, reader)
        for marker in sorted(markers):
            item.add_marker(marker)
        if distributed:
            # Under `pytest -n N --dist loadgroup`: a module's tests stay on one worker (its
            # module-scoped database and servers are made once), and every container test on
            # the same one, one at a time (they build and share podman's images).
            group = "containers" if CONTAINER in markers else item.nodeid.split("::")[0]
            item.add_marker(pytest.mark.xdist_group(group))


if os.environ.get(NO_PROCESSES_ENV) == "1":
    install_process_guard()

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(item: pytest.Item) -> Iterator[object]:
        with forbid_processes(item.nodeid):
            return (yield)


# --- PostgreSQL --------------------------------------------------------------------------------


@contextlib.contextmanager
def _machine_lock(name: str) -> Iterator[None]:
    """An exclusive lock held by one process of this machine at a time (flock on a file in the
    temporary folder; released when the holder exits, however it exits)."""
    with (Path(tempfile.gettempdir()) / f"{name}.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


@pytest.fixture(scope="session")
def embedded_postgres() -> Iterator[EmbeddedPostgres | None]:
    """The embedded throwaway server, unless TANDEM_TEST_DATABASE_URL names one (then None).
    One per session (with pytest-xdist, one per worker: each worker is a session)."""
    if os.environ.get("TANDEM_TEST_DATABASE_URL"):
        yield None
        return
    folder = Path(tempfile.mkdtemp(prefix="tandem-pg-"))
    # Started one at a time across the xdist workers of a machine: as root, pgserver creates
    # its system user when it is missing, and two workers doing that at once fail (useradd).
    with _machine_lock("tandem-embedded-start"), allow_processes():
        server = EmbeddedPostgres(folder, cleanup=None)
    try:
        yield server
    finally:
        with allow_processes():
            server.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="session")
def postgres_url(embedded_postgres: EmbeddedPostgres | None) -> str:
    """The server the suite uses: TANDEM_TEST_DATABASE_URL, or the embedded one."""
    if embedded_postgres is None:
        return os.environ["TANDEM_TEST_DATABASE_URL"]
    return embedded_postgres.url


@pytest.fixture(scope="module")
def database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database shared by one test module."""
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture
def own_database_url(postgres_url: str) -> Iterator[str]:
    """A fresh, migrated database of the test's own."""
    with fresh_database(postgres_url) as url:
        yield url


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


# --- Tandem ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(database_url: str, log_dir: Path) -> Iterator[Server]:
    """A real `tandem serve` process."""
    srv = start_server(database_url, log_dir)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
async def transport(database_url: str) -> AsyncIterator[httpx.ASGITransport]:
    async with in_process(app_settings(database_url)) as started:
        yield started


@pytest.fixture(scope="module")
async def client(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    """The in-process app with the suite's key: the fast layer for API tests, against the
    real database."""
    async with httpx.AsyncClient(
        transport=transport, base_url="http://tandem.test", headers=AUTH
    ) as c:
        yield c


@pytest.fixture
async def database(database_url: str) -> AsyncIterator[Database]:
    """The service's Database object, opened on the module's database."""
    db = Database(Settings(database_url=database_url))
    await db.open()
    yield db
    await db.close()


@pytest.fixture
def pool(database: Database) -> HotPool:
    """The hot-path pool the service uses, on the module's database."""
    return database.hot
