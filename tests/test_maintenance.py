"""Housekeeping on the cluster cron (tandem/maintenance.py), the app in process with its
scheduler on in compressed time: old task runs and idempotency keys are deleted in batches by
the pruning statements, recent ones are kept, overdue holds are released and their gauges
exported, and the housekeeping tasks are ordinary tasks with their own history. (What needs
a process, the cron across instances, is tests/scheduler/'s.)"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from tandem.core.locks import LEDGER_VERIFICATION
from tandem.maintenance import (
    EXPIRE_HOLDS_TASK,
    PRUNE_HISTORY_TASK,
    PRUNE_KEYS_TASK,
    VERIFY_LEDGER_TASK,
)
from tests.support import (
    app_settings,
    assert_error,
    eventually,
    fetch,
    fresh_database,
    holding,
    in_process_client,
    new_user,
    query,
    sample_value,
    until,
)
from tests.support.registries import scheduler_settings

OLD = 5  # rows of each kind past the retention: three batches of 2
RETENTION = 600.0
# What each pruning run logs it deleted.
WHAT = ("finished task runs", "idempotency keys")


@pytest.fixture
def seeded(postgres_url: str) -> Iterator[str]:
    """A migrated database holding, for a task no instance runs, OLD runs that ended an hour
    ago, one that ended now and one still running; and OLD keys an hour old and one fresh."""
    with fresh_database(postgres_url) as url:
        task_id = query(
            url,
            "INSERT INTO tasks (name, interval, function_name, next_run_at) "
            "VALUES ('Retired', '1 day', 'gone.retired', now() + interval '1 year') RETURNING id",
        )[0]["id"]
        for fence in range(1, OLD + 1):
            query(
                url,
                "INSERT INTO task_history (task_id, instance_id, fence, scheduled_for, "
                "started_at, finished_at, status) VALUES ($1, 'gone', $2, "
                "now() - interval '1 hour' - $3 * interval '1 minute', "
                "now() - interval '1 hour' - $3 * interval '1 minute', "
                "now() - interval '1 hour' - $3 * interval '1 minute' + interval '1 second', "
                "'succeeded')",
                task_id,
                fence,
                float(fence),
            )
            query(
                url,
                "INSERT INTO idempotency_keys (key, user_id, amount, outcome, created_at) "
                "VALUES ($1, 1, -1, 'ok', now() - interval '1 hour')",
                f"old-{fence}",
            )
        query(
            url,
            "INSERT INTO task_history (task_id, instance_id, fence, scheduled_for, started_at, "
            "finished_at, status) VALUES ($1, 'gone', $2, now() - interval '2 seconds', "
            "now() - interval '2 seconds', now() - interval '1 second', 'failed')",
            task_id,
            OLD + 1,
        )
        query(
            url,
            "INSERT INTO task_history (task_id, instance_id, fence, scheduled_for, started_at, "
            "status) VALUES ($1, 'gone', $2, now(), now(), 'running')",
            task_id,
            OLD + 2,
        )
        query(
            url,
            "INSERT INTO idempotency_keys (key, user_id, amount, outcome) "
            "VALUES ('fresh', 1, -1, 'ok')",
        )
        # Applied before the journal kept keys (its balance stored, no entry): the only record
        # of that key, kept however old.
        query(
            url,
            "INSERT INTO idempotency_keys (key, user_id, amount, outcome, balance, created_at) "
            "VALUES ('legacy', 1, -1, 'ok', 9999, now() - interval '1 hour')",
        )
        # Browser sessions: ended and expired over a day ago (pruned), live and ended now (kept).
        key_id = query(
            url,
            "INSERT INTO api_keys (name, token_sha256, scopes) "
            "VALUES ('browser', sha256('browser'), '{wallet:read}') RETURNING id",
        )[0]["id"]
        for name, expires, ended in (
            ("ended-long-ago", "1 hour", "-2 days"),
            ("expired-long-ago", "-2 days", None),
            ("live", "1 hour", None),
            ("ended-now", "1 hour", "0 seconds"),
        ):
            query(
                url,
                "INSERT INTO browser_sessions (token_sha256, api_key_id, expires_at, ended_at) "
                "VALUES (sha256($1::bytea), $2, now() + $3::text::interval, "
                "now() + $4::text::interval)",
                name.encode(),
                key_id,
                expires,
                ended,
            )
        yield url


@pytest.fixture
async def app(seeded: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process on the seeded database, its housekeeping due every second, deleting
    two rows a batch."""
    housekeeping = {
        "maintenance_enabled": True,
        "maintenance_interval": 1,
        "maintenance_batch": 2,
        "history_retention": RETENTION,
        "idempotency_retention": RETENTION,
    }
    settings = app_settings(seeded, **{**scheduler_settings("quiet"), **housekeeping})
    async with in_process_client(settings) as client:
        yield client


async def test_old_rows_are_pruned_and_recent_ones_kept(
    app: httpx.AsyncClient, seeded: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Runs that ended and keys created before the retention are deleted, all five by one run
    in batches of two; the run that ended a second ago, the running one, the fresh key and a
    key applied before the journal kept keys stay. Browser sessions ended or expired over a
    day ago are deleted too; a live one and one ended now stay."""
    caplog.set_level(logging.INFO)

    async def pruned() -> bool:
        old_runs = await fetch(
            seeded,
            "SELECT count(*) AS n FROM task_history h JOIN tasks t ON t.id = h.task_id "
            "WHERE t.name = 'Retired' AND h.finished_at < now() - interval '30 minutes'",
        )
        old_keys = await fetch(
            seeded, "SELECT count(*) AS n FROM idempotency_keys WHERE key LIKE 'old-%'"
        )
        old_sessions = await fetch(
            seeded,
            "SELECT count(*) AS n FROM browser_sessions WHERE expires_at < now() "
            "OR ended_at < now() - interval '1 day'",
        )
        return old_runs[0]["n"] == 0 and old_keys[0]["n"] == 0 and old_sessions[0]["n"] == 0

    await until(pruned, 20)
    kept = await fetch(
        seeded,
        "SELECT h.status FROM task_history h JOIN tasks t ON t.id = h.task_id "
        "WHERE t.name = 'Retired' ORDER BY h.fence",
    )
    assert [r["status"] for r in kept] == ["failed", "running"]
    keys = await fetch(seeded, "SELECT key FROM idempotency_keys ORDER BY key")
    assert [r["key"] for r in keys] == ["fresh", "legacy"]
    # The sessions ended or expired over a day ago are deleted; the others stay.
    sessions = await fetch(seeded, "SELECT count(*) FROM browser_sessions")
    assert sessions[0][0] == 2

    # Logged by the run after its last batch (a moment after the rows are gone): one run
    # deleted all five, in batches of two (2 + 2 + 1).
    async def logged() -> bool:
        return all(f"deleted {OLD} {what}" in caplog.text for what in WHAT)

    await until(logged, 10)


async def test_housekeeping_tasks_are_ordinary_tasks(app: httpx.AsyncClient) -> None:
    """The housekeeping tasks are listed by GET /tasks, next to the registry's own, and their
    runs succeed and are recorded in their history."""
    housekeeping = (PRUNE_HISTORY_TASK, PRUNE_KEYS_TASK, VERIFY_LEDGER_TASK, EXPIRE_HOLDS_TASK)
    wanted = {*housekeeping, "Quick"}

    async def listed() -> bool:
        names = {t["name"] for t in (await app.get("/tasks")).json()["tasks"]}
        return wanted <= names

    await until(listed, 15)
    for name in housekeeping:

        async def succeeded(task: str = name) -> bool:
            runs = (await app.get(f"/tasks/{task}/history")).json()["runs"]
            return any(r["status"] == "succeeded" for r in runs)

        await until(succeeded, 15)


VERIFIED = "tandem_ledger_verified_timestamp_seconds"


async def metric(app: httpx.AsyncClient, name: str) -> float | None:
    return sample_value((await app.get("/metrics")).text, name)


async def test_ledger_verification_exports_what_it_finds(
    app: httpx.AsyncClient, seeded: str
) -> None:
    """The hourly verification runs as a task: 0 mismatches on a sound ledger; after a balance
    and a held amount are changed behind the journal's back, the next run exports 2 (the
    holds' checks are the task's too)."""
    # The gauges are this process's: an earlier test's app may have set them. A run of this
    # app moves the timestamp past the moment it started.
    started = (await fetch(seeded, "SELECT extract(epoch FROM now()) AS t"))[0]["t"]

    async def verified() -> bool:
        return (await metric(app, VERIFIED) or 0.0) >= float(started)

    await until(verified, 15)
    assert await metric(app, "tandem_ledger_mismatches") == 0
    await fetch(seeded, "UPDATE users SET balance = balance + 1, held = held + 1 WHERE id = 1")

    async def run_asked() -> bool:
        # Refused (409) while a run of it is in progress: asked again once that ends.
        run = await app.post(f"/tasks/{VERIFY_LEDGER_TASK}/run")
        assert run.status_code in (200, 409), run.text
        return run.status_code == 200

    await until(run_asked, 15)

    async def mismatch() -> bool:
        return await metric(app, "tandem_ledger_mismatches") == 2

    await until(mismatch, 15)


async def test_a_verification_is_skipped_while_another_runs(
    app: httpx.AsyncClient, seeded: str, caplog: pytest.LogCaptureFixture
) -> None:
    """While a verification holds its lock (`tandem ledger verify`, say), the cron's run
    skips with a warning instead of scanning the ledger a second time; once that one has
    ended, the next run verifies."""
    caplog.set_level(logging.INFO)
    async with holding(seeded, "SELECT pg_advisory_xact_lock($1)", LEDGER_VERIFICATION):
        await eventually(
            lambda: "ledger verification skipped: another one is running" in caplog.text, 15
        )
        assert "ledger verified" not in caplog.text
    await eventually(lambda: "ledger verified" in caplog.text, 15)


async def test_run_now_is_refused_while_the_task_runs(app: httpx.AsyncClient, seeded: str) -> None:
    """Asked to run while a run of it is in progress (a verification held up by a lock on the
    journal here), the verification is refused (409 task_running), not queued behind it: a
    client asking in a loop cannot chain full scans back to back."""
    async with holding(seeded, "LOCK TABLE ledger_entries IN ACCESS EXCLUSIVE MODE"):

        async def running() -> bool:
            tasks = (await app.get("/tasks")).json()["tasks"]
            return any(t["name"] == VERIFY_LEDGER_TASK and t["is_running"] for t in tasks)

        await until(running, 15)
        refused = await app.post(f"/tasks/{VERIFY_LEDGER_TASK}/run")
        assert_error(refused, 409, "task_running")
        actions = (await app.get(f"/tasks/{VERIFY_LEDGER_TASK}/history")).json()["actions"]
        assert actions == []  # a refused command leaves no audit row


# --- holds ----------------------------------------------------------------------------------


@pytest.fixture
async def holds_app(own_database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process on a fresh database, running only the housekeeping tasks, in time
    compressed fivefold: tandem.expire_holds every second."""
    housekeeping = {"maintenance_enabled": True, "scheduler_time_scale": 0.2}
    settings = app_settings(
        own_database_url, **{**scheduler_settings("housekeeping"), **housekeeping}
    )
    async with in_process_client(settings) as client:
        yield client


async def hold_status(url: str, hold: int) -> str:
    return str((await fetch(url, "SELECT status FROM holds WHERE id = $1", hold))[0]["status"])


async def database_now(url: str) -> float:
    return float((await fetch(url, "SELECT extract(epoch FROM now()) AS t"))[0]["t"])


async def test_an_expired_hold_of_an_idle_user_is_released(
    holds_app: httpx.AsyncClient, own_database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A hold past its expiry, of a user who never spends again (nothing else would release
    it), is released by tandem.expire_holds: its state becomes expired, the user's held
    amount drops back to 0 and the event is 'expired', made by no API key."""
    caplog.set_level(logging.INFO)
    url = own_database_url
    expired_before = await metric(holds_app, "tandem_wallet_holds_expired_total") or 0.0
    user = await new_user(holds_app, 100)
    made = await holds_app.post("/holds", json={"userId": user, "amount": 30, "expiresIn": 1})
    assert made.status_code == 201, made.text
    hold = made.json()["holdId"]
    held = (await holds_app.get(f"/balance/{user}")).json()
    assert (held["held"], held["available"]) == (30, 70)

    async def expired() -> bool:
        return await hold_status(url, hold) == "expired"

    await until(expired, 20)
    balance = (await holds_app.get(f"/balance/{user}")).json()
    assert balance == {"userId": user, "balance": 100, "held": 0, "available": 100}
    events = await fetch(
        url, "SELECT kind, amount, api_key_id FROM hold_events WHERE hold_id = $1 ORDER BY id", hold
    )
    assert [(e["kind"], e["amount"]) for e in events] == [("created", 30), ("expired", 30)]
    assert events[1]["api_key_id"] is None
    await eventually(lambda: "released 1 expired holds" in caplog.text, 10)
    assert await metric(holds_app, "tandem_wallet_holds_expired_total") == expired_before + 1


async def test_hold_gauges_show_an_overdue_hold_until_it_is_released(
    holds_app: httpx.AsyncClient, own_database_url: str
) -> None:
    """While its user's row is locked (by a request of its own, say), an overdue hold is
    skipped by the task, not waited on, and exported as overdue with its age; once the lock
    is gone the task releases it and the gauges say so: overdue 0, age 0, expired 1."""
    url = own_database_url
    user = await new_user(holds_app, 100)
    made = await holds_app.post("/holds", json={"userId": user, "amount": 30, "expiresIn": 1})
    assert made.status_code == 201, made.text
    hold = made.json()["holdId"]
    # The gauges are this process's: an earlier test's app may have set them. A reading of
    # this app's is stamped after this instant.
    started = await database_now(url)

    async def read(since: float) -> dict[str, float] | None:
        text = (await holds_app.get("/metrics")).text
        if (sample_value(text, "tandem_wallet_holds_observed_timestamp_seconds") or 0) < since:
            return None
        found = {
            state: sample_value(text, "tandem_wallet_holds", state=state) or 0.0
            for state in ("active", "overdue", "captured", "released", "expired")
        }
        found["age"] = sample_value(text, "tandem_wallet_holds_overdue_age_seconds") or 0.0
        return found

    async with holding(url, "SELECT 1 FROM users WHERE id = $1 FOR UPDATE", user):

        async def overdue() -> bool:
            found = await read(started)
            return found is not None and found["overdue"] == 1 and found["age"] >= 1.0

        await until(overdue, 20)
        assert await hold_status(url, hold) == "active"  # skipped: its user is busy
        unlocked = await database_now(url)

    async def released() -> bool:
        return await read(unlocked) == {
            "active": 0,
            "overdue": 0,
            "captured": 0,
            "released": 0,
            "expired": 1,
            "age": 0,
        }

    await until(released, 20)
    assert await hold_status(url, hold) == "expired"
