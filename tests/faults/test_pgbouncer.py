"""Tandem through Debian's PgBouncer in transaction mode: the wallet burst and the cron.

Debian 12's PgBouncer is 1.18 (no prepared statements in transaction mode), so the instances
run with TANDEM_DB_STATEMENT_CACHE=false; migrations take the direct URL. The harness's own
tests (tests/faults/test_pgbouncer_harness.py) show what breaks without those settings."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tandem.core.migrations import upgrade_to_head
from tests.faults.common import (
    CRON_ENV,
    assert_honest,
    burst_across,
    create_user,
    ran_since,
    stale_running,
    withdrawal,
)
from tests.faults.pgbouncer import pgbouncer
from tests.support import LEASE, empty_database, query, start_servers, wait_for


def test_wallet_burst_and_cron_through_pgbouncer(postgres_url: str, log_dir: Path) -> None:
    """Two instances behind a transaction-mode PgBouncer: 10000 concurrent withdrawals of 2
    from 10000 give exactly 5000 successes and a zero balance, and the cron runs with no
    failed run and nothing left running."""
    with empty_database(postgres_url) as direct, pgbouncer(direct) as bouncer:
        env = {
            **CRON_ENV,
            "TANDEM_DB_STATEMENT_CACHE": "false",
            "TANDEM_DATABASE_DIRECT_URL": direct,
        }
        upgrade_to_head(direct)
        servers = start_servers(bouncer.url, log_dir, 2, extra_env=env)
        try:
            user = create_user(direct, 10_000)
            requests = [(i % 2, withdrawal(servers[i % 2], user)) for i in range(10_000)]
            counts = assert_honest(asyncio.run(burst_across(servers, requests)))
            assert counts == {"200": 5000, "409": 5000}, counts
            assert query(direct, "SELECT balance FROM users WHERE id = $1", user)[0]["balance"] == 0

            wait_for(lambda: ran_since(direct, None) >= 10, 30)
            failed = query(direct, "SELECT error FROM task_history WHERE status = 'failed'")
            assert failed == [], failed
            wait_for(lambda: not stale_running(direct), 3 * LEASE)
        finally:
            for server in servers:
                server.stop()
        for server in servers:
            assert "does not exist" not in server.log(), server.log()
            assert "internal_error" not in server.log(), server.log()
