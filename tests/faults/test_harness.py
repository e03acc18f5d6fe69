"""The fault harness does what it says: a fault test is only as good as the fault it injects."""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Literal

import asyncpg
import pytest

from tests.faults.postgres import ThrowawayPostgres, throwaway_postgres
from tests.faults.proxy import PartitionProxy, partition_proxy

# PostgreSQL wire messages: the SSLRequest (answered with one byte, "N" here) and a
# StartupMessage for postgres/postgres (answered with "R", AuthenticationOk under trust).
SSL_REQUEST = struct.pack("!ii", 8, 80877103)
_STARTUP_BODY = struct.pack("!i", 196608) + b"user\0postgres\0database\0postgres\0\0"
STARTUP = struct.pack("!i", len(_STARTUP_BODY) + 4) + _STARTUP_BODY


@pytest.fixture(scope="module")
def server() -> Iterator[ThrowawayPostgres]:
    with throwaway_postgres() as pg:
        yield pg


@pytest.fixture
def pg(server: ThrowawayPostgres) -> ThrowawayPostgres:
    server.start()  # a test that failed half-way may have left it down
    return server


@pytest.fixture
def proxy(pg: ThrowawayPostgres) -> Iterator[PartitionProxy]:
    with partition_proxy("127.0.0.1", pg.port) as p:
        yield p


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state != "Z"


async def values(url: str, table: str) -> list[int]:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        return [row[0] for row in await conn.fetch(f"SELECT v FROM {table} ORDER BY v")]
    finally:
        await conn.close()


async def execute(url: str, statement: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@pytest.mark.parametrize("mode", ["fast", "immediate"])
async def test_stop_and_restart_keep_committed_data_and_refuse_connections_while_down(
    pg: ThrowawayPostgres, mode: Literal["fast", "immediate"]
) -> None:
    table = f"kept_{mode}"
    await execute(pg.url, f"CREATE TABLE {table} (v int); INSERT INTO {table} VALUES (1)")
    log_before = len(pg.log())

    pg.stop(mode)
    assert not pg.is_running()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(pg.url, timeout=2)
    pg.start()
    assert await values(pg.url, table) == [1]

    await execute(pg.url, f"INSERT INTO {table} VALUES (2)")
    pg.restart(mode)
    assert pg.is_running()
    assert await values(pg.url, table) == [1, 2]
    # immediate is the crash-like one: only it makes the next start recover from the WAL.
    recovered = "automatic recovery in progress" in pg.log()[log_before:]
    assert recovered == (mode == "immediate")


async def test_kill_is_a_crash_that_the_next_start_recovers_from(pg: ThrowawayPostgres) -> None:
    await execute(
        pg.url, "CREATE TABLE killed (v int); INSERT INTO killed SELECT generate_series(1, 100)"
    )
    conn = await asyncpg.connect(pg.url, timeout=5)
    backend = await conn.fetchval("SELECT pg_backend_pid()")
    log_before = len(pg.log())
    try:
        pg.kill()
        assert not pg.is_running()
        assert not alive(backend)  # the children died with the postmaster
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1")
    finally:
        conn.terminate()
    assert (pg.data_dir / "postmaster.pid").exists()  # stale, and must not block the start
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(pg.url, timeout=2)

    pg.start()
    assert await values(pg.url, "killed") == list(range(1, 101))
    assert "automatic recovery in progress" in pg.log()[log_before:]


def test_url_for_replaces_only_host_and_port(proxy: PartitionProxy) -> None:
    url = "postgresql+asyncpg://app:s%40cret@db.example:5433/tandem?ssl=disable"
    assert proxy.url_for(url) == (
        f"postgresql+asyncpg://app:s%40cret@127.0.0.1:{proxy.port}/tandem?ssl=disable"
    )
    with pytest.raises(ValueError, match="multi-host"):
        proxy.url_for("postgresql://u@a:1,b:2/db")
    with pytest.raises(ValueError, match="bypass"):
        proxy.url_for("postgresql://u@a:1/db?host=/tmp")


def test_partition_is_silent_and_heal_delivers_the_held_bytes(proxy: PartitionProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"N"  # forwarding, both ways

        proxy.partition()
        sock.sendall(STARTUP)
        sock.settimeout(0.5)
        # Neither an answer nor a FIN (b"") nor an RST (ConnectionResetError): silence.
        with pytest.raises(TimeoutError):
            sock.recv(1)

        proxy.heal()
        sock.settimeout(5)
        assert sock.recv(1) == b"R"  # the startup held during the partition reached the server


async def test_partition_times_queries_and_connects_out_and_heal_resumes_the_connection(
    pg: ThrowawayPostgres, proxy: PartitionProxy
) -> None:
    url = proxy.url_for(pg.url)
    conn = await asyncpg.connect(url, timeout=5)
    direct = await asyncpg.connect(pg.url, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        backend = await conn.fetchval("SELECT pg_backend_pid()")

        proxy.partition()
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 2", timeout=1)
        with pytest.raises(TimeoutError):
            await asyncpg.connect(url, timeout=1)
        # Nothing was closed: the client and the server both still hold the connection.
        assert not conn.is_closed()
        query = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"
        assert await direct.fetchval(query, backend) == 1

        proxy.heal()
        assert await conn.fetchval("SELECT 3", timeout=5) == 3
    finally:
        await conn.close()
        await direct.close()


def test_reset_sends_an_rst(proxy: PartitionProxy) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(SSL_REQUEST)
        assert sock.recv(1) == b"N"
        proxy.reset()
        with pytest.raises(ConnectionResetError):
            sock.recv(1)


async def test_reset_breaks_open_connections_heals_and_new_ones_work(
    pg: ThrowawayPostgres, proxy: PartitionProxy
) -> None:
    url = proxy.url_for(pg.url)
    conn = await asyncpg.connect(url, timeout=5)
    try:
        assert await conn.fetchval("SELECT 1") == 1
        proxy.partition()
        proxy.reset()
        with pytest.raises((asyncpg.ConnectionDoesNotExistError, asyncpg.InterfaceError)):
            await conn.fetchval("SELECT 1", timeout=5)
        assert conn.is_closed()
    finally:
        conn.terminate()

    fresh = await asyncpg.connect(url, timeout=5)
    try:
        assert await fresh.fetchval("SELECT 1") == 1
    finally:
        await fresh.close()
