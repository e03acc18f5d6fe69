"""The browser side: a login that sets a SameSite=Strict cookie, no cookie accepted on a
state-changing request from another site, and the pages' security headers. In process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tandem.core.callers import TASKS_READ, TASKS_WRITE, WALLET_READ, WALLET_WRITE
from tandem.core.settings import Settings
from tests.access.keys import make_key
from tests.support import fetch, in_process

SITE = "http://tandem.test"
EVIL = "https://evil.example"
TASK = "browser.probe"


@pytest.fixture(scope="module")
async def browser(transport: httpx.ASGITransport) -> AsyncIterator[httpx.AsyncClient]:
    """No key, no cookie jar: each test says what it sends."""
    async with httpx.AsyncClient(transport=transport, base_url=SITE) as c:
        c.cookies = None  # type: ignore[assignment]
        yield c


@pytest.fixture(scope="module")
async def person(database_url: str, browser: httpx.AsyncClient) -> str:
    await fetch(
        database_url,
        "INSERT INTO tasks (name, \"interval\", function_name) VALUES ($1, '1 hour', 'x')",
        TASK,
    )
    scopes = (TASKS_READ, TASKS_WRITE, WALLET_READ, WALLET_WRITE)
    return await make_key(database_url, "person", *scopes, known_to=browser)


def cookie(token: str) -> dict[str, str]:
    return {"Cookie": f"tandem_key={token}"}


def assert_page_headers(answer: httpx.Response) -> None:
    policy = answer.headers["content-security-policy"]
    assert "frame-ancestors 'none'" in policy
    assert answer.headers["x-frame-options"] == "DENY"
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "unsafe-inline" not in policy


async def test_anonymous_visitors_see_only_the_login(browser: httpx.AsyncClient) -> None:
    for path in ("/", "/docs", "/redoc"):
        answer = await browser.get(path)
        assert answer.status_code == 303
        assert answer.headers["location"] == "/login"
        assert answer.content == b""
    login = await browser.get("/login")
    assert login.status_code == 200
    assert '<form method="post" action="/login">' in login.text
    assert_page_headers(login)
    assert "form-action 'self'" in login.headers["content-security-policy"]


async def test_login_sets_a_strict_cookie_that_opens_the_pages(
    browser: httpx.AsyncClient, person: str
) -> None:
    answer = await browser.post(
        "/login", data={"key": person}, headers={"Origin": SITE}, follow_redirects=False
    )
    assert answer.status_code == 303
    assert answer.headers["location"] == "/"
    set_cookie = answer.headers["set-cookie"]
    assert set_cookie.startswith(f"tandem_key={person};")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age="):
        assert attribute in set_cookie

    page = await browser.get("/", headers=cookie(person))
    assert page.status_code == 200
    assert "Tandem status" in page.text
    assert_page_headers(page)
    docs = await browser.get("/docs", headers=cookie(person))
    assert docs.status_code == 200
    assert_page_headers(docs)
    # Swagger UI's inline script is allowed by its hash, nothing else inline.
    assert "'sha256-" in docs.headers["content-security-policy"]
    schema = await browser.get("/openapi.json", headers=cookie(person))
    assert schema.status_code == 200


async def test_login_refuses_a_wrong_key_and_a_foreign_form(
    browser: httpx.AsyncClient, person: str
) -> None:
    wrong = await browser.post("/login", data={"key": "tdm_nope"}, headers={"Origin": SITE})
    assert wrong.status_code == 401
    assert "set-cookie" not in wrong.headers
    assert "Unknown or revoked" in wrong.text
    foreign = await browser.post("/login", data={"key": person}, headers={"Origin": EVIL})
    assert foreign.status_code == 403
    assert "set-cookie" not in foreign.headers


async def test_a_cross_site_form_cannot_act_with_the_cookie(
    browser: httpx.AsyncClient, person: str, database_url: str
) -> None:
    """Cross-site probes: a text/plain form post moving money and a form post pausing a
    task, from another site, with and without the visitor's cookie."""
    rows = await fetch(database_url, "INSERT INTO users (balance) VALUES (50) RETURNING id")
    user = rows[0]["id"]
    state = (
        "SELECT (SELECT balance FROM users WHERE id = $1), "
        "(SELECT enabled FROM tasks WHERE name = $2)"
    )
    before = await fetch(database_url, state, user, TASK)
    form = f'{{"userId": {user}, "amount": -10}}'
    text_plain = {"Content-Type": "text/plain", "Origin": EVIL, "Host": "tandem.test"}
    for headers in ({}, cookie(person)):
        moved = await browser.post(
            "/balance/update", content=form, headers={**text_plain, **headers}
        )
        assert moved.status_code in (401, 403), moved.text
        paused = await browser.post(
            f"/tasks/{TASK}/pause", data={"x": "1"}, headers={"Origin": EVIL, **headers}
        )
        assert paused.status_code in (401, 403), paused.text
    # No Origin at all is refused too, with a cookie.
    no_origin = await browser.post(f"/tasks/{TASK}/pause", headers=cookie(person))
    assert no_origin.status_code == 403
    assert no_origin.json()["error"]["code"] == "forbidden"
    assert await fetch(database_url, state, user, TASK) == before

    # From the site itself (Swagger UI's "try it out"), the cookie works.
    same_site = {**cookie(person), "Origin": SITE}
    moved = await browser.post(
        "/balance/update", json={"userId": user, "amount": -10}, headers=same_site
    )
    assert moved.status_code == 200, moved.text
    assert moved.json()["balance"] == 40


async def test_logout_clears_the_cookie(browser: httpx.AsyncClient) -> None:
    answer = await browser.post("/logout", headers={"Origin": SITE})
    assert answer.status_code == 303
    assert "Max-Age=0" in answer.headers["set-cookie"]
    assert (await browser.get("/logout")).status_code == 405


async def test_disabled_authentication_is_open_and_says_so(database_url: str) -> None:
    settings = Settings(
        database_url=database_url,
        scheduler_enabled=False,
        maintenance_enabled=False,
        auth_disabled=True,
    )
    async with (
        in_process(settings) as transport,
        httpx.AsyncClient(transport=transport, base_url=SITE) as anonymous,
    ):
        created = await anonymous.post("/users", json={"balance": 7})
        assert created.status_code == 201
        page = await anonymous.get("/")
        assert page.status_code == 200
        assert 'id="auth-disabled"' in page.text
        user = created.json()["userId"]
        entries = (await anonymous.get(f"/balance/{user}/history")).json()["entries"]
        assert entries[0]["apiKey"] is None
