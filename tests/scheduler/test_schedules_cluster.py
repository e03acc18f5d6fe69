"""Schedules as data across real server processes: made on one instance, run by any; changed
on another, live at the next claim; deleted and made again; a rolling deploy where one
instance lacks the task; the owner of API schedules' runs SIGKILLed; the claimers woken by
the database, and still claiming once their listening connection is terminated."""

from __future__ import annotations

import signal
from datetime import datetime
from pathlib import Path
from typing import Any

from tests.scheduler.cluster import instances_of, stop_all
from tests.support import (
    API_KEY,
    Server,
    http_get,
    http_post,
    http_request,
    query,
    run_tandem,
    start_servers,
    wait_for,
)
from tests.support.registries import scheduler_env

LABEL = "probe.label"


def create(server: Server, name: str, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "task": LABEL, "params": {"label": name}, "every": 3600, **fields}
    made = http_post(f"{server.url}/schedules", json=body)
    assert made.status_code == 201, made.text
    shown: dict[str, Any] = made.json()
    return shown


def runs(url: str, name: str) -> list[Any]:
    """The runs of the live schedule ``name``, oldest first, from the database."""
    return query(
        url,
        "SELECT h.* FROM task_history h JOIN tasks t ON t.id = h.task_id "
        "WHERE t.name = $1 ORDER BY h.started_at",
        name,
    )


def created_at(url: str, name: str) -> datetime:
    at: datetime = query(
        url,
        "SELECT a.created_at FROM task_actions a JOIN tasks t ON t.id = a.task_id "
        "WHERE t.name = $1 AND a.action = 'create'",
        name,
    )[0]["created_at"]
    return at


def test_schedules_live_across_instances(cron_db: str, tmp_path: Path) -> None:
    """Three instances, the third of the release before probe.label. Made on A: run by A or
    B with its params; changed on B: the next run goes by version 2; deleted and made again
    before its next slot: the new definition runs; C never runs any of them, and a schedule
    whose task no live instance has shows orphaned; the owner of a long run SIGKILLed: the
    run is lost and retried on the other, with its params."""
    current = start_servers(cron_db, tmp_path, 2, extra_env=scheduler_env("catalog"))
    before = start_servers(cron_db, tmp_path, 1, extra_env=scheduler_env("catalog_before"))
    a, b = current
    try:
        ids = instances_of(cron_db, [*current, *before], 1.0)
        create(a, "nightly-42", every=1)
        wait_for(lambda: any(r["status"] == "succeeded" for r in runs(cron_db, "nightly-42")), 20)
        first = runs(cron_db, "nightly-42")[0]
        assert first["instance_id"] in ids[:2]
        assert (first["schedule_version"], first["trigger"]) == (1, "schedule")
        changed = http_request(
            "PATCH",
            f"{b.url}/schedules/nightly-42",
            json={"params": {"label": "changed"}},
            headers={"If-Match": "1"},
        )
        assert changed.status_code == 200, changed.text
        wait_for(lambda: any(r["schedule_version"] == 2 for r in runs(cron_db, "nightly-42")), 20)
        assert all(
            r["params"] == '{"label": "changed", "seconds": 0.0}'
            for r in runs(cron_db, "nightly-42")
            if r["schedule_version"] == 2
        )

        create(b, "remade", params={"label": "old"})
        wait_for(lambda: runs(cron_db, "remade"), 20)
        deleted = http_request("DELETE", f"{a.url}/schedules/remade")
        assert deleted.status_code == 204, deleted.text
        create(a, "remade", params={"label": "new"}, every=1)
        wait_for(lambda: len(runs(cron_db, "remade")) >= 2, 20)
        assert all('"new"' in r["params"] for r in runs(cron_db, "remade"))

        for n in range(20):
            create(a, f"spread-{n}", every=1)
        wait_for(lambda: len(runs(cron_db, "spread-19")) >= 3, 30)
        on_before = query(
            cron_db,
            "SELECT count(*) AS n FROM task_history WHERE instance_id = $1",
            ids[2],
        )[0]["n"]
        assert on_before == 0, "the instance without the task ran one of its schedules"
        query(
            cron_db,
            'INSERT INTO tasks (name, task, source, "interval", function_name) '
            "VALUES ('lost-task', 'gone.task', 'api', '1 hour', 'x')",
        )
        shown = http_get(f"{before[0].url}/schedules/lost-task").json()
        assert shown["state"] == "orphaned"
        assert http_get(f"{a.url}/schedules/spread-0").json()["state"] == "active"

        _run_now_on_the_other_instance_follows_the_overlap_policy(cron_db, current, ids[:2])

        create(a, "long", params={"label": "long", "seconds": 60})
        wait_for(lambda: any(r["status"] == "running" for r in runs(cron_db, "long")), 20)
        owner_id = next(r["instance_id"] for r in runs(cron_db, "long"))
        owner = current[ids.index(owner_id)]
        owner.stop(signal.SIGKILL)
        survivor_id = ids[1 - ids.index(owner_id)]
        wait_for(
            lambda: any(
                r["status"] == "running" and r["instance_id"] == survivor_id
                for r in runs(cron_db, "long")
            ),
            30,
        )
        lost, retried = runs(cron_db, "long")[:2]
        assert (lost["status"], lost["instance_id"]) == ("lost", owner_id)
        assert (retried["trigger"], retried["attempt"], retried["params"]) == (
            "retry",
            2,
            lost["params"],
        )
    finally:
        stop_all([*current, *before])


def _run_now_on_the_other_instance_follows_the_overlap_policy(
    url: str, servers: list[Server], ids: list[str]
) -> None:
    """A run-now with params sent to the instance that does not run the schedule's run:
    skip refuses it; buffer_one runs it after the run going; cancel_other has the owner stop
    its run (woken by NOTIFY) and runs the new one. Never two at once."""
    for overlap in ("skip", "buffer_one", "cancel_other"):
        name = f"ov-{overlap}"
        seconds = 2 if overlap == "buffer_one" else 60
        create(servers[0], name, params={"label": "long", "seconds": seconds}, overlap=overlap)
        wait_for(lambda n=name: any(r["status"] == "running" for r in runs(url, n)), 20)
        owner = runs(url, name)[0]["instance_id"]
        other = servers[1 - ids.index(owner)]
        asked = http_post(f"{other.url}/schedules/{name}/run", json={"params": {"label": "now"}})
        if overlap == "skip":
            assert (asked.status_code, asked.json()["error"]["code"]) == (409, "already_running")
            continue
        assert asked.status_code == 200, asked.text
        wait_for(lambda n=name: len([r for r in runs(url, n) if r["finished_at"]]) >= 2, 30)
        first, then = runs(url, name)[:2]
        expected = "succeeded" if overlap == "buffer_one" else "cancelled"
        assert (first["status"], then["trigger"]) == (expected, "manual")
        assert '"now"' in then["params"]
        assert then["started_at"] >= first["finished_at"]


def test_claimers_are_woken_and_still_claim_without_their_listener(
    cron_db: str, tmp_path: Path
) -> None:
    """At a poll of 8 s, a schedule made on one instance starts within half a poll on
    either (the claimers are woken by NOTIFY); with every listening connection terminated
    (pg_terminate_backend), a schedule made then still starts (a new session listens again,
    and the poll stays the fallback)."""
    poll = 8.0
    env = scheduler_env("catalog", TANDEM_SCHEDULER_POLL_INTERVAL=str(poll))
    servers = start_servers(cron_db, tmp_path, 2, extra_env=env)
    try:
        instances_of(cron_db, servers, 5.0)
        # Past the first polls after the join (those claim what is due at once anyway).
        create(servers[0], "warm-up")
        wait_for(lambda: runs(cron_db, "warm-up"), 2 * poll)
        create(servers[0], "woken")
        wait_for(lambda: runs(cron_db, "woken"), poll)
        lag = (
            runs(cron_db, "woken")[0]["started_at"] - created_at(cron_db, "woken")
        ).total_seconds()
        print(f"made to started, woken: {lag * 1000:.0f} ms (poll {poll:g} s)")
        assert lag < poll / 2, "started at a poll, not woken"
        cut = query(
            cron_db,
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE application_name = 'tandem-heartbeat' AND datname = current_database()",
        )
        assert cut, "no listening connection found"
        create(servers[1], "after-cut")
        wait_for(lambda: runs(cron_db, "after-cut"), 3 * poll)
        lag = (
            runs(cron_db, "after-cut")[0]["started_at"] - created_at(cron_db, "after-cut")
        ).total_seconds()
        print(f"made to started, listeners terminated: {lag * 1000:.0f} ms")
        _the_cli_manages_schedules(cron_db, servers[0])
    finally:
        stop_all(servers)


def _the_cli_manages_schedules(url: str, server: Server) -> None:
    """`tandem schedule create | list | pause | resume | run | delete` against a running
    server, with the suite's key: each does what its route does, and a refusal is the
    server's message on stderr with exit code 1."""

    def cli(*args: str) -> str:
        done = run_tandem("schedule", *args, "--url", server.url, TANDEM_API_KEY=API_KEY)
        assert done.returncode == 0, done.stderr
        return done.stdout

    made = cli(
        "create", "from-cli", "--task", LABEL, "--every", "3600", "--params", '{"label": "c"}'
    )
    assert "version=1" in made
    assert "from-cli" in cli("list", "--source", "api")
    assert "state=paused" in cli("pause", "from-cli", "--note", "by hand")
    assert "state=active" in cli("resume", "from-cli")
    cli("run", "from-cli", "--params", '{"label": "now"}')
    wait_for(lambda: any('"now"' in r["params"] for r in runs(url, "from-cli")), 20)
    assert "deleted" in cli("delete", "from-cli")
    refused = run_tandem(
        "schedule", "delete", "from-cli", "--url", server.url, TANDEM_API_KEY=API_KEY
    )
    assert refused.returncode == 1
    assert "404 schedule_not_found" in refused.stderr
