"""Housekeeping on the cluster cron (tandem/maintenance.py), with a real server in compressed
time: old task runs and idempotency keys are deleted in batches, recent ones are kept, and
the housekeeping tasks are ordinary tasks with their own history."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tandem.maintenance import PRUNE_HISTORY_TASK, PRUNE_KEYS_TASK, VERIFY_LEDGER_TASK
from tests.support import (
    CRON_TIMINGS,
    Server,
    fresh_database,
    http_get,
    http_post,
    query,
    start_server,
    wait_for,
)

pytestmark = pytest.mark.slow

OLD = 5  # rows of each kind past the retention: three batches of 2
RETENTION = 600.0


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
        yield url


def start(url: str, log_dir: Path) -> Server:
    env = {
        **CRON_TIMINGS,
        "TANDEM_SCHEDULER_TASKS": "tests.scheduler.registries:quick",
        "TANDEM_MAINTENANCE_ENABLED": "true",
        "TANDEM_MAINTENANCE_INTERVAL": "1",
        "TANDEM_MAINTENANCE_BATCH": "2",
        "TANDEM_HISTORY_RETENTION": str(RETENTION),
        "TANDEM_IDEMPOTENCY_RETENTION": str(RETENTION),
        "TANDEM_LOG_LEVEL": "info",  # each run logs how many rows it deleted
    }
    return start_server(url, log_dir, extra_env=env)


def test_old_rows_are_pruned_and_recent_ones_kept(seeded: str, tmp_path: Path) -> None:
    """Runs that ended and keys created before the retention are deleted, all five by one run
    in batches of two; the run that ended a second ago, the running one, the fresh key and a
    key applied before the journal kept keys stay."""
    server = start(seeded, tmp_path)
    try:

        def pruned() -> bool:
            old_runs = query(
                seeded,
                "SELECT count(*) AS n FROM task_history h JOIN tasks t ON t.id = h.task_id "
                "WHERE t.name = 'Retired' AND h.finished_at < now() - interval '30 minutes'",
            )
            old_keys = query(
                seeded, "SELECT count(*) AS n FROM idempotency_keys WHERE key LIKE 'old-%'"
            )
            return old_runs[0]["n"] == 0 and old_keys[0]["n"] == 0

        wait_for(pruned, 20)
        kept = query(
            seeded,
            "SELECT h.status FROM task_history h JOIN tasks t ON t.id = h.task_id "
            "WHERE t.name = 'Retired' ORDER BY h.fence",
        )
        assert [r["status"] for r in kept] == ["failed", "running"]
        keys = query(seeded, "SELECT key FROM idempotency_keys ORDER BY key")
        assert [r["key"] for r in keys] == ["fresh", "legacy"]
        # Logged by the run after its last batch (a moment after the rows are gone).
        for what in ("finished task runs", "idempotency keys"):
            wait_for(lambda what=what: f"deleted {OLD} {what}" in server.log(), 10)
    finally:
        assert server.stop() == 0, server.log()[-2000:]


def test_housekeeping_tasks_are_ordinary_tasks(seeded: str, tmp_path: Path) -> None:
    """The housekeeping tasks are listed by GET /tasks, next to the registry's own, and their
    runs succeed and are recorded in their history."""
    server = start(seeded, tmp_path)
    try:
        names = {t["name"] for t in http_get(f"{server.url}/tasks").json()["tasks"]}
        deadline = time.monotonic() + 15
        while {PRUNE_HISTORY_TASK, PRUNE_KEYS_TASK, VERIFY_LEDGER_TASK, "Quick"} - names:
            assert time.monotonic() < deadline, names
            time.sleep(0.2)
            names = {t["name"] for t in http_get(f"{server.url}/tasks").json()["tasks"]}
        for name in (PRUNE_HISTORY_TASK, PRUNE_KEYS_TASK, VERIFY_LEDGER_TASK):

            def succeeded(task: str = name) -> bool:
                runs = http_get(f"{server.url}/tasks/{task}/history").json()["runs"]
                return any(r["status"] == "succeeded" for r in runs)

            wait_for(succeeded, 15)
    finally:
        assert server.stop() == 0, server.log()[-2000:]


def ledger_mismatches(server: Server) -> float | None:
    for line in http_get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("tandem_ledger_mismatches "):
            return float(line.split()[1])
    return None


def test_ledger_verification_exports_what_it_finds(seeded: str, tmp_path: Path) -> None:
    """The hourly verification runs as a task: 0 mismatches on a sound ledger; after a balance
    is changed behind the journal's back, the next run exports 1."""
    server = start(seeded, tmp_path)
    try:
        verified = "tandem_ledger_verified_timestamp_seconds"
        wait_for(lambda: f"{verified} 0.0" not in http_get(f"{server.url}/metrics").text, 15)
        assert ledger_mismatches(server) == 0
        query(seeded, "UPDATE users SET balance = balance + 1 WHERE id = 1")
        run = http_post(f"{server.url}/tasks/{VERIFY_LEDGER_TASK}/run")
        assert run.status_code == 200, run.text
        wait_for(lambda: ledger_mismatches(server) == 1, 15)
    finally:
        assert server.stop() == 0, server.log()[-2000:]
