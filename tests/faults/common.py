"""What the fault tests share: their settings, the withdrawal bursts they fire, and what they
check on every answer and on the cron's history."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from tandem.cli import raise_fd_limit
from tandem.loadtest.client import Result, parse_base_url, send_burst
from tests.support import API_KEY, CRON_TIMINGS, Server, query

# Short client-side deadlines, so a cut-off instance answers within seconds.
FAULT_ENV = {
    "TANDEM_DB_COMMAND_TIMEOUT": "3",
    "TANDEM_DB_CONNECT_TIMEOUT": "2",
}
CRON_ENV = {
    **CRON_TIMINGS,
    **FAULT_ENV,
    "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:plain",
}
DB_CODES = {"database_unavailable", "outcome_unknown"}
# A bound on any answer of a cut-off instance: two statement deadlines (a read is retried once)
# plus a connect deadline, with room for a loaded machine. Not a performance figure.
ANSWER_BOUND = 20.0


def code_of(result: Result) -> str | None:
    try:
        code: str = result.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        return None
    return code


def assert_honest(results: list[Result]) -> dict[str, int]:
    """Every answer is a 200, a 409 insufficient_funds or a 503 with one of the two database
    codes: never a 500, never no answer. Returns the counts by outcome."""
    counts: dict[str, int] = {}
    for result in results:
        assert result.error is None, f"no answer: {result.error!r}"
        if result.status == 503:
            outcome = code_of(result) or result.body.decode(errors="replace")
            assert outcome in DB_CODES, result.body
        elif result.status == 409:
            outcome = "409"
            assert code_of(result) == "insufficient_funds", result.body
        else:
            outcome = str(result.status)
            assert result.status == 200, result.body
        counts[outcome] = counts.get(outcome, 0) + 1
    return counts


def ran_since(url: str, since: object) -> int:
    count: int = query(
        url,
        "SELECT count(*) AS n FROM task_history WHERE status = 'succeeded' "
        "AND ($1::timestamptz IS NULL OR started_at > $1)",
        since,
    )[0]["n"]
    return count


def stale_running(url: str) -> list[object]:
    """Runs recorded as running whose lease has expired: stuck, if the sweeper left them."""
    return list(
        query(
            url,
            "SELECT h.id FROM task_history h JOIN tasks t ON t.id = h.task_id "
            "WHERE h.status = 'running' AND (NOT t.is_running OR t.fence <> h.fence "
            "OR t.lease_until < clock_timestamp() - interval '1 second')",
        )
    )


def create_user(url: str, balance: int) -> int:
    user_id: int = query(url, "INSERT INTO users (balance) VALUES ($1) RETURNING id", balance)[0][
        "id"
    ]
    return user_id


def balance_of(url: str, user_id: int) -> int:
    value: int = query(url, "SELECT balance FROM users WHERE id = $1", user_id)[0]["balance"]
    return value


def withdrawal(server: Server, user_id: int, key: str | None = None, amount: int = 2) -> bytes:
    """The bytes of one withdrawal request to ``server`` (with an Idempotency-Key if given)."""
    endpoint = parse_base_url(server.url, API_KEY)
    headers = {"Idempotency-Key": key} if key else None
    body = {"userId": user_id, "amount": -amount}
    return endpoint.request("POST", "/balance/update", body, headers=headers)


async def burst_across(
    servers: list[Server],
    requests: list[tuple[int, bytes]],
    fault: Callable[[], None] | None = None,
    after_answers: int = 0,
) -> list[Result]:
    """Send every request at once, each to its server (index into ``servers``); run ``fault``
    (in a thread, the burst going on) once ``after_answers`` answers have arrived. Results in
    the order of ``requests``."""
    raise_fd_limit()
    per_server: list[list[int]] = [[] for _ in servers]
    for position, (index, _) in enumerate(requests):
        per_server[index].append(position)
    answered = 0
    due = asyncio.Event()

    def count(_: Result) -> None:
        nonlocal answered
        answered += 1
        if answered >= after_answers:
            due.set()

    sends = [
        asyncio.create_task(
            send_burst(
                "127.0.0.1", server.port, [requests[p][1] for p in positions], None, 90, count
            )
        )
        for server, positions in zip(servers, per_server, strict=True)
    ]
    if fault is not None:
        await due.wait()
        await asyncio.to_thread(fault)
    results: list[Result | None] = [None] * len(requests)
    for positions, answers in zip(per_server, await asyncio.gather(*sends), strict=True):
        for position, answer in zip(positions, answers, strict=True):
            results[position] = answer
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


def settle_by_retry(
    servers: list[Server], requests: list[tuple[int, bytes]], results: list[Result]
) -> list[int]:
    """Resend the requests answered 503 or not at all (their instance gone), with the same
    keys, until none is; the final status of every request."""
    statuses = [503 if r.error is not None else r.status for r in results]
    for _ in range(30):
        pending = [i for i, status in enumerate(statuses) if status == 503]
        if not pending:
            return statuses
        retry = [requests[i] for i in pending]
        answers = asyncio.run(burst_across(servers, retry))
        assert_honest(answers)
        for i, answer in zip(pending, answers, strict=True):
            statuses[i] = answer.status
        time.sleep(0.5)
    raise AssertionError("503s still pending after 30 rounds of retries")
