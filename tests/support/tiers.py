"""Which tier a test belongs to, read from its code: see tests/conftest.py, which applies it.

A test is ``slow`` when its code, or the code of a fixture in its closure, reaches something
that starts a process: the reading follows every global name a function uses (a function or
class of tests/ or bench/, or an attribute of a module it names) down to

- ``subprocess`` (Popen, run, ...), ``asyncio.create_subprocess_*``, ``os.fork``/``system``/
  ``spawn*``/``exec*``, and Tandem's embedded PostgreSQL (pgserver): ``slow``;
- anything defined in ``tests.deploy.containers`` (podman): ``container`` (and ``slow``).

The one fixture not read is the session's shared PostgreSQL (``embedded_postgres``): every
test uses it, and it starts once. What the reading cannot follow (a method of a fixture's
value, a name built at run time) the fast tier's guard catches: see ``processes``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import inspect
import os
import subprocess
import types
from collections.abc import Callable
from typing import Any

import pytest

from tandem.core import embedded
from tests.support.processes import REPO

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
        path = inspect.getsourcefile(obj)  # type: ignore[arg-type]  # TypeError says no
    except TypeError:
        return False
    return path is not None and path.startswith(FOLLOWED)


class Reader:
    """What each function or class reaches: a set of markers, memoised."""

    def __init__(self) -> None:
        self._seen: dict[int, set[str]] = {}

    def of_object(self, obj: object) -> set[str]:
        if isinstance(obj, types.MethodType):
            obj = obj.__func__
        if callable(obj):
            obj = inspect.unwrap(obj)
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


def tier_markers(item: pytest.Function, reader: Reader) -> set[str]:
    """The markers the test's own code and its fixtures' code call for."""
    found = reader.of_function(item.obj)
    definitions = item._fixtureinfo.name2fixturedefs
    for name in item.fixturenames:
        if name in SHARED_FIXTURES or name not in definitions:
            continue
        found |= reader.of_function(definitions[name][-1].func)
    return found
