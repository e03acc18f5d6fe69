"""`tandem ledger verify`, the real command against a real database: silent on a sound ledger
(exit 0, the counts), loud on a balance the journal does not explain (exit 1, which one);
one verification at a time, each within its statement deadline."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.core.locks import LEDGER_VERIFICATION
from tandem.wallet.repository import verify_ledger
from tests.support import REPO, fresh_database, holding, query


def verify(url: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem", "ledger", "verify"],
        env={**os.environ, "TANDEM_DATABASE_URL": url},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_verify_finds_what_the_journal_does_not_explain(postgres_url: str) -> None:
    with fresh_database(postgres_url) as url:
        user = query(url, "INSERT INTO users (balance) VALUES (0) RETURNING id")[0]["id"]
        query(
            url,
            "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
            "VALUES ($1, 0, 0, 'opening')",
            user,
        )
        sound = verify(url)
        assert sound.returncode == 0, sound.stdout + sound.stderr
        assert "users: 2\nentries: 2\nmismatches: 0" in sound.stdout
        query(url, "UPDATE users SET balance = 5 WHERE id = $1", user)
        query(
            url,
            "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
            "VALUES (1, 3, 999, 'deposit')",
        )
        broken = verify(url)
        assert broken.returncode == 1, broken.stdout + broken.stderr
        lines = broken.stdout.splitlines()
        assert f"MISMATCH user {user}: balance 5, sum of its 1 entries 0" in lines
        assert any(line.startswith("MISMATCH user 1: balance") for line in lines), lines
        assert any(
            line.startswith("MISMATCH entry") and "of user 1: balance 999" in line for line in lines
        ), lines
        assert lines[-1] == "mismatches: 3"


async def test_the_verification_has_a_statement_deadline(own_database_url: str) -> None:
    """A verification whose statement cannot finish within its deadline (the journal locked
    here) is cancelled by the server, not left running."""
    url = own_database_url
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with holding(url, "LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE"):
            with pytest.raises(asyncpg.QueryCanceledError):
                await verify_ledger(conn, 0.2)
    finally:
        await conn.close()


async def test_the_command_waits_for_a_verification_in_progress(own_database_url: str) -> None:
    """`tandem ledger verify` started while another verification runs says it waits, waits,
    and then verifies (exit 0): it never fails because one runs."""
    url = own_database_url
    async with holding(url, "SELECT pg_advisory_xact_lock($1)", LEDGER_VERIFICATION):
        command = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tandem",
            "ledger",
            "verify",
            env={**os.environ, "TANDEM_DATABASE_URL": url},
            cwd=REPO,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert command.stderr is not None
        said = await asyncio.wait_for(command.stderr.readline(), 60)
        assert b"already running; waiting" in said, said
        assert command.returncode is None  # still waiting while the other one runs
    out, err = await asyncio.wait_for(command.communicate(), 60)
    assert command.returncode == 0, out + err
    assert b"mismatches: 0" in out
