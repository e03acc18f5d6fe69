"""The tasks API with the app in process and its scheduler on, in compressed time: what GET
/tasks, /instances and a task's history show, and pause, resume and run-now. (Across real
processes, the cron itself: test_cluster.py.)"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.support import app_settings, in_process_client, until
from tests.support.registries import EQUAL_TASKS, scheduler_settings


@pytest.fixture(scope="module")
async def app(database_url: str) -> AsyncIterator[httpx.AsyncClient]:
    """The app in process, running ten equal tasks due every second (one for the module: the
    test that pauses a task resumes it)."""
    settings = app_settings(database_url, **scheduler_settings("equal"))
    async with in_process_client(settings) as client:
        yield client


async def tasks(app: httpx.AsyncClient) -> dict[str, Any]:
    response = await app.get("/tasks")
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


async def runs(app: httpx.AsyncClient, name: str) -> int:
    response = await app.get(f"/tasks/{name}/history?limit=200")
    assert response.status_code == 200, response.text
    return len(response.json()["runs"])


async def test_tasks_show_running_and_pending(app: httpx.AsyncClient) -> None:
    """GET /tasks lists every task, the running ones with their instance and elapsed time,
    the others pending in due order; GET /instances lists this process."""

    async def one_running() -> bool:
        return any(t["is_running"] for t in (await tasks(app))["tasks"])

    await until(one_running, 15)
    body = await tasks(app)
    assert {t["name"] for t in body["tasks"]} == set(EQUAL_TASKS)
    for task in body["tasks"]:
        if task["is_running"]:
            assert task["running_instance"]
            assert task["elapsed_seconds"] >= 0
    pending = [p["next_run_at"] for p in body["pending"]]
    assert pending == sorted(pending)
    assert {p["name"] for p in body["pending"]} == {
        t["name"] for t in body["tasks"] if not t["is_running"]
    }
    (instance,) = (await app.get("/instances")).json()["instances"]
    assert instance["pid"] == os.getpid()


async def test_pause_resume_and_run_now(app: httpx.AsyncClient) -> None:
    """A paused task starts no run while the others keep running theirs; resumed and asked to
    run now, it runs again."""

    async def listed() -> bool:
        return {t["name"] for t in (await tasks(app))["tasks"]} == set(EQUAL_TASKS)

    await until(listed, 15)
    await until(lambda: runs(app, "Equal01"), 15)
    paused = await app.post("/tasks/Equal01/pause")
    assert paused.status_code == 200, paused.text
    assert paused.json()["enabled"] is False

    async def idle() -> bool:
        (task,) = [t for t in (await tasks(app))["tasks"] if t["name"] == "Equal01"]
        return not task["is_running"]

    await until(idle, 10)
    before = await runs(app, "Equal01")
    # No fixed wait: three more runs of a sibling due at the same interval prove that the
    # scheduler claimed through at least two of Equal01's slots meanwhile.
    sibling = await runs(app, "Equal02")

    async def sibling_ran_thrice() -> bool:
        return await runs(app, "Equal02") >= sibling + 3

    await until(sibling_ran_thrice, 20)
    assert await runs(app, "Equal01") == before

    resumed = await app.post("/tasks/Equal01/resume")
    assert resumed.json()["enabled"] is True

    async def run_asked() -> bool:
        # Resumed, it may be running its next slot already: asked again once that ends.
        answer = await app.post("/tasks/Equal01/run")
        assert answer.status_code in (200, 409), answer.text
        return answer.status_code == 200

    await until(run_asked, 10)

    async def ran_again() -> bool:
        return await runs(app, "Equal01") > before

    await until(ran_again, 10)


@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/tasks/Nope/history"), ("POST", "/tasks/Nope/run"), ("POST", "/tasks/Nope/pause")],
)
async def test_unknown_task_is_404(app: httpx.AsyncClient, method: str, path: str) -> None:
    """A name no registry defines is 404 task_not_found on every task route."""
    response = await app.request(method, path)
    assert response.status_code == 404, response.text
    assert response.json()["error"]["code"] == "task_not_found"


async def test_history_limit_is_checked(app: httpx.AsyncClient) -> None:
    """A history page of 0 runs is refused (422), not answered empty."""
    response = await app.get("/tasks/Equal01/history?limit=0")
    assert response.status_code == 422, response.text
