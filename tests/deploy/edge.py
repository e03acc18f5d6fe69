"""nginx as the tests run it: the shipped deploy/nginx config, copied with its two listen
ports (and, natively, its servers.conf) changed, its tls/ prepared by the shipped
tls-setup.sh, in front of real instances or containers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import ssl
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.support import free_port, http_get, require_tool

NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
LISTEN = re.compile(r"^(\s*)listen (8080|8443)\b", re.M)
TLS_SETUP = NGINX_DIR / "tls-setup.sh"
# Swapped in for a burst of thousands of connections (the 10000-withdrawal test,
# bench/topology.py): the plain listener serves Tandem exactly as the HTTPS one does (the same
# tandem.conf, limits included) instead of redirecting, so the client pays no handshakes.
SERVE_PLAIN = {"include plain.conf;": "include tandem.conf;"}

# For a burst of 10000 requests from one client process sharing the machine's two cores with
# the stack: nginx's header deadline (10 s in deploy/nginx/nginx.conf) runs from the accept,
# which the kernel completes for all 10000 connections at once, while the client's one
# thread, starved, can take longer than that to write some of its requests; nginx closes
# those unanswered (5792 of 10000 in one loaded CI run): a failure of the test's client, not
# of what it tests. Slow clients are what the deployed deadline is for; it stays there.
BURST_HEADER_DEADLINE = {"client_header_timeout 10s;": "client_header_timeout 120s;"}


@dataclass(frozen=True)
class Certificates:
    """A CA of the test's own and a server certificate it signed for localhost and
    127.0.0.1: ``folder`` holds cert.pem and key.pem as an operator provides them."""

    ca: Path
    folder: Path


def make_certificates(folder: Path) -> Certificates:
    """A throwaway CA and a server certificate signed by it (openssl's command line: EC P-256,
    valid a day), the extensions a strict verifier wants (Python's ssl, X509_STRICT)."""
    openssl = require_tool("openssl")
    folder.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]

    def run(*args: str) -> None:
        subprocess.run([openssl, *args], check=True, capture_output=True)

    ca, ca_key = folder / "ca.pem", folder / "ca-key.pem"
    run("req", "-x509", *ec, "-days", "1", "-subj", "/CN=Tandem test CA",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    server = folder / "server"
    server.mkdir(exist_ok=True)
    request, extensions = folder / "server.csr", folder / "server.ext"
    extensions.write_text(
        "subjectAltName=DNS:localhost,IP:127.0.0.1\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature\n"
        "extendedKeyUsage=serverAuth\n"
        "subjectKeyIdentifier=hash\n"
        "authorityKeyIdentifier=keyid\n"
    )
    run("req", *ec, "-subj", "/CN=localhost", "-keyout", str(server / "key.pem"),
        "-out", str(request))  # fmt: skip
    run("x509", "-req", "-in", str(request), "-CA", str(ca), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", "1", "-extfile", str(extensions),
        "-out", str(server / "cert.pem"))  # fmt: skip
    return Certificates(ca, server)


def setup_tls(provided: Path, out: Path, https_port: int) -> subprocess.CompletedProcess[str]:
    """deploy/nginx/tls-setup.sh, as compose's `tls` service runs it."""
    return subprocess.run(
        ["sh", str(TLS_SETUP), str(provided), str(out), str(https_port)],
        capture_output=True,
        text=True,
        check=False,
    )


def nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(p) for p in match.groups())


def prepare(
    folder: Path,
    servers: list[str] | None,
    port: int,
    swaps: dict[str, str] | None = None,
    *,
    tls_port: int | None = None,
    provided: Path | None = None,
) -> Path:
    """deploy/nginx copied into ``folder``: with ``servers``, servers.conf lists them; the
    plain listener (of both servers on it: the default one and the redirect) becomes
    ``port``, the HTTPS one ``tls_port`` (a free one if not given); each of ``swaps``
    replaces one exact text in nginx.conf or a file it includes; tls/ is what tls-setup.sh
    makes of ``provided`` (a folder with cert.pem and key.pem; without it, a generated
    certificate). Returns the nginx.conf path."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in NGINX_DIR.iterdir():
        shutil.copy(item, folder / item.name)
    conf = folder / "nginx.conf"
    tls_port = free_port() if tls_port is None else tls_port
    ports = {"8080": port, "8443": tls_port}
    text, swapped = LISTEN.subn(
        lambda m: f"{m.group(1)}listen 127.0.0.1:{ports[m.group(2)]}", conf.read_text()
    )
    assert swapped == 4, "nginx.conf no longer has the four `listen` lines this test swaps"
    conf.write_text(text)
    for old, new in (swaps or {}).items():
        found = [(f, f.read_text()) for f in folder.glob("*.conf") if old in f.read_text()]
        assert [text.count(old) for _, text in found] == [1], old  # exactly once in all
        (holder, text), *_ = found
        holder.write_text(text.replace(old, new))
    done = setup_tls(provided or folder / "no-certificate", folder / "tls", tls_port)
    assert done.returncode == 0, done.stderr
    if servers is not None:
        lines = "".join(f"server {s} max_fails=3 fail_timeout=10s;\n" for s in servers)
        (folder / "servers.conf").write_text(lines)
    return conf


def run_nginx(binary: str, conf: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    pid = conf.parent / "nginx.pid"
    return subprocess.run(
        [binary, "-p", str(conf.parent), "-c", str(conf), "-g", f"pid {pid};", *extra],
        capture_output=True,
        text=True,
    )


@dataclass
class Nginx:
    """A running nginx: ``url`` is its HTTPS listener (verified with ``verify``, the test CA),
    ``plain_url`` its plain HTTP one (which redirects, unless SERVE_PLAIN was swapped in)."""

    url: str
    plain_url: str
    verify: ssl.SSLContext
    process: subprocess.Popen[bytes]
    access_log: Path
    error_log: Path

    def client(self, **kwargs: Any) -> httpx.Client:
        """An HTTPS client of this nginx that trusts the test CA (and nothing else)."""
        return httpx.Client(base_url=self.url, verify=self.verify, **kwargs)

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines()


@contextmanager
def nginx_starter(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Starts the shipped config in front of the given upstream addresses (``swaps``: see
    ``prepare``), serving a certificate of a CA made for the test; every nginx started is
    stopped at the end."""
    binary = require_tool("nginx")
    started: list[Nginx] = []
    certificates = make_certificates(tmp_path / "pki")
    verify = ssl.create_default_context(cafile=str(certificates.ca))

    def start(servers: list[str], swaps: dict[str, str] | None = None) -> Nginx:
        port, tls_port = free_port(), free_port()
        conf = prepare(
            tmp_path / f"nginx-{port}",
            servers,
            port,
            swaps,
            tls_port=tls_port,
            provided=certificates.folder,
        )
        access_log = conf.parent / "access.log"
        error_log = conf.parent / "error.log"
        with access_log.open("wb") as out, error_log.open("wb") as err:
            process = subprocess.Popen(
                [
                    binary,
                    "-p",
                    str(conf.parent),
                    "-c",
                    str(conf),
                    "-g",
                    f"pid {conf.parent / 'nginx.pid'}; daemon off;",
                ],
                stdout=out,
                stderr=err,
                start_new_session=True,  # master and workers: one group to stop
            )
        proxy = Nginx(
            f"https://127.0.0.1:{tls_port}",
            f"http://127.0.0.1:{port}",
            verify,
            process,
            access_log,
            error_log,
        )
        started.append(proxy)
        deadline = time.monotonic() + 10
        while True:
            try:
                if http_get(f"{proxy.plain_url}/nginx/health", timeout=1).status_code == 200:
                    return proxy
            except httpx.HTTPError:
                pass
            assert process.poll() is None, error_log.read_text()
            assert time.monotonic() < deadline, "nginx did not start"
            time.sleep(0.05)

    try:
        yield start
    finally:
        _stop(started)


def _stop(started: list[Nginx]) -> None:
    for proxy in started:
        proxy.process.send_signal(signal.SIGQUIT)  # graceful: flushes the access log
        try:
            proxy.process.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proxy.process.pid, signal.SIGKILL)  # the workers too
            proxy.process.wait()


def balance_updates(base_url: str) -> float:
    """The balance updates an instance has made (its ``/metrics``): which replica served how
    many of a burst."""
    text = http_get(f"{base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("tandem_wallet_balance_updates_total{")
    )
