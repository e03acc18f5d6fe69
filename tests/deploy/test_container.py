"""The image's own promises, on the real image running under podman (tests/deploy/containers.py
builds it from the shipped Dockerfile): it holds the repository's package, serves as a
non-root user on a read-only root file system, its HEALTHCHECK turns healthy, `podman stop`
drains its scheduler runs to another replica and exits 0, and a `podman kill` is recovered by
the other replicas."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.deploy.containers import app_image, containers, inspect, podman
from tests.faults.postgres import throwaway_postgres
from tests.scheduler.cluster import (
    DRAINED,
    assert_history_consistent,
    database_now,
    probe_overlaps,
)
from tests.scheduler.registries import PROBE_TABLE
from tests.support import (
    API_KEY,
    CRON_TIMINGS,
    REPO,
    free_port,
    http_get,
    query,
    require_tool,
    wait_for,
)

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def image() -> str:
    return app_image()


@pytest.fixture(scope="module")
def database(image: str) -> Iterator[str]:
    """A PostgreSQL on 127.0.0.1, migrated by the image's own `tandem migrate`."""
    with throwaway_postgres() as postgres:
        podman(
            "run",
            "--rm",
            "--network",
            "host",
            "--env",
            f"TANDEM_DATABASE_URL={postgres.url}",
            image,
            "migrate",
        )
        query(postgres.url, PROBE_TABLE)
        yield postgres.url


def _env(database: str, port: int, **extra: str) -> list[str]:
    settings = {
        "TANDEM_DATABASE_URL": database,
        "TANDEM_PORT": str(port),
        "TANDEM_API_KEY": API_KEY,
        **extra,
    }
    return [option for name, value in settings.items() for option in ("--env", f"{name}={value}")]


def test_the_image_holds_the_package_as_the_repository_has_it(image: str, tmp_path: Path) -> None:
    """Every file under tandem/ is in the image's virtualenv byte for byte, and the embedded
    PostgreSQL extra is not there (the image is always given a database)."""
    container = podman("create", image).strip()
    try:
        podman("cp", f"{container}:/opt/tandem/lib", str(tmp_path / "lib"))
    finally:
        podman("rm", container)
    (site,) = (tmp_path / "lib").glob("python3*/site-packages")
    for path in (REPO / "tandem").rglob("*"):
        if path.is_file() and "__pycache__" not in path.parts:
            installed = site / path.relative_to(REPO)
            assert installed.read_bytes() == path.read_bytes(), path
    assert not (site / "pgserver").exists()


def test_it_serves_as_non_root_on_a_read_only_root_and_turns_healthy(
    image: str, database: str
) -> None:
    port = free_port()
    with containers() as started:
        name = started.serve(
            image,
            port,
            options=["--read-only", *_env(database, port, TANDEM_SCHEDULER_ENABLED="false")],
        )
        base = f"http://127.0.0.1:{port}"
        assert http_get(f"{base}/health/ready").status_code == 200
        assert http_get(f"{base}/balance/1").status_code == 200
        assert podman("exec", name, "id", "-u").strip() == "10001"
        assert "Read-only file system" in _refused(name, "touch", "/opt/tandem/written")
        check = inspect(name)["Config"]["Healthcheck"]["Test"]
        # The port the server was given (this one is not 8000): the check asks TANDEM_PORT.
        assert check[0] == "CMD", check
        assert "TANDEM_PORT" in check[-1], check
        podman("healthcheck", "run", name)  # exits non-zero unless healthy
        state = inspect(name)["State"]
        assert (state.get("Health") or state.get("Healthcheck"))["Status"] == "healthy"


def _refused(container: str, *command: str) -> str:
    """What a command that must fail in the container says."""
    done = subprocess.run(
        [require_tool("podman"), "exec", container, *command], capture_output=True, text=True
    )
    assert done.returncode != 0, done.stdout
    return done.stderr


def _running_on(database: str) -> str | None:
    rows = query(database, "SELECT running_instance FROM tasks WHERE name = 'Long' AND is_running")
    return str(rows[0]["running_instance"]) if rows else None


def _hostname_of(database: str, instance: str) -> str:
    rows = query(database, "SELECT hostname FROM instances WHERE id = $1", instance)
    return str(rows[0]["hostname"])


def test_stop_drains_to_another_replica_and_kill_is_recovered(image: str, database: str) -> None:
    """Three replicas of one never-ending task (the cron tests' registry, mounted read-only):
    `podman stop` of its owner (SIGTERM to PID 1) exits 0 well within the stop grace and the
    run is released at once, running on another replica within a poll; `podman kill` of the
    next owner is noticed by the database at once and the run goes on elsewhere, started after
    the kill; the probe rows the bodies write never overlap."""
    scheduler = {
        **CRON_TIMINGS,
        "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:long",
        "PYTHONPATH": "/repo",
    }
    with containers() as started:
        container_of = {}
        for replica in range(3):
            hostname, port = f"replica-{replica}", free_port()
            container_of[hostname] = started.serve(
                image,
                port,
                options=[
                    "--read-only",
                    "--hostname",
                    hostname,
                    "--volume",
                    f"{REPO / 'tests'}:/repo/tests:ro",
                    *_env(database, port, **scheduler),
                ],
            )
        wait_for(lambda: _running_on(database) is not None, 60)
        first = _running_on(database)
        assert first is not None
        owner = container_of[_hostname_of(database, first)]
        stopping = time.monotonic()
        podman("stop", "--time", "30", owner, timeout=60)
        stopped_in = time.monotonic() - stopping
        assert inspect(owner)["State"]["ExitCode"] == 0
        assert stopped_in < 10, stopped_in  # the drain (5 s at most), far from the grace
        wait_for(lambda: _running_on(database) not in (None, first), 5)
        second = _running_on(database)
        assert second is not None
        killed = container_of[_hostname_of(database, second)]
        # The killed body writes no end row: it ends at the kill. Dated just before it (an
        # overlap is then one with a successor started before the kill, never a late update).
        killed_at = database_now(database)
        podman("kill", killed)
        query(
            database,
            "UPDATE probe SET finished = $2 WHERE instance = $1 AND finished IS NULL",
            second,
            killed_at,
        )
        wait_for(lambda: _running_on(database) not in (None, first, second), 5)
        statuses = query(
            database,
            "SELECT h.status, h.error, h.instance_id, h.attempt FROM task_history h "
            "ORDER BY h.fence",
        )
    by_instance = {r["instance_id"]: r for r in statuses}
    assert by_instance[first]["status"] == "cancelled"
    assert by_instance[first]["error"] in DRAINED  # see test_graceful_stop_releases_run
    assert by_instance[second]["status"] == "lost"
    assert "session ended" in by_instance[second]["error"]
    assert [r["attempt"] for r in statuses][:3] == [1, 2, 3]
    assert probe_overlaps(database) == 0
    assert_history_consistent(database)
