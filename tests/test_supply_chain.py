"""The supply chain (docs/deployment.md, Supply chain): the lock files of requirements/ pin every
dependency of pyproject.toml with its hashes, the venv and the image install exactly them with
`--require-hashes`, the update bot's configuration covers every kind of pin the repository
holds, and `make audit` (tools/audit.py) fails on a known vulnerability but only reports a
vulnerability service it cannot reach. Files are read, nothing reaches the network."""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tomllib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name

from tests.support import REPO, free_port

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
REQUIREMENTS = REPO / "requirements"
PIP_LOCK, DEV_LOCK, IMAGE_LOCK = (REQUIREMENTS / f"{n}.txt" for n in ("pip", "dev", "image"))
# A pin as uv writes it: `name==version [; marker] \` then one `--hash=sha256:…` a line.
PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)==(?P<version>\S+?)(?:\s*;\s*(?P<marker>[^\\]+?))?\s*\\?$"
)
HASH = re.compile(r"^--hash=sha256:(?P<digest>[0-9a-f]{64})\s*\\?$")


@dataclass(frozen=True)
class Pin:
    version: str
    hashes: frozenset[str]


@cache
def pins(lock: Path) -> dict[NormalizedName, Pin]:
    """Every pin of a lock file; any other line (but comments) fails the test: an unpinned
    requirement, a URL, an editable or an option would let pip fetch what the lock does not
    say."""
    found: dict[NormalizedName, Pin] = {}
    name: NormalizedName | None = None
    version, hashes = "", set[str]()
    for raw in lock.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pin, digest = PIN.match(line), HASH.match(line)
        if pin:
            if name is not None:
                found[name] = Pin(version, frozenset(hashes))
            name, version, hashes = canonicalize_name(pin["name"]), pin["version"], set()
            assert name not in found, f"{lock.name}: {name} pinned twice"
        elif digest and name is not None:
            hashes.add(digest["digest"])
        else:
            raise AssertionError(f"{lock.name}: not a pin or a hash: {raw!r}")
    if name is not None:
        found[name] = Pin(version, frozenset(hashes))
    return found


def requirements(extra: str | None = None) -> list[Requirement]:
    """pyproject.toml's requirements: the runtime ones, or an extra's, Tandem's own extras
    (`tandem[embedded]`) expanded."""
    project = PYPROJECT["project"]
    listed = project["dependencies"] if extra is None else project["optional-dependencies"][extra]
    found = []
    for text in listed:
        requirement = Requirement(text)
        if canonicalize_name(requirement.name) == "tandem":
            for inner in sorted(requirement.extras):
                found += requirements(inner)
        else:
            found.append(requirement)
    return found


def assert_pinned(lock: Path, wanted: list[Requirement]) -> None:
    locked = pins(lock)
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in locked, f"{requirement} is not in {lock.name}: run `make lock`"
        version = locked[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"{lock.name} pins {name}=={version}, outside {requirement}: run `make lock`"
        )


def test_every_pin_has_hashes() -> None:
    """Each lock file holds pins alone (`name==version`, no range, URL or editable), each with
    at least one sha256 hash: what `--require-hashes` needs to install it."""
    for lock in (PIP_LOCK, DEV_LOCK, IMAGE_LOCK):
        locked = pins(lock)
        assert locked, lock.name
        unhashed = sorted(name for name, pin in locked.items() if not pin.hashes)
        assert not unhashed, f"{lock.name}: pins without hashes: {unhashed}"


def test_the_dev_lock_pins_every_dependency_of_pyproject() -> None:
    """requirements/dev.txt (the venv, CI) pins every runtime and dev requirement of
    pyproject.toml at a version its specifier allows: a dependency added or raised without
    `make lock` fails here."""
    assert_pinned(DEV_LOCK, [*requirements(), *requirements("dev")])


def test_the_image_lock_is_the_runtime_set_at_the_tested_versions() -> None:
    """requirements/image.txt pins every runtime requirement and the build backend, each at the
    version and with the hashes dev.txt has (the image runs what CI tested), and none of the
    dev extra's own packages (the embedded PostgreSQL, the test tools)."""
    assert_pinned(
        IMAGE_LOCK, [*requirements(), *map(Requirement, PYPROJECT["build-system"]["requires"])]
    )
    image, dev = pins(IMAGE_LOCK), pins(DEV_LOCK)
    differing = sorted(name for name, pin in image.items() if dev.get(name) != pin)
    assert not differing, f"image.txt and dev.txt disagree on {differing}: run `make lock`"
    for requirement in requirements("dev"):
        assert canonicalize_name(requirement.name) not in image or requirement.name in (
            "setuptools",
            "pyyaml",  # a dev requirement of its own, and uvicorn[standard]'s
        ), requirement.name


def test_the_pip_lock_pins_the_installer() -> None:
    """requirements/pip.txt pins pip alone: `make setup` upgrades the venv's pip from it."""
    assert set(pins(PIP_LOCK)) == {"pip"}


def recipe(target: str) -> list[str]:
    """The Makefile's command lines for a target (its rule's recipe, variables unexpanded)."""
    lines = (REPO / "Makefile").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{target}:"))
    found = []
    for line in lines[start + 1 :]:
        if not line.startswith("\t"):
            break
        found.append(line.strip())
    return found


def test_make_setup_installs_exactly_the_lock() -> None:
    """`make setup`'s venv: pip from its lock, then the dev lock, both with --require-hashes;
    Tandem itself without dependencies and without an isolated build environment (which pip
    would fill from the index unchecked)."""
    commands = recipe("$(STAMP)")
    installs = [c for c in commands if " install " in c]
    assert installs[0].endswith("--require-hashes -r $(PIP_LOCK)"), installs
    assert installs[1].endswith("--require-hashes -r $(DEV_LOCK)"), installs
    assert installs[2].endswith("--no-deps --no-build-isolation -e ."), installs
    assert len(installs) == 3, installs


def test_the_image_installs_exactly_its_lock() -> None:
    """The Dockerfile installs requirements/image.txt with --require-hashes (wheels only), then
    Tandem without dependencies and without an isolated build; .dockerignore lets the lock in."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    runs = [line.strip() for line in text.splitlines() if line.strip().startswith("RUN ")]
    installs = [part.strip() for run in runs for part in run.split("&&") if " install " in part]
    assert len(installs) == 2, installs
    first, second = (shlex.split(command) for command in installs)
    assert {"--require-hashes", "--only-binary=:all:"} <= set(first), first
    assert first[-2:] == ["-r", "requirements/image.txt"], first
    assert {"--no-deps", "--no-build-isolation"} <= set(second), second
    assert "!requirements/image.txt" in (REPO / ".dockerignore").read_text().splitlines()


def test_each_lock_header_is_the_command_make_lock_runs() -> None:
    """Each lock file's header is the `uv pip compile` command of `make lock` that wrote it, its
    options with `=` (the update bot reads the command back from there to regenerate it)."""
    commands = [c.replace("$(UV_COMPILE)", "").strip() for c in recipe("lock")]
    variables = {"PIP_LOCK": PIP_LOCK, "DEV_LOCK": DEV_LOCK, "IMAGE_LOCK": IMAGE_LOCK}
    for name, path in variables.items():
        commands = [c.replace(f"$({name})", str(path.relative_to(REPO))) for c in commands]
    for lock in (PIP_LOCK, DEV_LOCK, IMAGE_LOCK):
        header = lock.read_text().splitlines()[1].lstrip("# ").strip()
        assert header.startswith("uv pip compile --generate-hashes --universal "), header
        arguments = header.removeprefix("uv pip compile --generate-hashes --universal ")
        assert arguments in commands, (lock.name, arguments, commands)
        for option in shlex.split(arguments):
            assert not option.startswith("--") or "=" in option, (lock.name, option)


RENOVATE = REPO / ".github" / "renovate.json"


def repository_files(pattern: str) -> list[str]:
    """The repository's files matching a glob pattern (on the name, or on the path from the
    root when it has a slash), outside tests/, hidden folders but .github/, and caches."""
    found = []
    for folder, folders, files in os.walk(REPO):
        folders[:] = [
            d
            for d in folders
            if (not d.startswith(".") or d == ".github") and d not in ("tests", "__pycache__")
        ]
        for name in files:
            path = (Path(folder) / name).relative_to(REPO).as_posix()
            if fnmatch.fnmatch(path if "/" in pattern else name, pattern):
                found.append(path)
    return sorted(found)


def file_patterns(config: dict[str, Any], manager: str) -> list[re.Pattern[str]]:
    """A manager's `managerFilePatterns` (`/regex/` form) as Python patterns."""
    found = config[manager]["managerFilePatterns"]
    assert all(p.startswith("/") and p.endswith("/") for p in found), found
    return [re.compile(p[1:-1]) for p in found]


def test_the_update_bot_covers_every_kind_of_pin() -> None:
    """.github/renovate.json parses, pins image digests (`pinDigests`), and each file of the
    repository that pins something (Dockerfiles, the compose file, pyproject.toml, the lock
    files) is matched by the manager for it; the repository has no other kind (no GitHub
    workflow)."""
    config = json.loads(RENOVATE.read_text())
    assert config["pinDigests"] is True
    kinds = {
        "dockerfile": repository_files("*Dockerfile"),
        "docker-compose": repository_files("*compose*.y*ml"),
        "pep621": repository_files("*pyproject.toml"),
        "pip-compile": repository_files("requirements/*.txt"),
    }
    for manager, files in kinds.items():
        assert files, manager
        patterns = file_patterns(config, manager)
        unmatched = [f for f in files if not any(p.search(f) for p in patterns)]
        assert not unmatched, (manager, unmatched)
    assert not repository_files(".github/workflows/*"), "workflows need the github-actions manager"


@cache
def audit_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tandem_audit", REPO / "tools" / "audit.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_known_vulnerability_fails_the_audit() -> None:
    """A pin with a vulnerability in pip-audit's report: status 1, and a line naming the pin,
    the advisory and its fixed version."""
    report = {
        "dependencies": [
            {
                "name": "jinja2",
                "version": "3.1.2",
                "vulns": [{"id": "GHSA-h5c8-rqwp-cp95", "fix_versions": ["3.1.3"]}],
            },
            {"name": "rich", "version": "15.0.0", "vulns": []},
        ]
    }
    status, lines = audit_module().judge("requirements/image.txt", report, 1, "")
    assert status == 1
    assert any("VULNERABLE: jinja2 3.1.2" in line and "3.1.3" in line for line in lines), lines


def test_an_unreachable_service_is_reported_not_failed() -> None:
    """No report and a connection error (pip-audit's traceback), or a report whose every pin
    the service had no record of: status 0 and a NOT AUDITED line, never a clean result."""
    judge = audit_module().judge
    status, lines = judge(
        "x.txt", None, 1, "requests.exceptions.ConnectionError: Max retries exceeded"
    )
    assert status == 0
    assert lines[0].startswith("audit: NOT AUDITED: x.txt"), lines
    skipped = {"dependencies": [{"name": "pip", "skip_reason": "Dependency not found on PyPI"}]}
    status, lines = judge("x.txt", skipped, 0, "")
    assert status == 0
    assert [line for line in lines if "NOT AUDITED" in line], lines
    assert not [line for line in lines if "no known vulnerability" in line], lines


def test_a_failure_of_pip_audit_itself_fails_the_audit() -> None:
    """pip-audit failing for a reason other than the network (a lock it cannot read): the
    audit fails with pip-audit's words."""
    status, lines = audit_module().judge("x.txt", None, 1, "pip-audit: error: invalid requirement")
    assert status == 1
    assert "invalid requirement" in lines[-1]


def test_make_audit_without_a_reachable_service_passes_with_a_report() -> None:
    """The real pip-audit on a real lock, its requests sent to a proxy that refuses them (no
    network reached): tools/audit.py exits 0 and prints the NOT AUDITED line."""
    closed = f"http://127.0.0.1:{free_port()}"
    environment = {**os.environ, "HTTPS_PROXY": closed, "HTTP_PROXY": closed, "NO_PROXY": ""}
    environment.pop("no_proxy", None)
    done = subprocess.run(
        [sys.executable, str(REPO / "tools" / "audit.py"), str(PIP_LOCK)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**environment, "https_proxy": closed, "http_proxy": closed},
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "audit: NOT AUDITED:" in done.stdout, done.stdout
    assert "could not be reached" in done.stdout, done.stdout


@pytest.mark.parametrize("lock", [PIP_LOCK, DEV_LOCK, IMAGE_LOCK], ids=lambda p: p.name)
def test_the_audit_reads_every_lock(lock: Path) -> None:
    """`make audit` names every lock file of requirements/."""
    (command,) = recipe("audit")
    names = {"$(PIP_LOCK)": PIP_LOCK, "$(DEV_LOCK)": DEV_LOCK, "$(IMAGE_LOCK)": IMAGE_LOCK}
    assert any(variable in command.split() for variable, path in names.items() if path == lock)
    assert sorted(REQUIREMENTS.glob("*.txt")) == sorted(names.values())
