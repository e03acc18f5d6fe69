"""Talking to Tandem: the suite's API key, HTTP calls that send it, the app in process over
ASGI, a signed-in proxy for a browser, and the wallet API's small checks."""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from typing import Any

import httpx
import uvicorn
from asgi_lifespan import LifespanManager

from tandem.access.keys import new_token
from tandem.core.settings import Settings
from tandem.main import create_asgi_app
from tests.support.metrics import sample_sum
from tests.support.processes import Server, free_port
from tests.support.timings import wait_for

# The suite's API key (scope all). conftest.py puts it in the environment, so every server
# the suite starts, in process or not, registers it at start; every test request sends it
# (the refusals of other keys, and of none, are tests/access/'s).
API_KEY = new_token()
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _authed(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {**kwargs, "headers": {**AUTH, **(kwargs.get("headers") or {})}}


def http_get(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.get`` with the suite's key."""
    return httpx.get(url, **_authed(kwargs))


def http_post(url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.post`` with the suite's key."""
    return httpx.post(url, **_authed(kwargs))


@contextmanager
def signed_in(url: str) -> Iterator[str]:
    """A local proxy to ``url`` that adds the suite's key to every request: a browser that is
    signed in, for Chromium, which cannot be given a header (the login and its cookie are
    tests/access/test_browser.py's). Yields the proxy's URL."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k != b"host"]
        async with httpx.AsyncClient(base_url=url) as client:
            answer = await client.request(
                scope["method"],
                scope["path"]
                + ("?" + scope["query_string"].decode() if scope["query_string"] else ""),
                headers=[*headers, *AUTH.items()],
                content=body,
            )
        drop = {"content-length", "transfer-encoding", "connection", "content-encoding"}
        await send(
            {
                "type": "http.response.start",
                "status": answer.status_code,
                "headers": [
                    (k.encode(), v.encode()) for k, v in answer.headers.items() if k not in drop
                ],
            }
        )
        await send({"type": "http.response.body", "body": answer.content})

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, port=port, log_level="warning", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    wait_for(lambda: server.started, 10)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def http_request(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """``httpx.request`` with the suite's key."""
    return httpx.request(method, url, **_authed(kwargs))


def app_settings(database_url: str, **overrides: Any) -> Settings:
    """Settings of an app run in process: no scheduler, no housekeeping, keys made by a test
    loaded within 0.1 s (tests/access/keys.make_key waits), unless ``overrides`` say else."""
    return Settings(
        **{
            "database_url": database_url,
            "scheduler_enabled": False,
            "maintenance_enabled": False,
            "auth_cache_ttl": 0.1,
            **overrides,
        }
    )


@asynccontextmanager
async def in_process(settings: Settings) -> AsyncIterator[httpx.ASGITransport]:
    """The app in this process, as uvicorn runs it (metrics, access, lean path, FastAPI) but
    without a socket or a subprocess, started and stopped by its lifespan."""
    async with LifespanManager(create_asgi_app(settings)) as manager:
        yield httpx.ASGITransport(app=manager.app)


@asynccontextmanager
async def in_process_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """``in_process`` with a client that sends the suite's key."""
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url="http://tandem.test", headers=AUTH) as c,
    ):
        yield c


async def new_user(client: httpx.AsyncClient, balance: int = 10_000) -> int:
    """A new user holding ``balance``, made through the API; its id."""
    response = await client.post("/users", json={"balance": balance})
    assert response.status_code == 201, response.text
    assert response.json()["balance"] == balance
    return int(response.json()["userId"])


async def balance_of(client: httpx.AsyncClient, user_id: int) -> int:
    response = await client.get(f"/balance/{user_id}")
    assert response.status_code == 200, response.text
    return int(response.json()["balance"])


def assert_error(response: httpx.Response, status: int, code: str) -> None:
    """``response`` is the JSON error envelope with ``status`` and the stable ``code``."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["error"]["code"] == code
    assert isinstance(body["error"]["message"], str)
    assert body["error"]["message"]


def batched(server_url: str, kind: str = "change") -> float:
    """The items a running server has sent in group-commit batches of ``kind`` so far (its
    tandem_wallet_batch_size_sum)."""
    return sample_sum(
        http_get(f"{server_url}/metrics").text, "tandem_wallet_batch_size_sum", kind=kind
    )


def batch_statements(server_url: str, kind: str = "change") -> float:
    """The group-commit batch statements of ``kind`` a running server has sent so far (its
    tandem_wallet_batch_size_count)."""
    return sample_sum(
        http_get(f"{server_url}/metrics").text, "tandem_wallet_batch_size_count", kind=kind
    )


def task_owner(servers: list[Server], task: str) -> Server | None:
    """The server whose scheduler runs ``task`` now, if any (by /tasks and /instances)."""
    for asked in servers:
        if asked.process.poll() is None:
            break
    else:
        return None
    tasks = http_get(f"{asked.url}/tasks", timeout=10).json()["tasks"]
    running = {t["name"]: t["running_instance"] for t in tasks if t["is_running"]}
    if task not in running:
        return None
    instances = http_get(f"{asked.url}/instances", timeout=10).json()["instances"]
    pid = next((i["pid"] for i in instances if i["id"] == running[task]), None)
    return next((s for s in servers if s.process.pid == pid), None)
