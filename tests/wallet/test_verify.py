"""`tandem ledger verify`, the real command against a real database: silent on a sound ledger
(exit 0, the counts), loud on a balance the journal does not explain (exit 1, which one)."""

from __future__ import annotations

import os
import subprocess
import sys

from tests.support import REPO, fresh_database, query


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
