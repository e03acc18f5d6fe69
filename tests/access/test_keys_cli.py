"""`tandem keys` against the servers' database, a new key working at once and a revocation
reaching every instance, unknown tokens refused at a bounded cost: real processes."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import httpx

from tandem.access.keys import new_token, well_formed
from tandem.core.settings import Settings
from tests.access.keys import bearer, delta, scraped_lookup_counts
from tests.support import (
    REPO,
    Server,
    free_port,
    query,
    start_server,
    start_servers,
    wait_for,
)

# A revocation must take effect on every instance within this.
REVOCATION_BOUND = 5.0


def tandem(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tandem", *args],
        env={**os.environ, "TANDEM_DATABASE_URL": database_url, "TANDEM_LOG_LEVEL": "warning"},
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )


def test_keys_create_with_limits_and_list_them(database_url: str) -> None:
    """--debit-limit (repeatable) and --rate are stored and shown by `keys list`; a bad one
    is refused and makes no key; a key without limits lists none."""
    made = tandem(
        database_url,
        *("keys", "create", "--name", "capped", "--scope", "wallet:write"),
        *("--debit-limit", "5000/hour", "--debit-limit", "20000/day", "--rate", "10/s"),
    )
    assert made.returncode == 0, made.stderr
    bad = tandem(
        database_url,
        *("keys", "create", "--name", "bad", "--scope", "wallet:write"),
        *("--debit-limit", "5/week"),
    )
    assert bad.returncode == 2
    assert "invalid limit '5/week'" in bad.stderr
    plain = tandem(database_url, "keys", "create", "--name", "plain", "--scope", "wallet:read")
    assert plain.returncode == 0, plain.stderr
    listed = {
        line.split()[0]: line for line in tandem(database_url, "keys", "list").stdout.splitlines()
    }
    assert "LIMITS" in listed["NAME"]
    assert "debit 5000/hour,20000/day rate 10/second" in listed["capped"]
    assert listed["plain"].split()[-1] == "-"
    assert "bad" not in listed


def test_keys_create_list_revoke(database_url: str, log_dir: Path) -> None:
    made = tandem(database_url, "keys", "create", "--name", "reader", "--scope", "wallet:read")
    assert made.returncode == 0, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    assert token.startswith("tdm_")
    assert token not in tandem(database_url, "keys", "list").stdout

    taken = tandem(database_url, "keys", "create", "--name", "reader", "--scope", "all")
    assert taken.returncode == 2
    assert "exists" in taken.stderr
    unknown = tandem(database_url, "keys", "create", "--name", "x", "--scope", "root")
    assert unknown.returncode != 0

    server = start_server(database_url, log_dir)
    try:
        answer = httpx.get(f"{server.url}/balance/1", headers={"Authorization": f"Bearer {token}"})
        assert answer.status_code == 200, answer.text
        # Dated by the server's next reload of the keys (every TANDEM_AUTH_CACHE_TTL).
        used = "SELECT 1 FROM api_keys WHERE name = 'reader' AND last_used_at IS NOT NULL"
        wait_for(lambda: query(database_url, used), 10)
        listed = tandem(database_url, "keys", "list").stdout.splitlines()
        header, rows = listed[0].split(), {line.split()[0]: line.split() for line in listed[1:]}
        assert header[:2] == ["NAME", "SCOPES"]
        assert rows["reader"][1] == "wallet:read"
        assert rows["reader"][3] != "-", "last used is dated"
        assert rows["reader"][4] == "-", "not revoked"

        revoked = tandem(database_url, "keys", "revoke", "reader")
        assert revoked.returncode == 0, revoked.stderr
        assert tandem(database_url, "keys", "list").stdout.count("reader") == 1
        assert tandem(database_url, "keys", "revoke", "nobody").returncode == 2
    finally:
        server.stop()


def test_keys_create_bound_to_users(database_url: str) -> None:
    """`--user` (repeated) binds the key to those users, `--expires-in` dates its end; both
    are stored and listed; a user id that is no id is refused."""
    users = [
        row["id"]
        for row in query(database_url, "INSERT INTO users (balance) VALUES (0), (0) RETURNING id")
    ]
    args = ["keys", "create", "--name", "end-user", "--scope", "wallet:read"]
    made = tandem(
        database_url,
        *args,
        "--user",
        str(users[1]),
        "--user",
        str(users[0]),
        "--expires-in",
        "600",
    )
    assert made.returncode == 0, made.stderr
    assert f"bound to the users {users[0]}, {users[1]}" in made.stdout
    row = query(
        database_url,
        "SELECT bound_user_ids, expires_at - created_at AS life FROM api_keys "
        "WHERE name = 'end-user'",
    )[0]
    assert row["bound_user_ids"] == users
    # created_at and the expiry's start are two reads of the clock in one statement, either
    # may come first by a microsecond: the key lives 600 s from its creation, to within that.
    assert abs(row["life"].total_seconds() - 600) < 1
    listed = {
        line.split()[0]: line.split()
        for line in tandem(database_url, "keys", "list").stdout.splitlines()[1:]
    }
    assert listed["end-user"][-3] == f"{users[0]},{users[1]}"
    refused = tandem(
        database_url, "keys", "create", "--name", "x", "--scope", "wallet:read", "--user", "0"
    )
    assert refused.returncode == 2
    assert "invalid user id" in refused.stderr


def lookups_of(server: Server) -> dict[str, float]:
    """The server's key-lookup counters (tests/access/keys.py)."""
    return scraped_lookup_counts(httpx.get(f"{server.url}/metrics", timeout=10).text)


def test_a_new_key_works_at_once_on_every_instance(database_url: str, log_dir: Path) -> None:
    """Two instances have loaded their keys; `tandem keys create` prints the token alone on
    the last line of its output, and the first request with it succeeds on each instance,
    whenever their next reload is."""
    servers = start_servers(database_url, log_dir, 2)
    try:
        made = tandem(database_url, "keys", "create", "--name", "at-once", "--scope", "wallet:read")
        assert made.returncode == 0, made.stderr
        token = made.stdout.splitlines()[-1]
        assert well_formed(token), made.stdout
        assert made.stdout.endswith(f"\n{token}\n"), "alone on the last line"
        for server in servers:
            answer = httpx.get(f"{server.url}/balance/1", headers=bearer(token))
            assert answer.status_code == 200, (server.url, answer.text)
    finally:
        for server in servers:
            server.stop()


def test_unknown_tokens_are_refused_at_a_bounded_cost(database_url: str, log_dir: Path) -> None:
    """A random token is refused 401; sent again it is refused from memory, not looked up
    again; many distinct ones at once are looked up at most at the per-process limit (as
    many at once, then so many per second), the rest refused with no lookup."""
    limit = Settings().auth_lookups_per_second
    server = start_server(database_url, log_dir)
    try:
        token = new_token()
        before = lookups_of(server)
        for _ in range(30):
            answer = httpx.get(f"{server.url}/balance/1", headers=bearer(token))
            assert answer.status_code == 401
            assert answer.json()["error"]["code"] == "unauthenticated"
        assert delta(before, lookups_of(server)) == {"unknown": 1, "remembered": 29}

        async def burst(count: int) -> list[int]:
            async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
                answers = await asyncio.gather(
                    *(client.get("/balance/1", headers=bearer(new_token())) for _ in range(count))
                )
            return [answer.status_code for answer in answers]

        before = lookups_of(server)
        started = time.monotonic()
        assert asyncio.run(burst(40)) == [401] * 40
        elapsed = time.monotonic() - started
        gained = delta(before, lookups_of(server))
        looked_up = gained.get("unknown", 0) + gained.get("found", 0) + gained.get("failed", 0)
        assert looked_up + gained.get("limited", 0) == 40, gained
        assert looked_up <= limit + limit * elapsed, (gained, elapsed)
    finally:
        server.stop()


def test_a_revocation_reaches_every_instance_within_the_bound(
    database_url: str, log_dir: Path
) -> None:
    """Two instances have the key cached; after `tandem keys revoke` both refuse it within
    REVOCATION_BOUND seconds (the cache's TTL plus one lookup)."""
    assert Settings().auth_cache_ttl < REVOCATION_BOUND
    made = tandem(database_url, "keys", "create", "--name", "leaving", "--scope", "wallet:read")
    token = made.stdout.strip().splitlines()[-1]
    servers = start_servers(database_url, log_dir, 2)
    headers = {"Authorization": f"Bearer {token}"}
    try:
        for server in servers:
            assert httpx.get(f"{server.url}/balance/1", headers=headers).status_code == 200
        assert tandem(database_url, "keys", "revoke", "leaving").returncode == 0
        revoked_at = time.monotonic()
        refused: dict[str, float] = {}

        def all_refuse() -> bool:
            for server in servers:
                if server.url not in refused:
                    status = httpx.get(f"{server.url}/balance/1", headers=headers).status_code
                    if status == 401:
                        refused[server.url] = time.monotonic() - revoked_at
            return len(refused) == len(servers)

        wait_for(all_refuse, timeout=REVOCATION_BOUND, step=0.05)
        print(f"revocation latency per instance: {sorted(refused.values())}")
    finally:
        for server in servers:
            server.stop()


def test_a_fresh_local_start_makes_and_prints_a_development_key(tmp_path: Path) -> None:
    """`tandem serve` with the embedded database and no key configured (what `make run`
    does on a fresh clone): it makes a key under the data folder (mode 0600), prints it with
    a curl line, and that key works while no key is anonymous; a second start reuses it and
    does not print it, only the file it is in (a kept log holds it once)."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("TANDEM_API_KEY", "TANDEM_DATABASE_URL")
    }
    env |= {"TANDEM_DATA_DIR": str(tmp_path / "data"), "TANDEM_SCHEDULER_ENABLED": "false"}
    log = tmp_path / "serve.log"
    for start in range(2):
        # A port of its own each start: the first start's port, free again once it stopped,
        # may be taken by another test's server in between.
        port = free_port()
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "tandem", "serve", "--port", str(port)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
        try:
            wait_for(partial(_printed_or_exited, process, log), 60, "the key's curl line")
            key_file = tmp_path / "data" / "dev-key"
            token = key_file.read_text().strip()
            assert key_file.stat().st_mode & 0o777 == 0o600
            printed = log.read_text()
            assert f"plain HTTP on 127.0.0.1:{port} (loopback only" in printed
            if start == 0:
                first = token
                assert f"curl -H 'Authorization: Bearer {token}' http://127.0.0.1:{port}/" in (
                    printed
                )
            else:
                assert token not in printed
                assert f'curl -H "Authorization: Bearer $(cat {key_file})" ' in printed
            assert token == first
            url = f"http://127.0.0.1:{port}/balance/1"
            wait_for(partial(_answers, url, token), 30)
            assert httpx.get(url).status_code == 401
        finally:
            process.terminate()
            process.wait(30)


def _printed_or_exited(process: subprocess.Popen[bytes], log: Path) -> bool:
    """The start printed its key's curl line; a start that ended instead fails at once, with
    its log (not after the whole wait)."""
    printed = log.read_text(errors="replace")
    assert process.poll() is None, f"tandem serve exited {process.returncode}:\n{printed}"
    return "Authorization: Bearer" in printed


def _answers(url: str, token: str) -> bool:
    try:
        return httpx.get(url, headers={"Authorization": f"Bearer {token}"}).is_success
    except httpx.TransportError:
        return False
