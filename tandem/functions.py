"""Every server-side function Tandem declares: the ``ServerFunction`` values of every domain's
``functions`` module (``tandem/<domain>/functions.py``, found by walking the packages, so a new
domain's cannot be left out). What ``tandem migrate`` grants the application's role EXECUTE on
by name (those declared ``app_role``), and what the schema test holds to the files."""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path

import tandem
from tandem.core.functions import ServerFunction

MODULES = tuple(
    importlib.import_module(f"tandem.{package.name}.functions")
    for package in pkgutil.iter_modules(tandem.__path__)
    if package.ispkg and (Path(tandem.__path__[0]) / package.name / "functions.py").is_file()
)

# Once each (a module may import another's declaration).
DECLARED: tuple[ServerFunction, ...] = tuple(
    dict.fromkeys(
        value
        for module in MODULES
        for value in vars(module).values()
        if isinstance(value, ServerFunction)
    )
)
