"""deploy/compose.yaml itself, brought up by a compose tool against podman: Debian's
docker-compose 1.29 over podman's Docker-compatible API (``podman system service``), with the
app image built from the shipped Dockerfile and the stand-ins of tests/deploy/images in place
of the public images (named by the compose file's own TANDEM_*_IMAGE variables).

What differs from a user's ``docker compose up``, each for a reason of this machine:
- podman starts health checks from systemd timers, and these machines have no systemd: the
  test runs ``podman healthcheck run`` on the project's containers every second instead, which
  is what the timers would do (compose waits on the results, as with Docker).
- An override file (written here) swaps three things: servers.conf for one without ``resolve``
  (Debian's nginx is 1.22; ``resolve`` needs 1.27.3); plain.conf for one serving Tandem, so
  the bursts go over plain HTTP (the load client speaks no TLS; tests/deploy/edge.SERVE_PLAIN:
  the redirect itself is test_nginx.py's); and the open-file and process limits, lowered to
  this machine's (runc cannot raise a container's above them).
- Every service but Grafana is started (named on ``up``, so the file needs no profile):
  Grafana has no Debian package (its provisioning and dashboards: test_grafana.py).
- The host ports are free ones (TANDEM_PORT, TANDEM_HTTPS_PORT, TANDEM_PROMETHEUS_PORT,
  TANDEM_ALERTMANAGER_PORT), not the defaults another program here may hold.
- The PgBouncer stand-in writes its settings under /tmp: podman's tmpfs on /etc/pgbouncer
  belongs to root, Docker's is writable by everyone (tests/deploy/images/pgbouncer).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import resource
import ssl
import subprocess
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tandem.loadtest import LoadtestError, withdraw_burst
from tandem.scheduler.demo_tasks import SCHEDULE
from tests.deploy.containers import (
    CONTAINERS_CONF,
    HEAVY,
    address_on,
    app_image,
    debian_image,
    inspect,
    podman,
)
from tests.deploy.edge import BURST_HEADER_DEADLINE, SERVE_PLAIN, balance_updates
from tests.support import (
    API_KEY,
    AUTH,
    REPO,
    free_port,
    http_get,
    http_post,
    require_tool,
    wait_for,
    wait_live,
)
from tests.support.processes import machine_lock

pytestmark = pytest.mark.timeout(1200)

COMPOSE = REPO / "deploy" / "compose.yaml"
# The stand-ins, by the variable that names each service's image.
STAND_INS = {
    "TANDEM_POSTGRES_IMAGE": "postgres",
    "TANDEM_PGBOUNCER_IMAGE": "pgbouncer",
    "TANDEM_NGINX_IMAGE": "nginx",
    "TANDEM_PROMETHEUS_IMAGE": "prometheus",
    "TANDEM_ALERTMANAGER_IMAGE": "alertmanager",
}
DEMO_TASKS = {name for name, _ in SCHEDULE}
SERVICES = (
    "postgres",
    "migrate",
    "pgbouncer",
    "app",
    "tls",
    "nginx",
    "prometheus",
    "alertmanager",
)


@dataclass
class Stack:
    project: str
    url: str
    https_url: str
    prometheus: str
    alertmanager: str
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

    def address(self, container: str) -> str:
        """The container's address on the project's network."""
        return address_on(self.network, container)


def _override(path: Path, servers_conf: Path, plain_conf: Path, nginx_conf: Path) -> Path:
    """servers.conf without ``resolve`` for nginx 1.22, plain.conf serving Tandem, nginx.conf
    with the burst's header deadline (``_burst_nginx_conf``), and the open-file limits within
    this machine's hard limit."""
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
            "nginx": {
                **limits,
                "volumes": [
                    f"{servers_conf}:/etc/nginx/servers.conf:ro",
                    f"{plain_conf}:/etc/nginx/plain.conf:ro",
                    f"{nginx_conf}:/etc/nginx/nginx.conf:ro",
                ],
            },
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


def _burst_nginx_conf(work: Path) -> Path:
    """The deployed nginx.conf with the burst's header deadline (BURST_HEADER_DEADLINE),
    everything else as deployed."""
    text = (REPO / "deploy" / "nginx" / "nginx.conf").read_text()
    for old, new in BURST_HEADER_DEADLINE.items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    path = work / "nginx.conf"
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("compose")
    images = {variable: debian_image(name) for variable, name in STAND_INS.items()}
    app = app_image()  # localhost/tandem:test, which compose names tandem:${TANDEM_IMAGE_TAG}
    servers = work / "servers.conf"
    servers.write_text("server app:8000 max_fails=3 fail_timeout=10s;\n")
    (plain := work / "plain.conf").write_text("".join(SERVE_PLAIN.values()) + "\n")
    override = _override(work / "override.yaml", servers, plain, _burst_nginx_conf(work))
    project, socket = f"tandem{uuid.uuid4().hex[:6]}", work / "podman.sock"
    port, https, prometheus, alertmanager = free_port(), free_port(), free_port(), free_port()
    env = {
        **os.environ,
        **images,
        "DOCKER_HOST": f"unix://{socket}",
        "TANDEM_IMAGE_TAG": app.rsplit(":", 1)[1],
        "TANDEM_PORT": str(port),
        "TANDEM_HTTPS_PORT": str(https),
        "TANDEM_PROMETHEUS_PORT": str(prometheus),
        "TANDEM_ALERTMANAGER_PORT": str(alertmanager),
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
    stack = Stack(
        project,
        f"http://127.0.0.1:{port}",
        f"https://127.0.0.1:{https}",
        f"http://127.0.0.1:{prometheus}",
        f"http://127.0.0.1:{alertmanager}",
        command,
        env,
    )
    with _podman_service(socket), _health_checks(project):
        try:
            stack.compose("up", "--detach", "--no-build", *SERVICES)
            yield stack
        finally:
            with contextlib.suppress(Exception):
                print(stack.compose("logs", "--tail", "30", timeout=60))
            stack.compose("down", "--volumes", "--timeout", "10", timeout=300)


def test_burst_through_the_published_port(stack: Stack) -> None:
    """10000 concurrent withdrawals of 2 through nginx's published port: exactly 5000
    succeed, the balance ends at 0, and every replica served some."""
    replicas = stack.containers("app")
    assert len(replicas) == 5, replicas

    _burst_served_by_every_replica(stack, replicas, 10_000)


def test_tls_with_a_generated_certificate(stack: Stack, tmp_path: Path) -> None:
    """With no certificate given, the `tls` one-shot generated one and said so in its log;
    nginx serves it on the published HTTPS port: a client trusting that certificate (read
    from the nginx container) gets the app's answer, with HSTS."""
    assert "WARNING" in stack.compose("logs", "tls", timeout=60)
    (nginx,) = stack.containers("nginx")
    certificate = tmp_path / "cert.pem"
    certificate.write_text(podman("exec", nginx, "cat", "/etc/nginx/tls/cert.pem"))
    verify = ssl.create_default_context(cafile=str(certificate))
    answer = httpx.get(f"{stack.https_url}/balance/1", headers=AUTH, verify=verify, timeout=10)
    assert answer.status_code == 200, answer.text
    assert answer.headers["strict-transport-security"].startswith("max-age=")
    assert "x-instance-id" in answer.headers


def _burst_served_by_every_replica(stack: Stack, replicas: list[str], requests: int) -> None:
    """``requests`` withdrawals of 2 from a balance of ``requests`` through the published
    port: exactly half succeed, the balance ends at 0, and each of ``replicas`` (all there
    are) served some."""

    def updates(container: str) -> float:
        return balance_updates(f"http://{stack.address(container)}:8000")

    before = [updates(c) for c in replicas]
    try:
        with machine_lock(HEAVY):
            report = asyncio.run(
                withdraw_burst(
                    stack.url,
                    requests=requests,
                    amount=2,
                    initial_balance=requests,
                    api_key=API_KEY,
                )
            )
    except LoadtestError as error:
        # The burst's own reads failed (nginx found no replica to answer): say why, from
        # nginx's log and the replicas' states and last lines.
        states = podman(
            "ps",
            "-a",
            "--filter",
            f"label=com.docker.compose.project={stack.project}",
            "--format",
            "{{.Names}} {{.Status}}",
        )
        tails = [stack.compose("logs", "--no-color", "--tail", "15", "app", timeout=120)]
        raise AssertionError(
            "\n".join([str(error), states, *_nginx_complaints(stack), *tails])
        ) from None
    after = [updates(c) for c in replicas]
    problems = report.problems()
    # What nginx said meanwhile, for a failure's cause (a reset or a close is the edge's).
    said = [] if not problems else _nginx_complaints(stack)
    # One string: pytest shortens a tuple's repr, and nginx's lines are the point.
    outcomes = f"{report.outcomes} in {report.wall_time:.1f} s"
    assert problems == [], "\n".join([outcomes, *report.error_samples, *said])
    assert (report.ok, report.refused, report.other) == (requests // 2, requests // 2, 0)
    balance = http_get(f"{stack.url}/balance/{report.user_id}", timeout=10)
    assert balance.status_code == 200, balance.text
    assert balance.json()["balance"] == 0
    served = [b - a for a, b in zip(before, after, strict=True)]
    assert sum(served) == requests
    assert all(n > 0 for n in served), dict(zip(replicas, served, strict=True))


def _nginx_complaints(stack: Stack) -> list[str]:
    """nginx's warnings and errors (its error log goes to standard error), each kind once with
    its count and first line: the whole log is read, since the burst's access lines (standard
    output) would push the errors out of any tail."""
    log = stack.compose("logs", "--no-color", "nginx", timeout=120)
    levels = ("[warn]", "[error]", "[crit]", "[alert]", "[emerg]")
    kinds: dict[str, list[str]] = {}
    for line in log.splitlines():
        if any(level in line for level in levels):
            # "... [error] 7#7: *1234 upstream timed out (110: ...) while connecting, client: ..."
            kind = re.sub(r"\*\d+ |\d+#\d+: |^.*?\] ", "", line.split(", client:")[0])
            kinds.setdefault(kind, []).append(line)
    return [f"{len(lines)} x {lines[0]}" for lines in kinds.values()]


def _scraped(stack: Stack) -> dict[str, str]:
    """Prometheus's active targets of the tandem job: address -> health."""
    answer = httpx.get(f"{stack.prometheus}/api/v1/targets", params={"state": "active"})
    answer.raise_for_status()
    return {
        t["labels"]["instance"]: t["health"]
        for t in answer.json()["data"]["activeTargets"]
        if t["labels"]["job"] == "tandem"
    }


def _every_replica_scraped(stack: Stack) -> bool:
    expected = {f"{stack.address(c)}:8000": "up" for c in stack.containers("app")}
    return _scraped(stack) == expected


def test_prometheus_scrapes_every_replica_found_by_dns(stack: Stack) -> None:
    """Prometheus (its published port) scrapes each app replica directly, by the addresses
    the service name resolves to on the project's network, every one up; its alerts go to the
    stack's Alertmanager, which is ready (that they arrive: the kill test below)."""
    wait_for(lambda: _every_replica_scraped(stack), 60, step=1)
    answer = httpx.get(f"{stack.prometheus}/api/v1/alertmanagers")
    answer.raise_for_status()
    (active,) = answer.json()["data"]["activeAlertmanagers"]
    assert active["url"] == "http://alertmanager:9093/api/v2/alerts"
    assert httpx.get(f"{stack.alertmanager}/-/ready").status_code == 200


def test_a_scaled_up_replica_is_followed(stack: Stack) -> None:
    """`--scale app=6`: Prometheus scrapes the new replica within its DNS refresh, with no
    change to anything; nginx 1.22 (Debian's: no ``resolve`` on an upstream server, which
    the shipped 1.28 image has) picks it up at a reload of the unchanged config
    (``nginx -s reload`` resolves ``app`` again); then a burst through the published port
    is served by all six, exactly half of it succeeding."""
    before = stack.containers("app")
    stack.compose(
        "up", "--detach", "--no-build", "--no-deps", "--no-recreate", "--scale", "app=6", "app"
    )
    replicas = stack.containers("app")
    assert len(replicas) == 6, replicas
    (new,) = set(replicas) - set(before)
    wait_live(
        f"http://{stack.address(new)}:8000",
        60,
        lambda: False,
        lambda: stack.compose("logs", "--tail", "30", "app", timeout=60),
    )
    wait_for(lambda: _every_replica_scraped(stack), 60, step=1)
    (nginx,) = stack.containers("nginx")
    podman("exec", nginx, "nginx", "-s", "reload")
    # The reload is done once nginx's new workers send a request to the new replica.
    instance = _instance(f"http://{stack.address(new)}:8000")
    wait_for(lambda: _instance(stack.url) == instance, 30, step=0.05)
    _burst_served_by_every_replica(stack, replicas, 1200)


def _instance(url: str) -> str | None:
    """The instance that answers a request to ``url`` (its X-Instance-Id header)."""
    return httpx.get(f"{url}/health/live", timeout=5).headers.get("x-instance-id")


def _ok(answer: httpx.Response) -> Any:
    """The JSON of a 2xx answer. (Reads here allow 10 s: once a replica is killed, nginx
    waits out its 5 s connect timeout before it passes a request on to the next.)"""
    assert answer.is_success, (answer.url, answer.status_code, answer.text)
    return answer.json()


def test_a_killed_replica_is_recovered_and_alerted(stack: Stack) -> None:
    """`podman kill` of a replica in the middle of a demo task's run (each runs 2 minutes):
    another replica records the run lost ("session ended") and runs its slot again as
    attempt 2; Prometheus's TandemLeasesLost fires and reaches the stack's Alertmanager (its
    API lists the alert). Everything read through the published ports, with the key."""

    def tasks() -> list[dict[str, Any]]:
        """The demo tasks (the housekeeping ones run for a moment only)."""
        found = _ok(http_get(f"{stack.url}/tasks", timeout=10))["tasks"]
        return [t for t in found if t["name"] in DEMO_TASKS]

    def fresh_run() -> tuple[str, str] | None:
        """The newest run, if it has time left (a demo run lasts 120 s): task, instance."""
        young = [t for t in tasks() if t["is_running"] and t["elapsed_seconds"] < 100]
        newest = min(young, key=lambda t: t["elapsed_seconds"], default=None)
        return None if newest is None else (newest["name"], newest["running_instance"])

    if fresh_run() is None:  # the ten ran at start: start one now, once one is idle
        wait_for(lambda: any(not t["is_running"] for t in tasks()), 150, step=1)
        idle = next(t["name"] for t in tasks() if not t["is_running"])
        asked = http_post(f"{stack.url}/tasks/{idle}/run", timeout=10)
        if asked.status_code != 409:  # 409 task_running: claimed meanwhile, a fresh run too
            _ok(asked)
        wait_for(lambda: fresh_run() is not None, 30, step=0.5)
    found_run = fresh_run()
    assert found_run is not None
    task, instance = found_run
    hostnames = {
        i["id"]: i["hostname"]
        for i in _ok(http_get(f"{stack.url}/instances", timeout=10))["instances"]
    }
    (owner,) = [
        c
        for c in stack.containers("app")
        if inspect(c)["Config"]["Hostname"] == hostnames[instance]
    ]
    podman("kill", owner)

    def lost_and_rerun() -> tuple[dict[str, Any], dict[str, Any]] | None:
        runs = _ok(http_get(f"{stack.url}/tasks/{task}/history", timeout=10))["runs"]
        lost = [r for r in runs if r["instance_id"] == instance and r["status"] == "lost"]
        again = [
            r
            for r in runs
            if lost
            and (r["scheduled_for"], r["attempt"])
            == (lost[0]["scheduled_for"], lost[0]["attempt"] + 1)
        ]
        return (lost[0], again[0]) if again else None

    wait_for(lambda: lost_and_rerun() is not None, 30, step=0.5)
    found = lost_and_rerun()
    assert found is not None
    lost, again = found
    assert "session ended" in lost["error"], lost
    assert again["instance_id"] != instance

    def alerted() -> bool:
        answer = httpx.get(f"{stack.alertmanager}/api/v2/alerts", timeout=10)
        answer.raise_for_status()
        return any(a["labels"]["alertname"] == "TandemLeasesLost" for a in answer.json())

    wait_for(alerted, 90, step=2)
