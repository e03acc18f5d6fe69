"""The shipped image, built and run for real under podman (no Docker engine here, and no
registry: the base image is made from Debian's packages).

- ``base_image()``: Debian bookworm (debootstrap, minbase) with Python 3.11, imported into
  podman's store once per machine and reused (``localhost/tandem-base``). It carries this
  machine's CA bundle, so pip inside a build reaches the package index through the machine's
  TLS setup. The only difference from a user's build is this base, given as the Dockerfile's
  ``PYTHON_IMAGE`` argument.
- ``app_image()``: the repository's Dockerfile, built on it (``--format docker``: podman's
  default OCI format drops ``HEALTHCHECK``).
- Containers run on the host's network, so they reach a test's PostgreSQL on 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from tests.support import REPO, require_tool, wait_live

BASE_IMAGE = "localhost/tandem-base:bookworm-1"
APP_IMAGE = "localhost/tandem:test"
# What the Dockerfile needs of its base: `python` (python-is-python3) with venv, and
# groupadd/useradd (passwd).
BASE_PACKAGES = ("python3", "python3-venv", "python-is-python3", "ca-certificates", "passwd")
MIRROR = "http://deb.debian.org/debian"
CA_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")


def podman(*args: str, check: bool = True, timeout: float = 120, **kwargs: Any) -> str:
    """Run podman; its standard output. A failure raises with podman's own words."""
    done = subprocess.run(
        [require_tool("podman"), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
    if check and done.returncode != 0:
        raise AssertionError(f"podman {' '.join(args)} exited {done.returncode}:\n{done.stderr}")
    return done.stdout


def image_exists(name: str) -> bool:
    return subprocess.run([require_tool("podman"), "image", "exists", name]).returncode == 0


def base_image() -> str:
    """The base image, made on first use on this machine (about a minute) and kept."""
    if image_exists(BASE_IMAGE):
        return BASE_IMAGE
    debootstrap = require_tool("debootstrap")
    with tempfile.TemporaryDirectory(prefix="tandem-base-") as root:
        subprocess.run(
            [
                debootstrap,
                "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}",
                "bookworm",
                root,
                MIRROR,
            ],
            check=True,
            capture_output=True,
            timeout=900,
        )
        shutil.copyfile(CA_BUNDLE, Path(root) / CA_BUNDLE.relative_to("/"))
        for cache in ("var/cache/apt/archives", "var/lib/apt/lists"):
            for item in (Path(root) / cache).glob("*.deb"):
                item.unlink()
        tar = subprocess.Popen(["tar", "-C", root, "-c", "."], stdout=subprocess.PIPE)
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
        assert tar.wait() == 0
    return BASE_IMAGE


def app_image() -> str:
    """The shipped Dockerfile built on the base (podman's layer cache keeps rebuilds short)."""
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
    return APP_IMAGE


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
        wait_live(f"http://127.0.0.1:{port}", 60, lambda: exited(name))
        return name


def exited(container: str) -> str | None:
    """The container's log once it is no longer running, else None."""
    if inspect(container)["State"]["Running"]:
        return None
    return podman("logs", container, check=False)
