"""`tandem ledger verify`, the real command against a real database: silent on a sound ledger
(exit 0, the counts), holds in every state included; loud on a balance the journal does not
explain, or a held amount or a hold its events and entries do not (exit 1, which one); one
verification at a time, each within its statement deadline."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time

import asyncpg
import pytest

from tandem.core.database import asyncpg_dsn
from tandem.core.locks import LEDGER_VERIFICATION
from tandem.wallet.repository import verify_ledger
from tests.support import REPO, fresh_database, holding, query, value


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
        assert "users: 2\nentries: 2\nholds: 0\nmismatches: 0" in sound.stdout
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


def funded_user(url: str, balance: int) -> int:
    """A user holding ``balance``, with its opening entry."""
    user = query(url, "INSERT INTO users (balance) VALUES ($1) RETURNING id", balance)[0]["id"]
    query(
        url,
        "INSERT INTO ledger_entries (user_id, amount, balance, kind) "
        "VALUES ($1, $2, $2, 'opening')",
        user,
        balance,
    )
    return int(user)


def hold(url: str, payer: int, amount: int, payee: int | None = None, expires_in: int = 900) -> int:
    """A hold made by its owner function, as the service makes it (no reference, no key)."""
    (made,) = query(
        url,
        "SELECT * FROM tandem_create_hold_v1($1, $2, $3, $4, NULL, NULL, NULL)",
        payer,
        payee,
        amount,
        expires_in,
    )
    assert made["outcome"] == "ok", dict(made)
    return int(made["hold_id"])


def capture(url: str, hold_id: int, amount: int | None = None) -> None:
    (done,) = query(
        url, "SELECT * FROM tandem_capture_hold_v1($1, $2, NULL, NULL, NULL)", hold_id, amount
    )
    assert done["outcome"] == "ok", dict(done)


def release(url: str, hold_id: int) -> str:
    (done,) = query(url, "SELECT * FROM tandem_release_hold_v1($1, NULL, NULL)", hold_id)
    assert done["outcome"] == "ok", dict(done)
    return str(done["status"])


def holds_in_every_state(url: str) -> dict[str, int]:
    """A payer's holds, by what became of them: active; captured whole to a payee; captured in
    part without one (a withdrawal, the rest released); released; expired and released;
    expired and not yet released (still held)."""
    payer, payee = funded_user(url, 1000), funded_user(url, 0)
    made = {
        "active": hold(url, payer, 100),
        "to_payee": hold(url, payer, 200, payee),
        "part": hold(url, payer, 150),
        "released": hold(url, payer, 50),
        # Made first, so it is past its expiry once the next one is.
        "overdue": hold(url, payer, 20, expires_in=1),
        "expired": hold(url, payer, 30, expires_in=1),
    }
    capture(url, made["to_payee"])
    capture(url, made["part"], 100)
    assert release(url, made["released"]) == "released"
    deadline = time.monotonic() + 10
    while value(
        url, "SELECT expires_at > clock_timestamp() FROM holds WHERE id = $1", made["expired"]
    ):
        assert time.monotonic() < deadline, "the hold never expired"
        time.sleep(0.05)
    assert release(url, made["expired"]) == "expired"
    return made | {"payer": payer, "payee": payee}


def test_verify_passes_holds_in_every_state(postgres_url: str) -> None:
    """A ledger with holds in every state, each made and changed by its owner function,
    verifies clean (exit 0), an overdue hold still counted in its user's held amount, and
    the command counts the holds it checked."""
    with fresh_database(postgres_url) as url:
        made = holds_in_every_state(url)
        held = value(url, "SELECT held FROM users WHERE id = $1", made["payer"])
        assert held == 100 + 20  # the active hold and the overdue one
        overdue = "SELECT status = 'active' AND expires_at <= clock_timestamp() FROM holds "
        assert value(url, overdue + "WHERE id = $1", made["overdue"])
        sound = verify(url)
        assert sound.returncode == 0, sound.stdout + sound.stderr
        assert "users: 3\nentries: 6\nholds: 6\nmismatches: 0" in sound.stdout


def test_verify_finds_holds_the_journal_does_not_explain(postgres_url: str) -> None:
    """Holds changed behind their functions' back, as the owner: a held amount raised, a
    second capture journaled, and a captured amount rewritten with the holds' triggers
    disabled are each a MISMATCH line naming the user or the hold; exit 1."""
    with fresh_database(postgres_url) as url:
        made = holds_in_every_state(url)
        query(url, "UPDATE users SET held = held + 5 WHERE id = $1", made["payer"])
        query(
            url,
            "INSERT INTO hold_events (hold_id, kind, amount, created_at) "
            "VALUES ($1, 'captured', 10, now())",
            made["part"],
        )
        query(url, "ALTER TABLE holds DISABLE TRIGGER USER")
        query(url, "UPDATE holds SET captured_amount = 199 WHERE id = $1", made["to_payee"])
        query(url, "ALTER TABLE holds ENABLE TRIGGER USER")
        broken = verify(url)
        assert broken.returncode == 1, broken.stdout + broken.stderr
        lines = broken.stdout.splitlines()
        assert (
            f"MISMATCH user {made['payer']}: held 125 is not the sum of its active holds, 120"
            in lines
        ), lines
        assert f"MISMATCH hold {made['part']}: captured more than once" in lines, lines
        assert (
            f"MISMATCH hold {made['to_payee']}: its capture events do not match the hold" in lines
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
