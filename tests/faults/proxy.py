"""A TCP proxy that can partition the network between a client and PostgreSQL.

A silent partition is the fault a killed server never shows: no FIN, no RST, the peer is just
gone, and only timeouts notice. Stopping the server or closing sockets cannot produce it, so
clients (servers under test, in subprocesses) connect through this proxy instead. It runs its
own asyncio loop in a daemon thread because the fault tests are sync functions driving
subprocesses.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlsplit, urlunsplit

_CHUNK = 64 * 1024
_CALL_TIMEOUT = 10.0


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST: SO_LINGER 0 makes close() reset the connection instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


@dataclass(eq=False)
class _Link:
    """One proxied connection; ``task`` is the one serving it."""

    client: asyncio.StreamWriter
    task: asyncio.Task[None]
    upstream: asyncio.StreamWriter | None = None

    def abort(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                _abort(writer)

    def close(self) -> None:
        for writer in (self.client, self.upstream):
            if writer is not None:
                writer.close()  # after abort(): nothing more to do


class PartitionProxy:
    """Listens on 127.0.0.1:``port`` and forwards each connection to the upstream (loopback
    only: a test harness has no business reaching other hosts)."""

    def __init__(self, upstream_host: str, upstream_port: int) -> None:
        host = "127.0.0.1" if upstream_host == "localhost" else upstream_host
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"upstream must be a loopback address, not {upstream_host!r}")
        self._upstream = (host, upstream_port)
        self._links: set[_Link] = set()
        self._loop = asyncio.new_event_loop()
        self._open = asyncio.Event()  # set: forwarding; clear: partitioned
        self._stopped = asyncio.Event()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(ready,), name=f"partition-proxy-{upstream_port}", daemon=True
        )
        self._thread.start()
        if not ready.wait(_CALL_TIMEOUT) or self._server is None:
            raise RuntimeError("partition proxy did not start")
        self.port: int = self._server.sockets[0].getsockname()[1]

    def _run(self, ready: threading.Event) -> None:
        async def main() -> None:
            self._open.set()
            self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            ready.set()
            await self._stopped.wait()
            self._server.close()
            for link in list(self._links):
                link.abort()
                link.task.cancel()
            await self._server.wait_closed()

        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(main())
            # Let cancelled link tasks finish before the loop closes.
            pending = asyncio.all_tasks(self._loop)
            if pending:
                self._loop.run_until_complete(asyncio.wait(pending, timeout=_CALL_TIMEOUT))
        finally:
            ready.set()
            self._loop.close()

    def _call(self, action: Callable[[], None]) -> None:
        """Run on the proxy's loop and wait: when partition() returns, nothing more flows."""
        done: Future[None] = Future()

        def run() -> None:
            try:
                action()
            except BaseException as error:
                done.set_exception(error)
            else:
                done.set_result(None)

        self._loop.call_soon_threadsafe(run)
        done.result(_CALL_TIMEOUT)

    def url_for(self, url: str) -> str:
        """The same URL with host and port replaced by the proxy's (user, password, database
        and query kept). Multi-host URLs, and a host or port in the query (which would bypass
        the proxy), are refused."""
        parts = urlsplit(url)
        userinfo, _, hostport = parts.netloc.rpartition("@")
        if "," in hostport:
            raise ValueError("multi-host URLs are not supported")
        if any(key in ("host", "port", "hostaddr") for key, _ in parse_qsl(parts.query)):
            raise ValueError("a host or port in the query would bypass the proxy")
        netloc = f"127.0.0.1:{self.port}"
        if userinfo:
            netloc = f"{userinfo}@{netloc}"
        return urlunsplit(parts._replace(netloc=netloc))

    def partition(self) -> None:
        """Stop forwarding both ways, closing nothing: bytes sent from now on are held (not
        delivered, not lost), new connections are accepted but not connected upstream, so a
        client's connect or query times out as in a real partition. No FIN, no RST."""
        self._call(self._open.clear)

    def heal(self) -> None:
        """Resume: held bytes (and held EOFs) are delivered in order, held connections reach
        the upstream."""
        self._call(self._open.set)

    def reset(self) -> None:
        """Abort every current connection with an RST to both ends (held bytes are dropped),
        and forward new connections again: a partition that heals with a reset, as when a
        middlebox loses its connection state."""

        def reset_all() -> None:
            for link in list(self._links):
                link.abort()
                link.task.cancel()
            self._open.set()

        self._call(reset_all)

    def close(self) -> None:
        """Stop listening and abort every connection."""
        if not self._thread.is_alive():
            return
        with suppress(RuntimeError):  # the loop closed meanwhile
            self._call(self._stopped.set)
        self._thread.join(_CALL_TIMEOUT)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        link = _Link(writer, task)
        self._links.add(link)
        try:
            # Partitioned, the upstream connect is held too: as a SYN that gets through later.
            await self._open.wait()
            try:
                up_reader, up_writer = await asyncio.open_connection(*self._upstream)
            except OSError:
                link.abort()  # upstream down: the client sees a reset, the nearest to "refused"
                return
            link.upstream = up_writer
            await asyncio.gather(
                self._pump(reader, up_writer, link), self._pump(up_reader, writer, link)
            )
        except asyncio.CancelledError:
            pass  # reset() or close(): already aborted
        finally:
            self._links.discard(link)
            link.close()

    async def _pump(
        self, source: asyncio.StreamReader, sink: asyncio.StreamWriter, link: _Link
    ) -> None:
        """Copy one direction. Each chunk (and the EOF, and a reset) waits for the network to
        be open, so a partition holds them all, in order."""
        while True:
            try:
                data = await source.read(_CHUNK)
            except OSError:
                await self._open.wait()
                link.abort()  # a reset on one side reaches the other
                return
            await self._open.wait()
            try:
                if not data:
                    if sink.can_write_eof():
                        sink.write_eof()  # half-close: the other direction keeps flowing
                    return
                sink.write(data)
                await sink.drain()
            except OSError:
                link.abort()
                return


@contextmanager
def partition_proxy(upstream_host: str, upstream_port: int) -> Iterator[PartitionProxy]:
    """A running proxy to the upstream, closed afterwards."""
    proxy = PartitionProxy(upstream_host, upstream_port)
    try:
        yield proxy
    finally:
        proxy.close()
