"""The shipped image, built and run for real under podman (no Docker engine here, and no
registry: the base image is made from Debian's packages).

- ``base_image()``: Debian bookworm (debootstrap, minbase) with Python 3.11, imported into
  podman's store once per machine and reused (``localhost/tandem-base``). It carries this
  machine's CA bundle, so pip inside a build reaches the package index through the machine's
  TLS setup. The only difference from a user's build is this base, given as the Dockerfile's
  ``PYTHON_IMAGE`` argument.
- ``app_image()``: the repository's Dockerfile, built on it (``--format docker``: podman's
  default OCI format drops ``HEALTHCHECK``).
- Containers run on the host's network (they reach a test's PostgreSQL on 127.0.0.1), or on
  networks of a test's own.
- podman reads ``tests/deploy/containers.conf`` (``CONTAINERS_CONF``), not the machine's:
  runc named (crun fails on these machines' hybrid cgroups) and no default ulimits (runc
  cannot set them here: "error setting rlimit type 7").

Rootful podman only (debootstrap needs root, and the host reaches containers' addresses):
elsewhere the tests are skipped, and fail under CI.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support import REPO, cannot_run, require_tool, wait_live
from tests.support.processes import machine_lock

BASE_IMAGE = "localhost/tandem-base:bookworm-1"
APP_IMAGE = "localhost/tandem:test"
# What the Dockerfile needs of its base: `python` (python-is-python3) with venv, and
# groupadd/useradd (passwd).
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
CONTAINERS_CONF = Path(__file__).with_name("containers.conf")


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> str:
    """Run podman; its standard output. A failure raises with podman's own words."""
    done = subprocess.run(
        _podman_command(*args),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
        **kwargs,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def _podman_command(*args: str) -> list[str]:
    if os.geteuid() != 0:
        cannot_run("the container tests need rootful podman (run as root)")
    return [require_tool("podman"), *args]


def image_id(name: str) -> str | None:
    """The image's id, or None when podman's store has no such image."""
    done = subprocess.run(
        _podman_command("image", "inspect", "--format", "{{.Id}}", name),
        capture_output=True,
        text=True,
        env={**os.environ, "CONTAINERS_CONF": str(CONTAINERS_CONF)},
    )
    if done.returncode != 0:
        if "image not known" in done.stderr or "no such image" in done.stderr.lower():
            return None
        raise AssertionError(f"podman image inspect {name}: {done.stderr}")
    return done.stdout.strip()


def base_image() -> str:
    """The base image, made on first use on this machine (about a minute) and kept."""
    if image_id(BASE_IMAGE) is not None:
        return BASE_IMAGE
    # Under /var/tmp: /tmp may be mounted noexec or nodev, which debootstrap cannot use.
    with tempfile.TemporaryDirectory(prefix="tandem-base-", dir="/var/tmp") as root:
        _debootstrap(Path(root))
        shutil.copyfile(CA_BUNDLE, Path(root) / CA_BUNDLE.relative_to("/"))
        for package in (Path(root) / "var/cache/apt/archives").glob("*.deb"):
            package.unlink()
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
        try:
            podman(
                "import",
                "--change",
                "ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "--change",
                f"ENV PIP_CERT={CA_BUNDLE}",
                "--change",
                "ENV LANG=C.UTF-8",
                "-",
                BASE_IMAGE,
                stdin=tar.stdout,
                timeout=300,
            )
        finally:
            assert tar.stdout is not None
            tar.stdout.close()  # a failed import must not leave tar blocked on a full pipe
            if tar.wait(60) != 0:
                raise AssertionError("tar of the base image failed")
    return BASE_IMAGE


def _debootstrap(root: Path) -> None:
    """debootstrap into ``root``; stopped with SIGTERM on timeout (its traps unmount the
    proc and sys it mounted inside), and anything still mounted there unmounted, so that
    deleting the folder never walks into them."""
    command = [
        require_tool("debootstrap"),
        "--variant=minbase",
        f"--include={','.join(BASE_PACKAGES)}",
        "bookworm",
        str(root),
        MIRROR,
    ]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        output, _ = process.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=60)
    finally:
        for mount in ("proc", "sys", "dev/pts", "dev/shm", "dev"):
            if os.path.ismount(root / mount):
                subprocess.run(["umount", "--recursive", "--lazy", str(root / mount)])
    if process.returncode != 0:
        log = root / "debootstrap/debootstrap.log"
        detail = log.read_text(errors="replace")[-4000:] if log.exists() else ""
        raise AssertionError(
            f"debootstrap exited {process.returncode}:\n{output.decode(errors='replace')}\n{detail}"
        )


IMAGES = Path(__file__).with_name("images")


# Held by an image build and by a test whose figure needs the machine's CPU (the compose
# burst: 10000 connections that five replicas must accept within nginx's 5 s connect
# deadline): on two shared cores a build beside the burst starves the replicas' accept loops,
# and nginx benches every one of them ("no live upstreams"); alone, the burst passes.
HEAVY = "tandem-podman-heavy"


def debian_image(service: str) -> str:
    """tests/deploy/images/<service>: a stand-in for a public image compose pins, built from
    Debian's packages on the base (``localhost/tandem-<service>:debian``)."""
    tag = f"localhost/tandem-{service}:debian"
    with machine_lock(HEAVY):
        _build(service, tag)
    return tag


def _build(service: str, tag: str) -> None:
    podman(
        "build",
        "--network",
        "host",
        "--build-arg",
        f"BASE={base_image()}",
        "--tag",
        tag,
        str(IMAGES / service),
        timeout=900,
    )


def app_image() -> str:
    """The shipped Dockerfile built on the base (podman's layer cache keeps rebuilds short);
    the image it replaces is removed, so rebuilds do not fill the disk."""
    previous = image_id(APP_IMAGE)
    with machine_lock(HEAVY):
        _build_app()
    if previous is not None and previous != image_id(APP_IMAGE):
        podman("rmi", previous, check=False)
    return APP_IMAGE


def _build_app() -> None:
    podman(
        "build",
        "--format",
        "docker",
        "--network",
        "host",
        "--build-arg",
        f"PYTHON_IMAGE={base_image()}",
        "--tag",
        APP_IMAGE,
        "--file",
        str(REPO / "Dockerfile"),
        str(REPO),
        timeout=900,
    )


@contextlib.contextmanager
def network() -> Iterator[tuple[str, str, str]]:
    """A container network of its own: its name, subnet and gateway (the host's address on
    it), removed at the end with whatever is still attached."""
    name = f"tandem-test-{uuid.uuid4().hex[:8]}"
    podman("network", "create", name)
    try:
        found = podman(
            "network",
            "inspect",
            "--format",
            "{{range .Subnets}}{{.Subnet}} {{.Gateway}}{{end}}",
            name,
        ).split()
        subnet, gateway = found[0], found[1]
        yield name, subnet, gateway
    finally:
        podman("network", "rm", "--force", name, check=False)


def address_on(network_name: str, container: str) -> str:
    """The container's IP address on the network."""
    networks = inspect(container)["NetworkSettings"]["Networks"]
    return str(networks[network_name]["IPAddress"])


def inspect(container: str) -> dict[str, Any]:
    (found,) = json.loads(podman("inspect", container))
    return dict(found)


@contextlib.contextmanager
def containers() -> Iterator[ContainerSet]:
    """Containers a test starts, removed (forcibly) at the end whatever happened."""
    started = ContainerSet()
    try:
        yield started
    finally:
        for name in started.names:
            podman("rm", "--force", "--time", "0", name, check=False)


class ContainerSet:
    def __init__(self) -> None:
        self.names: list[str] = []

    def run(
        self,
        image: str,
        args: Sequence[str] = (),
        *,
        options: Sequence[str] = (),
        network: str = "host",
    ) -> str:
        """``podman run --detach`` (on the host's network unless told); the container's name."""
        name = f"tandem-test-{uuid.uuid4().hex[:8]}"
        self.names.append(name)
        podman("run", "--detach", "--name", name, "--network", network, *options, image, *args)
        return name

    def serve(
        self, image: str, port: int, *, options: Sequence[str] = (), network: str = "host"
    ) -> str:
        """A container of ``tandem serve`` answering (live) on 127.0.0.1:``port``: its own
        port on the host's network, else published there from its 8000."""
        if network != "host":
            options = [*options, "--publish", f"127.0.0.1:{port}:8000"]
        name = self.run(image, options=options, network=network)
        wait_live(
            f"http://127.0.0.1:{port}",
            60,
            lambda: not inspect(name)["State"]["Running"],
            lambda: podman("logs", name, check=False),
            step=0.5,
        )
        return name
