"""The browser side: a login that sets a SameSite=Strict session cookie (never the key), a
session that ends at logout, at its key's revocation and at its expiry, on every instance; no
cookie accepted on a state-changing request from another site, and the pages' security
headers. In process."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from tandem.access import sessions as sessions_module
from tandem.access.keys import digest
from tandem.access.sessions import Sessions
from tandem.core.callers import TASKS_READ, TASKS_WRITE, WALLET_READ, WALLET_WRITE
from tandem.core.database import Database
from tandem.core.settings import Settings
from tests.access.keys import bearer, make_key, revoke_key
from tests.support import app_settings, fetch, in_process

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


@pytest.fixture(scope="module")
async def session(browser: httpx.AsyncClient, person: str) -> str:
    """A session of the person's key, as its cookie holds it."""
    return await login(browser, person)


async def login(browser: httpx.AsyncClient, token: str) -> str:
    """Signs in with the key ``token``; the session token the cookie holds."""
    answer = await browser.post(
        "/login", data={"key": token}, headers={"Origin": SITE}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    name, _, rest = answer.headers["set-cookie"].partition("=")
    assert name == "tandem_session"
    return rest.partition(";")[0]


def cookie(session: str) -> dict[str, str]:
    return {"Cookie": f"tandem_session={session}"}


async def assert_session_refused(browser: httpx.AsyncClient, session: str) -> None:
    """The anonymous answers: a page sends to the login, the API is 401."""
    page = await browser.get("/", headers=cookie(session))
    assert page.status_code == 303
    assert page.headers["location"] == "/login"
    api = await browser.get("/openapi.json", headers=cookie(session))
    assert api.status_code == 401
    assert api.json()["error"]["code"] == "unauthenticated"


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
    assert set_cookie.startswith("tandem_session=tds_")
    for attribute in ("HttpOnly", "SameSite=Strict", "Path=/", "Max-Age=43200"):
        assert attribute in set_cookie
    session = set_cookie.partition("=")[2].partition(";")[0]

    page = await browser.get("/", headers=cookie(session))
    assert page.status_code == 200
    assert "Tandem status" in page.text
    assert_page_headers(page)
    docs = await browser.get("/docs", headers=cookie(session))
    assert docs.status_code == 200
    assert_page_headers(docs)
    # Swagger UI's inline script is allowed by its hash, nothing else inline.
    assert "'sha256-" in docs.headers["content-security-policy"]
    schema = await browser.get("/openapi.json", headers=cookie(session))
    assert schema.status_code == 200


async def test_the_session_cookie_is_secure_behind_https(
    browser: httpx.AsyncClient, person: str
) -> None:
    """Behind a TLS proxy (X-Forwarded-Proto: https) the cookie is Secure; on plain HTTP it
    cannot be (the browser would drop it)."""
    for proto, secure in (("https", True), ("http", False)):
        answer = await browser.post(
            "/login",
            data={"key": person},
            headers={"Origin": SITE, "X-Forwarded-Proto": proto},
            follow_redirects=False,
        )
        assert answer.status_code == 303
        assert ("; Secure" in answer.headers["set-cookie"]) is secure


async def test_the_cookie_never_holds_the_key(
    browser: httpx.AsyncClient, person: str, session: str, database_url: str
) -> None:
    """The cookie is a session token, stored hashed with its key, issue and expiry times; a
    cookie of before (the raw key, under the old name or the new) is no longer accepted."""
    assert session.startswith("tds_")
    assert person not in session
    rows = await fetch(
        database_url,
        "SELECT k.name, s.expires_at - s.created_at AS life, s.ended_at "
        "FROM browser_sessions s JOIN api_keys k ON k.id = s.api_key_id "
        "WHERE s.token_sha256 = $1",
        digest(session),
    )
    assert [(r["name"], r["life"].total_seconds(), r["ended_at"]) for r in rows] == [
        ("person", 43200.0, None)
    ]
    for old in ({"Cookie": f"tandem_key={person}"}, cookie(person)):
        page = await browser.get("/", headers=old)
        assert page.status_code == 303
        assert (await browser.get("/openapi.json", headers=old)).status_code == 401


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
    browser: httpx.AsyncClient, session: str, database_url: str
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
    for headers in ({}, cookie(session)):
        moved = await browser.post(
            "/balance/update", content=form, headers={**text_plain, **headers}
        )
        assert moved.status_code in (401, 403), moved.text
        paused = await browser.post(
            f"/tasks/{TASK}/pause", data={"x": "1"}, headers={"Origin": EVIL, **headers}
        )
        assert paused.status_code in (401, 403), paused.text
    # No Origin at all is refused too, with a cookie.
    no_origin = await browser.post(f"/tasks/{TASK}/pause", headers=cookie(session))
    assert no_origin.status_code == 403
    assert no_origin.json()["error"]["code"] == "forbidden"
    assert await fetch(database_url, state, user, TASK) == before

    # From the site itself (Swagger UI's "try it out"), the cookie works.
    same_site = {**cookie(session), "Origin": SITE}
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


async def test_logout_ends_the_session_on_every_instance(
    browser: httpx.AsyncClient, database_url: str
) -> None:
    """After a logout on one instance, a replay of the old cookie is anonymous there and on a
    second instance at once (both knew the session live just before)."""
    token = await make_key(database_url, "leaver", TASKS_READ, known_to=browser)
    session = await login(browser, token)
    async with (
        in_process(app_settings(database_url)) as other,
        httpx.AsyncClient(transport=other, base_url=SITE) as second,
    ):
        for instance in (browser, second):
            assert (await instance.get("/", headers=cookie(session))).status_code == 200
        out = await browser.post("/logout", headers={**cookie(session), "Origin": SITE})
        assert out.status_code == 303
        for instance in (browser, second):
            await assert_session_refused(instance, session)
    # The key itself lives on.
    assert (await browser.get("/openapi.json", headers=bearer(token))).status_code == 200


async def test_revocation_ends_the_key_sessions_at_once(
    browser: httpx.AsyncClient, database_url: str
) -> None:
    """A revoked key's session is refused on the next request, while the key cache (reloaded
    every 2 s) may still hold the key."""
    token = await make_key(database_url, "revoked-person", TASKS_READ, known_to=browser)
    session = await login(browser, token)
    assert (await browser.get("/", headers=cookie(session))).status_code == 200
    await revoke_key(database_url, "revoked-person")
    await assert_session_refused(browser, session)
    ended = await fetch(
        database_url,
        "SELECT ended_at IS NOT NULL FROM browser_sessions WHERE token_sha256 = $1",
        digest(session),
    )
    assert ended[0][0]


async def test_an_expired_session_is_refused(browser: httpx.AsyncClient, database_url: str) -> None:
    """A session past its expiry (the cookie's max age) is refused, whatever the cookie."""
    token = await make_key(database_url, "expiring", TASKS_READ, known_to=browser)
    session = await login(browser, token)
    assert (await browser.get("/", headers=cookie(session))).status_code == 200
    await fetch(
        database_url,
        "UPDATE browser_sessions SET expires_at = clock_timestamp() WHERE token_sha256 = $1",
        digest(session),
    )
    await assert_session_refused(browser, session)


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


async def test_logins_are_within_the_keys_rate(
    browser: httpx.AsyncClient, database_url: str
) -> None:
    """A login is a request of its key: past the key's --rate, 429 rate_limited, and no
    session stored."""
    token = await make_key(database_url, "login-rate", WALLET_READ, rate="2/minute")
    for _ in range(2):
        await login(browser, token)
    answer = await browser.post(
        "/login", data={"key": token}, headers={"Origin": SITE}, follow_redirects=False
    )
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == "rate_limited"
    stored = await fetch(
        database_url,
        "SELECT count(*) FROM browser_sessions s JOIN api_keys k ON k.id = s.api_key_id "
        "WHERE k.name = 'login-rate'",
    )
    assert stored[0][0] == 2


async def test_the_database_checks_the_key_at_login(
    browser: httpx.AsyncClient, database_url: str
) -> None:
    """The session starts from the key's raw token, checked in the database: a key revoked
    after this process loaded it (its cache still holds it) starts no session."""
    token = await make_key(database_url, "revoked-before-login", WALLET_READ, known_to=browser)
    await revoke_key(database_url, "revoked-before-login")
    answer = await browser.post(
        "/login", data={"key": token}, headers={"Origin": SITE}, follow_redirects=False
    )
    assert answer.status_code == 401
    assert "set-cookie" not in answer.headers
    stored = await fetch(
        database_url,
        "SELECT count(*) FROM browser_sessions s JOIN api_keys k ON k.id = s.api_key_id "
        "WHERE k.name = 'revoked-before-login'",
    )
    assert stored[0][0] == 0


async def test_the_sessions_seen_are_bounded(
    database: Database, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process remembers at most SEEN_MAX sessions as seen live, the least recently used
    forgotten first (a forgotten one is looked up within the allowance again, still live)."""
    monkeypatch.setattr(sessions_module, "SEEN_MAX", 3)
    token = await make_key(database_url, "many-logins", WALLET_READ)
    sessions = Sessions(database, lookups_per_second=100)
    started = [await sessions.start(token) for _ in range(5)]
    assert all(started)
    assert len(sessions._seen) == 3
    assert await sessions.resolve(started[0] or "") is not None
    assert len(sessions._seen) == 3


@pytest.mark.parametrize(("bound", "landing"), [(False, "/"), (True, "/docs")])
async def test_a_login_lands_on_a_page_its_key_may_read(
    browser: httpx.AsyncClient, database_url: str, bound: bool, landing: str
) -> None:
    """An unbound key lands on the status page; a key bound to users, which may not read it
    (403), on the API's documentation. Either page then answers 200 to the session."""
    users = None
    if bound:
        rows = await fetch(database_url, "INSERT INTO users (balance) VALUES (0) RETURNING id")
        users = [rows[0]["id"]]
    token = await make_key(
        database_url,
        f"lands-{'bound' if bound else 'unbound'}",
        TASKS_READ,
        WALLET_READ,
        users=users,
        known_to=browser,
    )
    answer = await browser.post(
        "/login", data={"key": token}, headers={"Origin": SITE}, follow_redirects=False
    )
    assert answer.status_code == 303, answer.text
    assert answer.headers["location"] == landing
    session = answer.headers["set-cookie"].partition("=")[2].partition(";")[0]
    assert (await browser.get(landing, headers=cookie(session))).status_code == 200
