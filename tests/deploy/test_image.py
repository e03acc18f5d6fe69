"""What the image installs, checked without Docker: the wheel the Dockerfile's `pip install .`
builds carries everything the service needs at run time (migrations, templates), and runs
without the embedded-PostgreSQL extra (the image leaves it out)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.support import REPO, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
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
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (built,) = out.glob("tandem-*.whl")
    return built


def test_wheel_carries_run_time_files(wheel: Path) -> None:
    """Every migration and every non-Python file under tandem/ is in the wheel."""
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = {
        str(path.relative_to(REPO))
        for path in (REPO / "tandem").rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    assert wanted - names == set()


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
                ready = httpx.get(f"{base}/health/ready", timeout=2)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "not serving in 30 s"
                assert process.poll() is None, "exited"
                time.sleep(0.2)
        assert ready.status_code == 200, ready.text
        assert ready.json()["schema_revision"] == ready.json()["expected_revision"]
        page = httpx.get(f"{base}/", timeout=5)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
    finally:
        process.terminate()
        process.wait(15)
