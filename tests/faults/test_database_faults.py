"""The database failing under real instances: restarts under a burst, an outage of seconds, a
keyed burst settled by retries, and a silent partition of one instance. Each test owns its
PostgreSQL (tests/faults/postgres.py), never the suite's or the machine's."""

from __future__ import annotations

import asyncio
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.faults.common import (
    ANSWER_BOUND,
    CRON_ENV,
    DB_CODES,
    FAULT_ENV,
    assert_honest,
    balance_of,
    burst_across,
    create_user,
    ran_since,
    settle_by_retry,
    stale_running,
    withdrawal,
)
from tests.faults.postgres import ThrowawayPostgres, throwaway_postgres
from tests.faults.proxy import partition_proxy
from tests.support import (
    LEASE,
    Server,
    batched,
    fresh_database,
    http_get,
    http_post,
    http_request,
    query,
    start_server,
    start_servers,
    wait_for,
)


@pytest.fixture
def pg() -> Iterator[ThrowawayPostgres]:
    with throwaway_postgres() as server:
        yield server


@pytest.fixture
def pg_url(pg: ThrowawayPostgres) -> Iterator[str]:
    with fresh_database(pg.url) as url:
        yield url


def start_instances(url: str, log_dir: Path, n: int, env: dict[str, str]) -> list[Server]:
    return start_servers(url, log_dir, n, extra_env=env)


def slow_commits(url: str, table: str, seconds: float) -> None:
    """Fault injection: every COMMIT that inserted rows into ``table`` spends ``seconds`` per
    row in a deferred trigger, so a fault finds transactions in flight, many inside their
    COMMIT (the one moment whose outcome the client cannot know), however fast the burst."""
    query(
        url,
        "CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS "
        f"$$ BEGIN PERFORM pg_sleep({seconds}); RETURN NULL; END $$",
    )
    query(
        url,
        f"CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON {table} "
        "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit()",
    )


def test_fast_restart_under_burst_never_answers_500(
    pg: ThrowawayPostgres, pg_url: str, log_dir: Path
) -> None:
    """PostgreSQL restarted (fast) a quarter into 10000 withdrawals on three instances (in
    group-commit batches): no 500, every 503 says which kind it is, no acknowledged
    withdrawal is lost, and an 'unknown' is the only way a withdrawal may have been applied
    without a 200. (The keyed test below restarts in immediate mode, a crash, under the same
    burst.)"""
    # 1 ms per journal entry: the 10000 on one user take at least 10 s, so the restart, after
    # 2500 answers, always finds work in flight (group commit alone finishes the rest in well
    # under a second, and once did before the restart took effect).
    slow_commits(pg_url, "ledger_entries", 0.001)
    servers = start_instances(pg_url, log_dir, 3, FAULT_ENV)
    try:
        user = create_user(pg_url, 10_000)
        requests = [(i % 3, withdrawal(servers[i % 3], user)) for i in range(10_000)]
        restart = lambda: pg.restart("fast")  # noqa: E731  (the fault, named)
        results = asyncio.run(burst_across(servers, requests, restart, after_answers=2500))
        counts = assert_honest(results)
        print(f"fast restart under the burst: {counts}")
        acknowledged = counts.get("200", 0)
        unknown = counts.get("outcome_unknown", 0)
        final = balance_of(pg_url, user)
        assert final <= 10_000 - 2 * acknowledged, "an acknowledged withdrawal was lost"
        assert final >= 10_000 - 2 * (acknowledged + unknown), "applied without being told"
        assert counts.get("database_unavailable", 0) + unknown > 0, "the restart hit nothing"
        for server in servers:
            assert http_get(f"{server.url}/balance/{user}", timeout=10).status_code == 200
        assert sum(batched(server.url) for server in servers) > 0, "no batch formed"
    finally:
        for server in servers:
            server.stop()
    for server in servers:
        assert "internal_error" not in server.log(), server.log()


def test_keyed_retries_settle_every_unknown_exactly_once(
    pg: ThrowawayPostgres, pg_url: str, log_dir: Path
) -> None:
    """A keyed burst (in group-commit batches) cut by an immediate restart while COMMITs are
    in flight: no 500, some answers are outcome_unknown; retrying exactly the 503s with their
    keys settles every one, and the balances are as if each withdrawal had been applied
    once."""
    # 10 ms per claimed key (without it, two of three restarts produced no 'unknown' at all).
    slow_commits(pg_url, "idempotency_keys", 0.01)
    servers = start_instances(pg_url, log_dir, 3, FAULT_ENV)
    try:
        # Ten users, so that many transactions are inside their COMMIT at once (on one user
        # they would queue on its row lock, one COMMIT at a time).
        users = [create_user(pg_url, 1000) for _ in range(10)]
        keys = [f"w-{uuid.uuid4().hex}" for _ in range(10_000)]
        requests = [
            (i % 3, withdrawal(servers[i % 3], users[i % 10], keys[i])) for i in range(10_000)
        ]
        restart = lambda: pg.restart("immediate")  # noqa: E731  (the fault, named)
        results = asyncio.run(burst_across(servers, requests, restart, after_answers=2500))
        counts = assert_honest(results)
        print(f"keyed burst: {counts}")
        assert counts.get("outcome_unknown", 0) > 0, counts
        final = settle_by_retry(servers, requests, results)
        assert final.count(200) == 5000, {s: final.count(s) for s in set(final)}
        assert final.count(409) == 5000
        assert [balance_of(pg_url, user) for user in users] == [0] * 10
        assert sum(batched(s.url, "keyed_change") for s in servers) > 0, "no batch formed"
    finally:
        for server in servers:
            server.stop()


def test_outage_of_ten_seconds_heals_by_itself(
    pg: ThrowawayPostgres, pg_url: str, log_dir: Path
) -> None:
    """PostgreSQL stopped for 10 s: the instances answer 503 (and not ready) meanwhile; once
    it is back, the first request on every route of every instance succeeds, the cron runs
    again and no task is left marked running. Nothing is restarted but PostgreSQL."""
    servers = start_instances(pg_url, log_dir, 2, CRON_ENV)
    try:
        user = http_post(f"{servers[0].url}/users", json={"balance": 100}).json()["userId"]
        wait_for(lambda: ran_since(pg_url, None) >= 3, 30)
        pg.stop("fast")
        stopped = time.monotonic()
        for server in servers:
            ready = http_get(f"{server.url}/health/ready", timeout=ANSWER_BOUND)
            assert ready.status_code == 503
            for method, path, body in [
                ("GET", f"/balance/{user}", None),
                ("POST", "/balance/update", {"userId": user, "amount": 1}),
                ("GET", "/tasks", None),
            ]:
                answer = http_request(method, server.url + path, json=body, timeout=ANSWER_BOUND)
                assert answer.status_code == 503, answer.text
                # Nothing could even connect: certainly not applied.
                assert answer.json()["error"]["code"] == "database_unavailable", answer.text
                assert answer.headers["Retry-After"] == "1"
        time.sleep(max(0.0, 10 - (time.monotonic() - stopped)))
        pg.start()
        back = time.monotonic()
        for server in servers:
            for method, path, body in [
                ("GET", "/health/ready", None),
                ("GET", f"/balance/{user}", None),
                ("POST", "/balance/update", {"userId": user, "amount": 1}),
                ("POST", "/users", {"balance": 5}),
                ("GET", "/tasks", None),
                ("GET", "/instances", None),
                ("GET", "/tasks/Tick/history", None),
                ("POST", "/tasks/Tick/run", None),
                ("GET", "/", None),
                ("GET", "/status/fragment", None),
            ]:
                answer = http_request(method, server.url + path, json=body, timeout=ANSWER_BOUND)
                # Run-now on a task running at that moment is refused (409 task_running).
                running = path.endswith("/run") and answer.status_code == 409
                assert answer.status_code in (200, 201) or running, (
                    f"{method} {path}: {answer.text}"
                )
        print(f"every route answered 2xx {time.monotonic() - back:.2f} s after PostgreSQL was back")
        assert balance_of(pg_url, user) == 102
        since = query(pg_url, "SELECT clock_timestamp() AS t")[0]["t"]
        wait_for(lambda: ran_since(pg_url, since) >= 3, 30)
        # Runs cut by the outage are swept as lost within a lease: none stays 'running'.
        wait_for(lambda: not stale_running(pg_url), 3 * LEASE + 10)
    finally:
        for server in servers:
            assert server.stop() == 0, server.log()


def test_silent_partition_of_one_instance(
    pg: ThrowawayPostgres, pg_url: str, log_dir: Path
) -> None:
    """One instance cut off by a proxy that stops forwarding without closing anything: its API
    answers 503 within its deadlines while the other instance serves on, it heals by itself
    when the partition ends, and SIGTERM while cut off exits cleanly within the stop grace."""
    with partition_proxy("127.0.0.1", pg.port) as proxy:
        direct = start_server(pg_url, log_dir, extra_env=CRON_ENV)
        cut = start_server(proxy.url_for(pg_url), log_dir, extra_env=CRON_ENV)
        try:
            user = http_post(f"{direct.url}/users", json={"balance": 100}).json()["userId"]
            assert http_get(f"{cut.url}/balance/{user}").status_code == 200
            assert http_get(f"{cut.url}/tasks").status_code == 200
            proxy.partition()
            for method, path, body, codes in [
                ("GET", f"/balance/{user}", None, {"database_unavailable"}),
                ("POST", "/balance/update", {"userId": user, "amount": 1}, DB_CODES),
                ("GET", "/tasks", None, {"database_unavailable"}),
            ]:
                started = time.monotonic()
                answer = http_request(method, cut.url + path, json=body, timeout=ANSWER_BOUND)
                took = time.monotonic() - started
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["code"] in codes, answer.text
                print(f"cut off: {method} {path} answered 503 in {took:.1f} s")
            assert http_get(f"{cut.url}/health/ready", timeout=ANSWER_BOUND).status_code == 503
            # The other instance is not held up by the cut one's sessions.
            assert http_get(f"{direct.url}/balance/{user}", timeout=5).status_code == 200
            update = {"userId": user, "amount": 1}
            assert http_post(f"{direct.url}/balance/update", json=update).status_code == 200

            proxy.heal()
            healed = time.monotonic()
            wait_for(lambda: answers(cut, f"/balance/{user}") == 200, 30)
            wait_for(lambda: answers(cut, "/tasks") == 200, 30)
            print(f"healed by itself {time.monotonic() - healed:.1f} s after the partition ended")

            proxy.partition()
            time.sleep(1)
            stopping = time.monotonic()
            code = cut.stop(signal.SIGTERM, timeout=25)
            print(f"SIGTERM while cut off: exit {code} after {time.monotonic() - stopping:.1f} s")
            assert code == 0, cut.log()
        finally:
            proxy.heal()
            cut.stop()
            direct.stop()


def answers(server: Server, path: str) -> int:
    try:
        return http_get(server.url + path, timeout=ANSWER_BOUND).status_code
    except httpx.HTTPError:
        return 0
