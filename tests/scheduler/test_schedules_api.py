"""Schedules as data (/schedules) with the app in process and its scheduler on: create, read,
change (If-Match), delete, pause, resume and run now, what each refuses, and the runs they
lead to, with the params and version each ran with. (Across real processes:
test_schedules_cluster.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import httpx
import pytest

from tests.support import app_settings, in_process_client, until
from tests.support.registries import scheduler_settings

LABEL = "probe.label"


@pytest.fixture(scope="module")
async def app(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process with the scheduler on: the task probe.label (params, no code
    schedule) and the code schedule probe.coded."""
    settings = app_settings(database_url, **scheduler_settings("catalog"))
    async with in_process_client(settings) as client:

        async def joined() -> bool:
            shown = (await client.get("/schedules/probe.coded")).json()
            return bool(shown.get("state") == "active")

        # Until its scheduler holds its session (after it is listed in /instances), no live
        # instance has the task: every schedule shows orphaned.
        await until(joined, 20)
        yield client


async def create(app: httpx.AsyncClient, name: str, **fields: Any) -> dict[str, Any]:
    body = {"name": name, "task": LABEL, "params": {"label": name}, "every": 3600, **fields}
    made = await app.post("/schedules", json=body)
    assert made.status_code == 201, made.text
    shown: dict[str, Any] = made.json()
    return shown


async def runs(app: httpx.AsyncClient, name: str) -> list[dict[str, Any]]:
    answer = await app.get(f"/schedules/{name}/history?limit=200")
    assert answer.status_code == 200, answer.text
    found: list[dict[str, Any]] = answer.json()["runs"]
    return found


async def ended(app: httpx.AsyncClient, name: str, count: int) -> list[dict[str, Any]]:
    """Waits for ``count`` ended runs of ``name``; returns them, oldest first."""
    found: list[dict[str, Any]] = []

    async def enough() -> bool:
        nonlocal found
        found = [r for r in reversed(await runs(app, name)) if r["finished_at"] is not None]
        return len(found) >= count

    await until(enough, 20)
    return found


async def running(app: httpx.AsyncClient, name: str) -> None:
    async def going() -> bool:
        return bool((await app.get(f"/schedules/{name}")).json()["is_running"])

    await until(going, 20)


async def test_a_created_schedule_runs_with_its_params_and_version(app: httpx.AsyncClient) -> None:
    """201 with version 1, source api, state active; its first run (due at once) goes by the
    params it was created with, as version 1 of a regular slot."""
    shown = await create(app, "first", params={"label": "hello", "seconds": 0})
    assert (shown["version"], shown["source"], shown["state"]) == (1, "api", "active")
    assert shown["params"] == {"label": "hello", "seconds": 0.0}  # the model's defaults in
    (run,) = (await ended(app, "first", 1))[:1]
    assert (run["status"], run["params"], run["schedule_version"], run["trigger"]) == (
        "succeeded",
        {"label": "hello", "seconds": 0.0},
        1,
        "schedule",
    )
    listed = (await app.get("/schedules?source=api&limit=200")).json()["schedules"]
    assert "first" in {s["name"] for s in listed}
    actions = (await app.get("/schedules/first/history")).json()["actions"]
    assert [a["action"] for a in actions] == ["create"]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"task": "no.such.task"}, 422, "unknown_task"),
        ({"params": {"label": 5}}, 422, "invalid_params"),
        ({"params": {"label": "x", "extra": 1}}, 422, "invalid_params"),
        ({"params": {"label": "x" * 17_000}}, 422, "invalid_params"),
        ({"every": None, "cron": "61 * * * *"}, 422, "invalid_schedule"),
        ({"every": None, "cron": "0 3 * * *", "tz": "Mars/Base"}, 422, "invalid_schedule"),
        ({"cron": "0 3 * * *"}, 422, "invalid_schedule"),
        ({"every": None}, 422, "invalid_schedule"),
        ({"every": 0.5}, 422, "validation_error"),
        ({"every": "60"}, 422, "validation_error"),
        ({"max_attempts": 2.0}, 422, "validation_error"),
        ({"max_attempts": 10**30}, 422, "validation_error"),
        ({"name": "has/slash"}, 422, "validation_error"),
        ({"name": "x" * 101}, 422, "validation_error"),
        ({"name": "spa ce"}, 422, "validation_error"),
        ({"overlap": "queue"}, 422, "validation_error"),
        ({"note": "bell\u0007"}, 422, "validation_error"),
        ({"name": "probe.coded"}, 409, "schedule_exists"),
    ],
)
async def test_what_a_create_refuses_changes_nothing(
    app: httpx.AsyncClient, body: dict[str, Any], status: int, code: str
) -> None:
    before = (await app.get("/schedules?limit=200")).json()["schedules"]
    sent = {"name": "refused", "task": LABEL, "params": {"label": "x"}, "every": 60, **body}
    answer = await app.post("/schedules", json=sent)
    assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), answer.text
    if code == "invalid_params" and "extra" in str(body):
        assert answer.json()["error"]["details"][0]["field"] == "params.extra"
    if "cron" in body and body.get("tz") is None and code == "invalid_schedule":
        assert "cron" in answer.json()["error"]["message"]
    after = (await app.get("/schedules?limit=200")).json()["schedules"]
    assert after == before or {s["name"] for s in after} == {s["name"] for s in before}
    assert (await app.get("/schedules/refused")).status_code == 404


async def test_a_duplicate_name_is_refused(app: httpx.AsyncClient) -> None:
    await create(app, "twice")
    again = await app.post(
        "/schedules", json={"name": "twice", "task": LABEL, "params": {"label": "b"}, "every": 9}
    )
    assert (again.status_code, again.json()["error"]["code"]) == (409, "schedule_exists")
    assert (await app.get("/schedules/twice")).json()["params"]["label"] == "twice"


async def test_a_create_retried_with_its_idempotency_key_answers_it_again(
    app: httpx.AsyncClient,
) -> None:
    """The same create with the same Idempotency-Key: 201 with the schedule made the first
    time (one schedule, one create action); another key: 409 schedule_exists."""
    body = {"name": "keyed", "task": LABEL, "params": {"label": "k"}, "every": 3600}
    first = await app.post("/schedules", json=body, headers={"Idempotency-Key": "make-keyed"})
    again = await app.post("/schedules", json=body, headers={"Idempotency-Key": "make-keyed"})
    assert (first.status_code, again.status_code) == (201, 201), again.text
    assert again.json()["version"] == first.json()["version"] == 1
    other = await app.post("/schedules", json=body, headers={"Idempotency-Key": "another"})
    assert (other.status_code, other.json()["error"]["code"]) == (409, "schedule_exists")
    actions = (await app.get("/schedules/keyed/history")).json()["actions"]
    assert [a["action"] for a in actions] == ["create"]


async def test_a_change_needs_the_version_and_one_of_twenty_wins(app: httpx.AsyncClient) -> None:
    """PATCH without If-Match: 428; twenty at once with version 1: exactly one 200 (version
    2), nineteen 412; a quoted version is read as the number."""
    await create(app, "contested")
    missing = await app.patch("/schedules/contested", json={"note": "x"})
    assert (missing.status_code, missing.json()["error"]["code"]) == (428, "version_required")
    answers = await asyncio.gather(
        *(
            app.patch(
                "/schedules/contested",
                json={"params": {"label": f"v{n}"}},
                headers={"If-Match": "1"},
            )
            for n in range(20)
        )
    )
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [200] + [412] * 19, [a.text for a in answers if a.status_code != 412]
    assert {a.json()["error"]["code"] for a in answers if a.status_code == 412} == {
        "version_mismatch"
    }
    quoted = await app.patch(
        "/schedules/contested", json={"note": "n"}, headers={"If-Match": '"2"'}
    )
    assert quoted.status_code == 200, quoted.text
    assert quoted.json()["version"] == 3


async def test_a_change_is_live_at_the_next_claim(app: httpx.AsyncClient) -> None:
    """Changed params and spec: the next run goes by version 2 and its params; the change of
    spec replanned the next slot from the new interval (an hour became a second)."""
    await create(app, "changing")
    await ended(app, "changing", 1)
    changed = await app.patch(
        "/schedules/changing",
        json={"params": {"label": "after"}, "every": 1},
        headers={"If-Match": "1"},
    )
    assert changed.status_code == 200, changed.text
    assert (changed.json()["version"], changed.json()["every"]) == (2, 1.0)
    later = (await ended(app, "changing", 2))[1]
    assert (later["schedule_version"], later["params"]["label"]) == (2, "after")


async def test_a_code_schedule_is_managed_by_code_but_may_be_paused(
    app: httpx.AsyncClient,
) -> None:
    changed = await app.patch(
        "/schedules/probe.coded", json={"note": "x"}, headers={"If-Match": "1"}
    )
    assert (changed.status_code, changed.json()["error"]["code"]) == (409, "managed_by_code")
    deleted = await app.delete("/schedules/probe.coded")
    assert (deleted.status_code, deleted.json()["error"]["code"]) == (409, "managed_by_code")
    paused = await app.post("/schedules/probe.coded/pause", json={"note": "maintenance"})
    assert paused.status_code == 200, paused.text
    assert (paused.json()["state"], paused.json()["source"]) == ("paused", "code")
    resumed = await app.post("/schedules/probe.coded/resume")
    assert resumed.json()["state"] == "active"
    tasks = {t["name"] for t in (await app.get("/tasks")).json()["tasks"]}
    # /tasks: code schedules only
    assert "probe.coded" in tasks
    assert "first" not in tasks


async def test_deleted_then_made_again_runs_the_new_definition(app: httpx.AsyncClient) -> None:
    """DELETE keeps the history (200 under the old name); the same name made again runs the
    new definition from version 1, and the old runs are not in its history."""
    await create(app, "again", params={"label": "old"})
    await ended(app, "again", 1)
    assert (await app.delete("/schedules/again", headers={"If-Match": "1"})).status_code == 204
    assert (await app.get("/schedules/again")).status_code == 404
    kept = await runs(app, "again")
    assert [r["params"]["label"] for r in kept] == ["old"]
    await create(app, "again", params={"label": "new"})
    fresh = await ended(app, "again", 1)
    assert [r["params"]["label"] for r in fresh] == ["new"]
    assert (await app.delete("/schedules/never-was")).status_code == 404
    malformed = await app.delete("/schedules/again", headers={"If-Match": "null"})
    assert (malformed.status_code, malformed.json()["error"]["code"]) == (428, "version_required")
    assert (await app.get("/schedules/never-was/history")).status_code == 404


async def test_pause_with_a_note_and_resume(app: httpx.AsyncClient) -> None:
    await create(app, "pausing", every=1)
    await ended(app, "pausing", 1)
    paused = await app.post("/schedules/pausing/pause", json={"note": "waiting for a fix"})
    assert (paused.json()["state"], paused.json()["pause_note"]) == ("paused", "waiting for a fix")
    refused = await app.post("/schedules/pausing/run")
    assert (refused.status_code, refused.json()["error"]["code"]) == (409, "schedule_paused")
    actions = (await app.get("/schedules/pausing/history")).json()["actions"]
    assert (actions[0]["action"], actions[0]["note"]) == ("pause", "waiting for a fix")
    assert (await app.post("/schedules/pausing/resume")).json()["state"] == "active"


@pytest.mark.parametrize("overlap", ["skip", "buffer_one", "cancel_other"])
async def test_a_run_now_while_one_is_going_follows_the_overlap_policy(
    app: httpx.AsyncClient, overlap: str
) -> None:
    """A run is going; a run-now with other params: skip refuses (409 already_running);
    buffer_one keeps one (a second: 409 already_buffered) and runs it once the first has
    ended; cancel_other stops the running one (cancelled, not retried) and runs the new one
    once it has stopped. Never two at once."""
    name = f"overlap-{overlap}"
    seconds = 2 if overlap == "buffer_one" else 60
    await create(app, name, params={"label": "long", "seconds": seconds}, overlap=overlap)
    await running(app, name)
    asked = await app.post(f"/schedules/{name}/run", json={"params": {"label": "now"}})
    if overlap == "skip":
        assert (asked.status_code, asked.json()["error"]["code"]) == (409, "already_running")
        assert [r["status"] for r in await runs(app, name)] == ["running"]
        return
    assert asked.status_code == 200, asked.text
    second = await app.post(f"/schedules/{name}/run", json={"params": {"label": "later"}})
    assert (second.status_code, second.json()["error"]["code"]) == (409, "already_buffered")
    first, then = (await ended(app, name, 2))[:2]
    expected = "succeeded" if overlap == "buffer_one" else "cancelled"
    assert (first["status"], first["params"]["label"]) == (expected, "long")
    if overlap == "cancel_other":
        assert "overlap cancel_other" in first["error"]
    assert (then["params"]["label"], then["trigger"]) == ("now", "manual")
    assert then["started_at"] >= first["finished_at"]
    actions = (await app.get(f"/schedules/{name}/history")).json()["actions"]
    (asked_at,) = [datetime.fromisoformat(a["at"]) for a in actions if a["action"] == "run"]
    after_end = datetime.fromisoformat(then["started_at"]) - datetime.fromisoformat(
        first["finished_at"]
    )
    after_ask = datetime.fromisoformat(then["started_at"]) - asked_at
    print(
        f"{overlap}: the asked run started {after_end.total_seconds():.3f} s after the first "
        f"ended, {after_ask.total_seconds():.3f} s after it was asked for"
    )
