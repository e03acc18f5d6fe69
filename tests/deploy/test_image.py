"""What the image installs, checked without Docker: the Dockerfile's build stage replayed in
scratch folders (a stub package for the dependency layer in one, then the copied sources in
another, each built with `pip`), then the wheel it makes: every source file in it as it is in
the repository, and it serves on its own without the embedded-PostgreSQL extra (the image
leaves it out)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, free_port, http_get

pytestmark = pytest.mark.slow

# What the Dockerfile copies into its build stage (and .dockerignore lets through).
COPIED = ("pyproject.toml", "README.md")


def build_wheel(source: Path, out: Path) -> Path:
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("tandem-*.whl")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The build stage, as the Dockerfile runs it: the stub in /stub, the sources in /src."""
    root = tmp_path_factory.mktemp("image")
    stub = root / "stub"
    stub.mkdir()
    for name in COPIED:
        shutil.copy2(REPO / name, stub / name)
    (stub / "tandem").mkdir()
    (stub / "tandem" / "__init__.py").touch()
    build_wheel(stub, root / "stub-wheel")
    src = root / "src"
    src.mkdir()
    for name in COPIED:
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "tandem", src / "tandem", ignore=shutil.ignore_patterns("__pycache__"))
    return build_wheel(src, root / "wheel")


def test_wheel_holds_the_sources_as_they_are(wheel: Path) -> None:
    """Every file under tandem/ is in the wheel byte for byte: no stale copy from the stub
    build (an empty __init__.py once made the image's app crash on start)."""
    with zipfile.ZipFile(wheel) as archive:
        for path in (REPO / "tandem").rglob("*"):
            if path.is_file() and "__pycache__" not in path.parts:
                name = str(path.relative_to(REPO))
                assert archive.read(name) == path.read_bytes(), name


def test_installed_wheel_serves(wheel: Path, database_url: str, tmp_path: Path) -> None:
    """The wheel, unpacked alone (not this checkout), migrates and serves: /health/ready says
    the schema is at head, and the status page renders."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    # The image has no pgserver: make importing it fail, as it would there.
    blocker = tmp_path / "no-embedded" / "pgserver"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text("raise ImportError('not in the image')\n")
    env = {
        **os.environ,
        "PYTHONPATH": f"{blocker.parent}{os.pathsep}{target}",
        "TANDEM_DATABASE_URL": database_url,
        "TANDEM_SCHEDULER_ENABLED": "false",
        "TANDEM_LOG_LEVEL": "warning",
    }
    where = subprocess.run(
        [sys.executable, "-c", "import tandem; print(tandem.__file__)"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    assert Path(where.stdout.strip()).is_relative_to(target)
    subprocess.run([sys.executable, "-m", "tandem", "migrate"], env=env, cwd=tmp_path, check=True)
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "tandem", "serve", "--port", str(port), "--no-migrate"],
        env=env,
        cwd=tmp_path,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 30
        while True:
            try:
                ready = http_get(f"{base}/health/ready", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "not serving in 30 s"
                assert process.poll() is None, "exited"
                time.sleep(0.2)
        assert ready.status_code == 200, ready.text
        assert ready.json()["schema_revision"] == ready.json()["expected_revision"]
        page = http_get(f"{base}/", timeout=5)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
    finally:
        process.terminate()
        process.wait(15)
