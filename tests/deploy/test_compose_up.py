"""deploy/compose.yaml itself, brought up by a compose tool against podman: Debian's
docker-compose 1.29 over podman's Docker-compatible API (``podman system service``), with the
app image built from the shipped Dockerfile and the stand-ins of tests/deploy/images in place
of the public images (named by the compose file's own TANDEM_*_IMAGE variables).

What differs from a user's ``docker compose up``, each for a reason of this machine:
- podman starts health checks from systemd timers, and these machines have no systemd: the
  test runs ``podman healthcheck run`` on the project's containers every second instead, which
  is what the timers would do (compose waits on the results, as with Docker).
- An override file (written here) swaps two things: servers.conf for one without ``resolve``
  (Debian's nginx is 1.22; ``resolve`` needs 1.27.3), and the open-file and process limits,
  lowered to this machine's (runc cannot raise a container's above them).
- Only the services the checks need are started (named on ``up``, so the file needs no profile):
  Grafana has no Debian package, and the Prometheus and Alertmanager stand-ins are not built
  yet.
- The PgBouncer stand-in writes its settings under /tmp: podman's tmpfs on /etc/pgbouncer
  belongs to root, Docker's is writable by everyone (tests/deploy/images/pgbouncer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import resource
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import yaml

from tandem.loadtest import withdraw_burst
from tests.deploy.containers import CONTAINERS_CONF, address_on, app_image, debian_image, podman
from tests.deploy.edge import balance_updates
from tests.support import API_KEY, AUTH, REPO, free_port, require_tool, wait_for

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

COMPOSE = REPO / "deploy" / "compose.yaml"
# The stand-ins, by the variable that names each service's image.
STAND_INS = {
    "TANDEM_POSTGRES_IMAGE": "postgres",
    "TANDEM_PGBOUNCER_IMAGE": "pgbouncer",
    "TANDEM_NGINX_IMAGE": "nginx",
}
SERVICES = ("postgres", "migrate", "pgbouncer", "app", "nginx")


@dataclass
class Stack:
    project: str
    url: str
    command: list[str]
    env: dict[str, str]

    def compose(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run(
            [*self.command, *args],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"docker-compose {' '.join(args)}:\n{done.stdout}{done.stderr}")
        return done.stdout + done.stderr

    def containers(self, service: str) -> list[str]:
        names = podman(
            "ps",
            "--filter",
            f"label=com.docker.compose.project={self.project}",
            "--filter",
            f"label=com.docker.compose.service={service}",
            "--format",
            "{{.Names}}",
        ).split()
        return sorted(names)

    @property
    def network(self) -> str:
        """The project's network, as compose names it."""
        return f"{self.project}_default"


def _override(path: Path, servers_conf: Path) -> Path:
    """servers.conf without ``resolve`` for nginx 1.22, and the open-file limits within this
    machine's hard limit."""
    nofile = min(65536, resource.getrlimit(resource.RLIMIT_NOFILE)[1])
    # podman adds a process limit of its own to explicit ulimits, which runc cannot set here:
    # the machine's, stated (no higher than its pid_max, which is all runc accepts here).
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    nproc = min(resource.getrlimit(resource.RLIMIT_NPROC)[1], pid_max)
    limits = {
        "ulimits": {
            "nofile": {"soft": nofile, "hard": nofile},
            "nproc": {"soft": nproc, "hard": nproc},
        }
    }
    spec = {
        "services": {
            "pgbouncer": limits,
            "app": limits,
            "nginx": {**limits, "volumes": [f"{servers_conf}:/etc/nginx/servers.conf:ro"]},
        }
    }
    path.write_text(yaml.safe_dump(spec))
    return path


@contextlib.contextmanager
def _podman_service(socket: Path) -> Iterator[None]:
    """podman's Docker-compatible API on a socket of the test's own."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    process = subprocess.Popen(
        [require_tool("podman"), "system", "service", "--time", "0", f"unix://{socket}"],
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard)),
    )
    try:
        wait_for(socket.exists, 30, step=0.2)
        yield
    finally:
        process.terminate()
        process.wait(30)


@contextlib.contextmanager
def _health_checks(project: str) -> Iterator[None]:
    """What podman's systemd timers do: each container's health check, every second."""
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(1):
            found = podman(
                "ps", "--filter", f"label=com.docker.compose.project={project}", "-q", check=False
            )
            for container in found.split():
                podman("healthcheck", "run", container, check=False, timeout=30)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(60)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compose")
    images = {variable: debian_image(name) for variable, name in STAND_INS.items()}
    app = app_image()  # localhost/tandem:test, which compose names tandem:${TANDEM_IMAGE_TAG}
    servers = work / "servers.conf"
    servers.write_text("server app:8000 max_fails=3 fail_timeout=10s;\n")
    override = _override(work / "override.yaml", servers)
    project, port, socket = f"tandem{uuid.uuid4().hex[:6]}", free_port(), work / "podman.sock"
    env = {
        **os.environ,
        **images,
        "DOCKER_HOST": f"unix://{socket}",
        "TANDEM_IMAGE_TAG": app.rsplit(":", 1)[1],
        "TANDEM_PORT": str(port),
        "POSTGRES_PASSWORD": uuid.uuid4().hex,
        "TANDEM_DB_APP_PASSWORD": uuid.uuid4().hex,
        "TANDEM_API_KEY": API_KEY,
        "GRAFANA_ADMIN_PASSWORD": uuid.uuid4().hex,
        "ALERTMANAGER_WEBHOOK_URL": "http://127.0.0.1:9/unused",
    }
    command = [
        require_tool("docker-compose"),
        "--project-name",
        project,
        "--file",
        str(COMPOSE),
        "--file",
        str(override),
    ]
    stack = Stack(project, f"http://127.0.0.1:{port}", command, env)
    with _podman_service(socket), _health_checks(project):
        try:
            stack.compose("up", "--detach", "--no-build", *SERVICES)
            yield stack
        finally:
            with contextlib.suppress(Exception):
                print(stack.compose("logs", "--tail", "30", timeout=60))
            stack.compose("down", "--volumes", "--timeout", "10", timeout=300)


def test_burst_through_the_published_port(stack: Stack) -> None:
    """The plan's burst through nginx's published port: exactly 5000 of 10000 withdrawals of 2
    succeed, the balance ends at 0, and every replica served some."""
    replicas = stack.containers("app")
    assert len(replicas) == 5, replicas

    def updates(container: str) -> float:
        return balance_updates(f"http://{address_on(stack.network, container)}:8000")

    before = [updates(c) for c in replicas]
    report = asyncio.run(withdraw_burst(stack.url, requests=10_000, amount=2, api_key=API_KEY))
    after = [updates(c) for c in replicas]
    assert report.problems() == [], (report.outcomes, report.error_samples)
    assert (report.ok, report.refused, report.other) == (5000, 5000, 0)
    balance = httpx.get(f"{stack.url}/balance/{report.user_id}", headers=AUTH, timeout=10)
    assert balance.status_code == 200, balance.text
    assert balance.json()["balance"] == 0
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == 10_000
    assert all(n > 0 for n in served), dict(zip(replicas, served, strict=True))
