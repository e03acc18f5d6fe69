"""nginx as the tests run it: the shipped deploy/nginx config, copied with its listen port
(and, natively, its servers.conf) changed, in front of real instances or containers."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from tests.support import free_port, http_get, require_tool

NGINX_DIR = Path(__file__).resolve().parents[2] / "deploy" / "nginx"
LISTEN = re.compile(r"^(\s*)listen 8080\b", re.M)


def nginx_version(binary: str) -> tuple[int, ...]:
    out = subprocess.run([binary, "-v"], capture_output=True, text=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    assert match, out
    return tuple(int(p) for p in match.groups())


def prepare(
    folder: Path, servers: list[str] | None, port: int, swaps: dict[str, str] | None = None
) -> Path:
    """deploy/nginx copied into ``folder``: with ``servers``, servers.conf lists them; the
    listen port (of both servers: the default one and Tandem's) becomes ``port``; each of
    ``swaps`` replaces one exact text. Returns the nginx.conf path."""
    folder.mkdir(parents=True, exist_ok=True)
    for item in NGINX_DIR.iterdir():
        shutil.copy(item, folder / item.name)
    conf = folder / "nginx.conf"
    text, swapped = LISTEN.subn(rf"\1listen 127.0.0.1:{port} ", conf.read_text())
    assert swapped == 2, "nginx.conf no longer has the two `listen 8080` lines this test swaps"
    for old, new in (swaps or {}).items():
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    conf.write_text(text)
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
    url: str
    process: subprocess.Popen[bytes]
    access_log: Path

    def log_lines(self) -> list[str]:
        return self.access_log.read_text().splitlines()


@contextmanager
def nginx_starter(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Starts the shipped config in front of the given upstream addresses (``swaps``: see
    ``prepare``); every nginx started is stopped at the end."""
    binary = require_tool("nginx")
    started: list[Nginx] = []

    def start(servers: list[str], swaps: dict[str, str] | None = None) -> Nginx:
        port = free_port()
        conf = prepare(tmp_path / f"nginx-{port}", servers, port, swaps)
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
        proxy = Nginx(f"http://127.0.0.1:{port}", process, access_log)
        started.append(proxy)
        deadline = time.monotonic() + 10
        while True:
            try:
                if http_get(f"{proxy.url}/nginx/health", timeout=1).status_code == 200:
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
