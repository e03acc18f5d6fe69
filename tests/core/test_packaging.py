"""What the wheel ships, read from pyproject.toml as setuptools reads it, without building one:
every file of the package an editable install finds in the checkout must also be in the
wheel, or the image fails where the tests passed (as it did when ``access/sql/*.sql`` was
missing from the package data and ``tandem migrate`` could not read
``create_bound_key_v1.sql``)."""

from __future__ import annotations

import tomllib
from pathlib import Path

from setuptools import find_packages

from tandem.functions import DECLARED
from tests.support import REPO

PACKAGE = REPO / "tandem"


def shipped() -> set[Path]:
    """The files the wheel holds: the modules of the packages found as ``[tool.setuptools]``
    finds them, and the package data's globs (setuptools expands each with ``glob`` in the
    package's directory)."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = find_packages(str(REPO), **config["packages"]["find"])
    files = {
        module for package in packages for module in (REPO / package.replace(".", "/")).glob("*.py")
    }
    for package, patterns in config["package-data"].items():
        base = REPO / package.replace(".", "/")
        files |= {path for pattern in patterns for path in base.glob(pattern) if path.is_file()}
    return {path.resolve() for path in files}


def in_the_checkout() -> set[Path]:
    return {
        path.resolve()
        for path in PACKAGE.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc"
    }


def test_every_declared_function_and_migration_file_ships() -> None:
    """The files `tandem migrate` reads: each ServerFunction's and each migration's SQL."""
    needed = {function.file.resolve() for function in DECLARED}
    needed |= {path.resolve() for path in (PACKAGE / "migrations" / "sql").glob("*.sql")}
    assert len(needed) > len(DECLARED), "no migration SQL found: the test looks elsewhere"
    assert all(path.is_file() for path in needed)
    missing = sorted(str(path.relative_to(REPO)) for path in needed - shipped())
    assert not missing, f"not in pyproject.toml's package data: {missing}"


def test_every_file_of_the_package_ships() -> None:
    """Any other file under tandem/ (a template, a new domain's sql/) as well."""
    missing = sorted(str(path.relative_to(REPO)) for path in in_the_checkout() - shipped())
    assert not missing, f"not in pyproject.toml's package data: {missing}"
