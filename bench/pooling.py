"""What does turning asyncpg's statement cache off cost, and what does PgBouncer add?

    python bench/pooling.py [--runs 3] [--statements 2000] [--database-url URL]

The work: 10 connections at once (the hot pool's size), each running ``--statements``
single-row statements one after another on its own row (no lock waits: the cost per statement
is measured, not the row lock), first the wallet's shape ``UPDATE users SET balance = balance
+ 0 WHERE id = $1`` (autocommit), then a ``SELECT balance FROM users WHERE id = $1``.

Four ways to reach the server, interleaved per run, ops/s and the median:

- direct, cache on: asyncpg's default (named statements, parsed once per connection);
- direct, cache off: ``statement_cache_size=0`` (unnamed statement, parsed at every call);
- PgBouncer session mode, cache on: the pooler's extra hop alone;
- PgBouncer transaction mode, cache off: what the deployment runs (TANDEM_DB_STATEMENT_CACHE
  false behind Debian 12's PgBouncer 1.18).

PgBouncer is Debian's package, run by the tests' harness (tests/faults/pgbouncer.py) with a
server pool of 20. Everything shares one machine; compare the rows, not the absolutes.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import asyncpg
from common import (  # bench/common.py: bench/ is first on sys.path when this runs as a script
    add_database_argument,
    bench_database,
    console,
    positive_int,
    postgres_description,
    postgres_server,
    run_main,
)
from rich.table import Table

from tandem.core.database import asyncpg_dsn

# The PgBouncer harness lives with the tests (one copy of how to run it; common put the
# repository's root on sys.path).
from tests.faults.pgbouncer import pgbouncer

CONNECTIONS = 10
STATEMENTS = {
    "UPDATE": "UPDATE users SET balance = balance + 0 WHERE id = $1",
    "SELECT": "SELECT balance FROM users WHERE id = $1",
}


async def ops_per_second(
    dsn: str, statement: str, count: int, ids: list[int], cache: bool
) -> float:
    """CONNECTIONS connections, each running ``statement`` ``count`` times on its own row."""
    connections = [
        await asyncpg.connect(dsn, statement_cache_size=100 if cache else 0) for _ in ids
    ]
    try:
        # One warm-up call each: connection setup and the first parse are not counted.
        await asyncio.gather(
            *(c.execute(statement, i) for c, i in zip(connections, ids, strict=True))
        )

        async def worker(conn: asyncpg.Connection, user_id: int) -> None:
            for _ in range(count):
                await conn.execute(statement, user_id)

        started = time.perf_counter()
        await asyncio.gather(*(worker(c, i) for c, i in zip(connections, ids, strict=True)))
        elapsed = time.perf_counter() - started
    finally:
        await asyncio.gather(*(c.close() for c in connections))
    return len(ids) * count / elapsed


async def make_users(dsn: str) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        rows = await conn.fetch(
            "INSERT INTO users (balance) SELECT 10000 FROM generate_series(1, $1) RETURNING id",
            CONNECTIONS,
        )
    finally:
        await conn.close()
    return [row["id"] for row in rows]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_database_argument(parser)
    parser.add_argument("--runs", type=positive_int, default=3)
    parser.add_argument("--statements", type=positive_int, default=2000, help="per connection")
    args = parser.parse_args(argv)

    def body(workdir: Path, stack: ExitStack) -> int:
        server_url, origin = postgres_server(args.database_url, workdir)
        console.print(f"{postgres_description(server_url)} ({origin})")
        url = stack.enter_context(bench_database(server_url, "pooling"))
        session = stack.enter_context(pgbouncer(url, pool_mode="session"))
        transaction = stack.enter_context(pgbouncer(url, pool_mode="transaction"))
        direct = asyncpg_dsn(url)
        ids = asyncio.run(make_users(direct))
        setups = {
            "direct, cache on": (direct, True),
            "direct, cache off": (direct, False),
            "PgBouncer session, cache on": (asyncpg_dsn(session.url), True),
            "PgBouncer transaction, cache off": (asyncpg_dsn(transaction.url), False),
        }
        results: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for label, statement in STATEMENTS.items():
                for name, (dsn, cache) in setups.items():
                    rate = asyncio.run(ops_per_second(dsn, statement, args.statements, ids, cache))
                    results.setdefault((label, name), []).append(rate)
        table = Table(title=f"ops/s, {CONNECTIONS} connections x {args.statements} statements")
        table.add_column("setup")
        for label in STATEMENTS:
            table.add_column(f"{label} median", justify="right")
            table.add_column("vs direct", justify="right")
        for name in setups:
            cells = []
            for label in STATEMENTS:
                median = statistics.median(results[label, name])
                baseline = statistics.median(results[label, "direct, cache on"])
                cells += [f"{median:,.0f}", f"{median / baseline - 1:+.0%}"]
            table.add_row(name, *cells)
        console.print(table)
        for (label, name), rates in results.items():
            console.print(f"{label} {name}: " + " ".join(f"{rate:,.0f}" for rate in rates))
        return 0

    return run_main("tandem-bench-pooling-", body)


if __name__ == "__main__":
    sys.exit(main())
