"""The access layer: one ASGI layer in front of both HTTP paths (the wallet's lean path and
FastAPI), so every route is checked by the same code against the same table (policy.py).

A request's credential is ``Authorization: Bearer <token>`` or, for a person in a browser, the
``tandem_session`` cookie that the login page sets (HttpOnly, SameSite=Strict): a session token
(sessions.py), never the key; a logout ends the session on the server. A cookie is not
accepted on a state-changing request unless its ``Origin`` is this server's own: a cross-site
form can then never act with a visitor's key, even in a browser that ignores SameSite. A
bearer key is resolved through the process's cache (cache.py), a session by a lookup, and the
caller left in the ASGI scope for the routes (``core.callers.caller_of``). Refusals: 401
``unauthenticated`` (with ``WWW-Authenticate``), 403 ``forbidden``, 429 ``rate_limited`` (a
key with a rate of its own, past it in this process); all before any route runs, so nothing
changes.

A key bound to users is held to its rule's binding here, for both paths: refused (403) on an
``UNBOUND_ONLY`` route, and told 404 ``user_not_found`` (what a user that does not exist gets)
for a ``PATH_USER`` route naming another user. The body's user (``BODY_USER``) and a record's
users (``RESOURCE_USER``) are the wallet service's to check (``Caller.may_touch``).

The login page (``GET``/``POST /login``) and ``POST /logout`` are this layer's own routes: they
handle the credential itself. Every HTML page gets a Content-Security-Policy (by the hashes of
its inline scripts and styles, when the page has none of its own), no framing, no sniffing.
"""

from __future__ import annotations

import base64
import hashlib
import html
import logging
import math
import re
import time
from typing import Any, ClassVar
from urllib.parse import parse_qsl, urlsplit

from tandem.access import policy
from tandem.access.cache import KeyCache, TokenBucket
from tandem.access.keys import describe
from tandem.access.sessions import Sessions
from tandem.core.asgi import (
    ASGIApp,
    Message,
    Receive,
    Scope,
    Send,
    body_chunks,
    header,
    respond,
    respond_error,
    respond_unexpected,
)
from tandem.core.callers import ANONYMOUS, CALLER_SCOPE_KEY, Caller
from tandem.core.errors import (
    AppError,
    ForbiddenError,
    MethodNotAllowedError,
    TooManyRequestsError,
    UnauthenticatedError,
    UserNotFoundError,
)
from tandem.core.ids import id_in
from tandem.observability.metrics import ACCESS_KEY_LIMITED, ROUTE_SCOPE_KEY

log = logging.getLogger(__name__)

# The session cookie (a session token: sessions.py). Its name changed with what it holds: a
# cookie of before (`tandem_key`, the raw key) is no longer read.
COOKIE = "tandem_session"
_RATE_LIMITED = ACCESS_KEY_LIMITED.labels("rate")
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
_PAGE_HEADERS = [
    (b"x-frame-options", b"DENY"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
_INLINE = re.compile(rb"<(script|style)(?![^>]*\bsrc=)[^>]*>(.*?)</\1>", re.DOTALL | re.IGNORECASE)
_LOGIN_MAX_BODY = 4096


class _InvalidKey(UnauthenticatedError):
    headers: ClassVar[dict[str, str]] = {
        "WWW-Authenticate": 'Bearer realm="tandem", error="invalid_token"'
    }


class _LoginOnly(MethodNotAllowedError):
    headers: ClassVar[dict[str, str]] = {"Allow": "GET, HEAD, POST"}


class _LogoutOnly(MethodNotAllowedError):
    headers: ClassVar[dict[str, str]] = {"Allow": "POST"}


class RateLimitedError(TooManyRequestsError):
    """The key's own request rate (``tandem keys create --rate``), past it in this process."""

    code = "rate_limited"

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(f"the API key {name!r} is past its request rate; retry later")
        # Per refusal: when this key's bucket has a request again (whole seconds, at least 1).
        self.headers = {"Retry-After": str(max(1, math.ceil(retry_after)))}  # type: ignore[misc]  # an instance's own value of the class's default


class AccessControl:
    def __init__(
        self, app: ASGIApp, cache: KeyCache, sessions: Sessions, *, disabled: bool
    ) -> None:
        self.app = app
        self.cache = cache
        self.sessions = sessions
        self.disabled = disabled
        # One token bucket per key with a rate, in this process (a key's rate never changes).
        self._buckets: dict[int, TokenBucket] = {}
        # When each key's refusal was last logged: once a minute per key, not per refusal.
        self._logged: dict[int, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # No route takes one; none is let through unchecked either.
            await receive()
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":  # lifespan
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if path in ("/login", "/logout"):
            scope[ROUTE_SCOPE_KEY] = path
            try:
                await self._login_routes(scope, receive, send)
            except Exception as exc:
                await respond_unexpected(scope, send, exc, writes=False, where="the login page")
            return
        rule = policy.rule_for(scope["method"], path)
        if rule.requirement == policy.PUBLIC:
            await self._forward(rule, scope, receive, send)
            return
        if self.disabled:
            scope[CALLER_SCOPE_KEY] = ANONYMOUS
            await self._forward(rule, scope, receive, send)
            return
        try:
            caller = await self._authenticate(scope)
            if caller.rate is not None:
                self._take_request(caller)
            if rule.requirement != policy.ANY_KEY:
                caller.require(rule.requirement)
            if caller.bound:
                _hold_to_binding(rule, path, caller)
        except UnauthenticatedError as error:
            scope[ROUTE_SCOPE_KEY] = rule.template
            if rule.page and scope["method"] in ("GET", "HEAD"):
                await _redirect(send, "/login")
            else:
                await respond_error(scope, send, error)
            return
        except AppError as error:
            scope[ROUTE_SCOPE_KEY] = rule.template
            await respond_error(scope, send, error)
            return
        except Exception as exc:
            scope[ROUTE_SCOPE_KEY] = rule.template
            await respond_unexpected(scope, send, exc, writes=False, where="the access layer")
            return
        scope[CALLER_SCOPE_KEY] = caller
        await self._forward(rule, scope, receive, send)

    async def _forward(self, rule: policy.Rule, scope: Scope, receive: Receive, send: Send) -> None:
        await self.app(scope, receive, _with_page_headers(send) if rule.page else send)

    async def _authenticate(self, scope: Scope) -> Caller:
        authorizations = header(scope, b"authorization")
        if len(authorizations) > 1:
            raise UnauthenticatedError("more than one Authorization header")
        if authorizations:
            scheme, _, token = authorizations[0].strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise UnauthenticatedError("expected Authorization: Bearer <API key>")
            token = token.strip()
        else:
            cookie = _cookie(scope)
            if cookie is None:
                raise UnauthenticatedError(
                    "an API key is required: Authorization: Bearer <API key>"
                )
            if scope["method"] not in _SAFE_METHODS and not _same_origin(scope):
                raise ForbiddenError(
                    "a state-changing request with a session cookie must come from this "
                    "site (Origin)"
                )
            caller = await self.sessions.resolve(cookie)
            if caller is None:
                raise _InvalidKey("no live session: sign in again")
            return caller
        caller = await self.cache.resolve(token)
        if caller is None:
            raise _InvalidKey("unknown or revoked API key")
        return caller

    def _take_request(self, caller: Caller) -> None:
        """Raises RateLimitedError past the caller's rate: a token bucket per key (a key
        minted through POST /keys shares its maker's: Caller.limited_as), holding at most its
        rate's amount, refilled over its window."""
        assert caller.rate is not None
        limited_as = caller.limited_as
        assert limited_as is not None
        now = time.monotonic()
        bucket = self._buckets.get(limited_as)
        if bucket is None:
            amount, seconds = caller.rate
            bucket = self._buckets[limited_as] = TokenBucket(amount / seconds, amount, now)
        if not bucket.take(now):
            _RATE_LIMITED.inc()
            if now - self._logged.get(limited_as, -60.0) >= 60.0:
                self._logged[limited_as] = now
                log.warning(
                    "the API key %r is past its rate of %s (refused 429; logged once a minute)",
                    caller.name,
                    describe(caller.rate),
                )
            raise RateLimitedError(caller.name, bucket.wait())

    # --- the login page ------------------------------------------------------------------

    async def _login_routes(self, scope: Scope, receive: Receive, send: Send) -> None:
        method, path = scope["method"], scope["path"]
        page_send = _with_page_headers(send)
        if path == "/login" and method in ("GET", "HEAD"):
            await _html(page_send, 200, _login_page(None))
            return
        if method != "POST":
            refusal = _LoginOnly if path == "/login" else _LogoutOnly
            await respond_error(scope, send, refusal(f"{method} is not allowed here"))
            return
        if not _same_origin(scope):
            await respond_error(
                scope, send, ForbiddenError("a login form must come from this site")
            )
            return
        if path == "/logout":
            session = _cookie(scope)
            if session is not None:
                try:
                    await self.sessions.end(session)
                except AppError as error:
                    await respond_error(scope, send, error)
                    return
            await _redirect(send, "/login", cookie=f"{COOKIE}=; Max-Age=0; Path=/; HttpOnly")
            return
        body = b""
        async for chunk in body_chunks(receive):
            body += chunk
            if len(body) > _LOGIN_MAX_BODY:
                await _html(page_send, 413, _login_page("That is not an API key."))
                return
        fields = parse_qsl(body.decode("latin-1"), keep_blank_values=True)
        token = next((value.strip() for name, value in fields if name == "key"), "")
        try:
            caller = await self.cache.resolve(token)
        except AppError as error:
            await respond_error(scope, send, error)
            return
        if caller is None or caller.api_key_id is None:
            await _html(page_send, 401, _login_page("Unknown or revoked API key."))
            return
        try:
            # A login is a request of the key: within its rate, as every other one.
            if caller.rate is not None:
                self._take_request(caller)
            # The raw token: the database hashes it and checks the key (the app's role
            # cannot start a session for a key it does not hold).
            session = await self.sessions.start(token)
        except AppError as error:
            await respond_error(scope, send, error)
            return
        if session is None:  # revoked or expired since this process loaded it
            await _html(page_send, 401, _login_page("Unknown or revoked API key."))
            return
        secure = "; Secure" if _https(scope) else ""
        cookie = (
            f"{COOKIE}={session}; Max-Age={self.sessions.max_age}; Path=/; HttpOnly; "
            f"SameSite=Strict{secure}"
        )
        log.info("browser login with the API key %r", caller.name)
        await _redirect(send, _landing(caller), cookie=cookie)


def _landing(caller: Caller) -> str:
    """Where a login lands: the status page, or, for a key bound to users (which may not
    read it: 403), the API's documentation, where its own calls can be tried."""
    return "/docs" if caller.bound else "/"


def _hold_to_binding(rule: policy.Rule, path: str, caller: Caller) -> None:
    """Raises for a bound caller where its rule's binding says the layer refuses it."""
    if rule.binding is policy.Binding.UNBOUND_ONLY:
        raise ForbiddenError("an API key bound to users cannot use this route")
    if rule.binding is policy.Binding.PATH_USER:
        raw = policy.TABLE.path_user(rule, path)
        # An id the route would refuse (422, to every caller) is left to it: the grammar is
        # the route's own (core.ids.id_in, which wallet/schemas.parse_user_id reads with),
        # so no id the route accepts is one this did not check.
        user_id = None if raw is None else id_in(raw)
        if user_id is not None and not caller.may_touch(user_id):
            raise UserNotFoundError(user_id)


def _cookie(scope: Scope) -> str | None:
    for value in header(scope, b"cookie"):
        for part in value.split(";"):
            name, _, token = part.strip().partition("=")
            if name == COOKIE and token:
                return token
    return None


def _same_origin(scope: Scope) -> bool:
    """The request's Origin names the host it was sent to (scheme aside: a TLS proxy in front
    talks plain HTTP to us)."""
    origins, hosts = header(scope, b"origin"), header(scope, b"host")
    if len(origins) != 1 or len(hosts) != 1:
        return False
    try:
        origin = urlsplit(origins[0]).netloc
    except ValueError:  # e.g. "http://[": not an origin at all
        return False
    return origin.lower() == hosts[0].lower()


def _https(scope: Scope) -> bool:
    return scope.get("scheme") == "https" or header(scope, b"x-forwarded-proto") == ["https"]


def _with_page_headers(send: Send) -> Send:
    """Adds the pages' security headers; a page without a CSP of its own gets one allowing
    exactly its inline scripts and styles (their hashes: the body is small and buffered)."""
    start: Message | None = None
    chunks: list[bytes] = []

    async def page_send(message: Message) -> None:
        nonlocal start
        if message["type"] == "http.response.start":
            start = message
            return
        if message["type"] != "http.response.body" or start is None:
            await send(message)
            return
        chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(chunks)
        headers: list[Any] = list(start.get("headers", []))
        names = {bytes(name).lower() for name, _ in headers}
        headers += [(n, v) for n, v in _PAGE_HEADERS if n not in names]
        if b"content-security-policy" not in names:
            headers.append((b"content-security-policy", _policy_for(body)))
        await send({**start, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return page_send


def _policy_for(body: bytes) -> bytes:
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for kind, content in _INLINE.findall(body):
        digest = base64.b64encode(hashlib.sha256(content).digest()).decode()
        hashes[kind.lower()].append(f"'sha256-{digest}'")
    scripts = " ".join(["'self'", *hashes[b"script"]])
    styles = " ".join(["'self'", *hashes[b"style"]])
    return (
        f"default-src 'self'; script-src {scripts}; style-src {styles}; img-src 'self' data:; "
        "worker-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; form-action 'self'"
    ).encode()


async def _redirect(send: Send, location: str, *, cookie: str | None = None) -> None:
    headers = [(b"location", location.encode()), (b"content-type", b"text/plain")]
    if cookie is not None:
        headers.append((b"set-cookie", cookie.encode("latin-1")))
    await respond(send, 303, b"", headers)


async def _html(send: Send, status: int, page: str) -> None:
    await respond(send, status, page.encode(), [(b"content-type", b"text/html; charset=utf-8")])


def _login_page(problem: str | None) -> str:
    said = f"<p><strong>{html.escape(problem)}</strong></p>" if problem else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Tandem: sign in</title></head>
<body><h1>Tandem</h1>{said}
<form method="post" action="/login">
<p><label>API key <input name="key" type="password" autocomplete="off" required
size="60"></label></p>
<p><button type="submit">Sign in</button></p></form>
<p>A key with the scope <code>tasks:read</code> shows the status page; any key opens the API
docs. Make one with <code>tandem keys create</code>.</p></body></html>
"""
