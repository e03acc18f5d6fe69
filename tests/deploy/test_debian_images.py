"""Stand-ins for the public images deploy/compose.yaml pins, built here from Debian's packages
(no registry can be reached), each checked against the part of the public image's interface
the compose file uses, run with the compose file's own hardening for that service."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import asyncpg
import pytest
import yaml

from tests.deploy.containers import app_image, containers, debian_image, podman
from tests.support import REPO, free_port, wait_for

pytestmark = pytest.mark.timeout(900)

COMPOSE = REPO / "deploy" / "compose.yaml"


def service(name: str) -> dict[str, Any]:
    """The service as written (YAML merge keys resolved; variables not)."""
    found: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"][name]
    return found


def hardening(name: str) -> list[str]:
    """podman options for the service's read_only, cap_drop, cap_add, security_opt, tmpfs."""
    spec = service(name)
    options = ["--read-only"] if spec.get("read_only") else []
    options += [f"--cap-drop={cap}" for cap in spec.get("cap_drop", [])]
    options += [f"--cap-add={cap}" for cap in spec.get("cap_add", [])]
    options += [
        f"--security-opt={opt.replace(':true', '')}" for opt in spec.get("security_opt", [])
    ]
    options += [f"--tmpfs={path}" for path in spec.get("tmpfs", [])]
    return options


@pytest.fixture(scope="module")
def postgres_port() -> Iterator[int]:
    """The PostgreSQL stand-in, started as compose starts it: its hardening, a data volume, the
    compose file's environment and init script (deploy/postgres/app-role.sh)."""
    image, port = debian_image("postgres"), free_port()
    (init_script,) = (v for v in service("postgres")["volumes"] if "initdb.d" in v)
    source, target, _ = init_script.split(":")
    with containers() as started:
        name = started.run(
            image,
            ["postgres", "-c", f"port={port}", "-c", "max_connections=100"],
            options=[
                *hardening("postgres"),
                "--volume=/var/lib/postgresql/data",
                f"--volume={(COMPOSE.parent / source).resolve()}:{target}:ro",
                "--env=POSTGRES_USER=tandem",
                "--env=POSTGRES_PASSWORD=owner-secret",
                "--env=POSTGRES_DB=tandem",
                "--env=APP_ROLE_PASSWORD=app-secret",
            ],
        )
        ready = ["exec", name, "pg_isready", "-h", "127.0.0.1", "-p", str(port), "-U", "tandem"]
        wait_for(lambda: podman(*ready, check=False).endswith("accepting connections\n"), 60)
        yield port


def _fetch(url: str, sql: str) -> Any:
    async def run() -> Any:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            return await conn.fetchval(sql)
        finally:
            await conn.close()

    return asyncio.run(run())


def test_postgres_stand_in_has_the_official_interface(postgres_port: int) -> None:
    """POSTGRES_USER/PASSWORD/DB make the owner (SCRAM over TCP, a wrong password refused),
    the init script made the app's role; the app image's `tandem migrate` then upgrades the
    schema as the owner and grants the app's role its rights (no DDL)."""
    owner = f"postgresql://tandem:owner-secret@127.0.0.1:{postgres_port}/tandem"
    app = f"postgresql://tandem_app:app-secret@127.0.0.1:{postgres_port}/tandem"
    assert _fetch(owner, "SELECT current_user") == "tandem"
    with pytest.raises(asyncpg.InvalidPasswordError):
        _fetch(owner.replace("owner-secret", "wrong"), "SELECT 1")
    assert _fetch(app, "SELECT current_user") == "tandem_app"
    podman(
        "run",
        "--rm",
        "--network=host",
        f"--env=TANDEM_DATABASE_URL={owner}",
        "--env=TANDEM_DATABASE_APP_ROLE=tandem_app",
        app_image(),
        "migrate",
        timeout=300,
    )
    assert _fetch(app, "SELECT balance FROM users WHERE id = 1") == 10000
    with pytest.raises(asyncpg.InsufficientPrivilegeError):
        _fetch(app, "CREATE TABLE intruder (id int)")
