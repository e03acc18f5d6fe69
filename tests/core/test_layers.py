"""The package's layering, read from the source: core and observability import no domain,
core does not import observability (observability builds on core, never the reverse), the
wallet's lean path does not import the FastAPI routes, and no test module imports another."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tandem"
DOMAINS = ("access", "wallet", "scheduler", "status", "maintenance", "loadtest", "main", "cli")


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, at any depth (a function's lazy import too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return found


def tandem_imports(package: str) -> dict[str, set[str]]:
    return {
        str(path.relative_to(PACKAGE.parent)): {
            name for name in imports_of(path) if name.startswith("tandem.")
        }
        for path in sorted((PACKAGE / package).rglob("*.py"))
    }


@pytest.mark.parametrize("package", ["core", "observability"])
def test_core_and_observability_import_no_domain(package: str) -> None:
    """Neither imports a domain package (nor the app or the command line)."""
    wrong = {
        module: sorted(n for n in names if n.split(".")[1] in DOMAINS)
        for module, names in tandem_imports(package).items()
    }
    assert {module: names for module, names in wrong.items() if names} == {}


def test_core_does_not_import_observability() -> None:
    """One direction only: observability (metrics, health) builds on core."""
    wrong = {
        module: sorted(n for n in names if n.startswith("tandem.observability"))
        for module, names in tandem_imports("core").items()
    }
    assert {module: names for module, names in wrong.items() if names} == {}


def test_the_lean_path_does_not_import_the_fastapi_routes() -> None:
    """fastpath.py serves the hot routes from hotroutes.py, never from endpoints.py."""
    names = imports_of(PACKAGE / "wallet" / "fastpath.py")
    assert not any(name.startswith("tandem.wallet.endpoints") for name in names)
    assert "tandem.wallet.hotroutes" in names


def test_no_test_module_imports_another() -> None:
    """Helpers shared by tests live in tests/support/ or a helper module beside them, never in
    a test module (importing one runs its fixtures' module and hides where a helper lives);
    bench/ imports no test module either."""
    root = PACKAGE.parent
    wrong = {
        str(path.relative_to(root)): sorted(
            name
            for name in imports_of(path)
            if name.startswith("tests.") and name.split(".")[-1].startswith("test_")
        )
        for folder in ("tests", "bench")
        for path in sorted((root / folder).rglob("*.py"))
    }
    assert {module: names for module, names in wrong.items() if names} == {}
