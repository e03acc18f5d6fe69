"""Database failures are counted once per answer, by kind, whichever layer renders them: the
FastAPI app's handlers (tandem/core/handlers.py) or an ASGI layer beneath it
(tandem/core/asgi.py), both counted by the metrics middleware. In process, no database."""

from __future__ import annotations

import httpx
from fastapi import FastAPI
from prometheus_client import REGISTRY

from tandem.core.asgi import Receive, Scope, Send, respond_error
from tandem.core.errors import NotFoundError
from tandem.core.failures import not_applied, outcome_unknown
from tandem.core.handlers import install_error_handlers
from tandem.observability.metrics import HttpMetricsMiddleware


def failures() -> dict[str, float]:
    return {
        kind: REGISTRY.get_sample_value("tandem_database_failures_total", {"kind": kind}) or 0.0
        for kind in ("not_applied", "outcome_unknown")
    }


def make_app() -> HttpMetricsMiddleware:
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/routed/unknown")
    async def routed_unknown() -> None:
        raise outcome_unknown()

    @app.get("/routed/unavailable")
    async def routed_unavailable() -> None:
        raise not_applied("the test says so")

    @app.post("/routed/broken")
    async def routed_broken() -> None:
        raise ConnectionResetError("the connection broke mid-write")

    @app.get("/routed/missing")
    async def routed_missing() -> None:
        raise NotFoundError("no such thing")

    async def beneath(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"] == "/lean/unknown":
            await respond_error(scope, send, outcome_unknown())
        elif scope["type"] == "http" and scope["path"] == "/lean/unavailable":
            await respond_error(scope, send, not_applied("the test says so"))
        else:
            await app(scope, receive, send)

    return HttpMetricsMiddleware(beneath, "test")


async def test_database_failures_are_counted_by_kind_on_both_paths() -> None:
    """Each 503 counts once under its kind; other errors count nothing."""
    # The catch-all handler answers, then re-raises for the server to log: not the test's.
    transport = httpx.ASGITransport(app=make_app(), raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
        for method, path, kind in [
            ("POST", "/routed/unknown", "outcome_unknown"),
            ("GET", "/routed/unavailable", "not_applied"),
            ("POST", "/routed/broken", "outcome_unknown"),
            ("GET", "/lean/unknown", "outcome_unknown"),
            ("GET", "/lean/unavailable", "not_applied"),
            ("GET", "/routed/missing", None),
        ]:
            before = failures()
            answer = await client.request(method, path)
            gained = {k: v - before[k] for k, v in failures().items() if v != before[k]}
            if kind is None:
                assert answer.status_code == 404
                assert gained == {}
            else:
                assert answer.status_code == 503, (path, answer.text)
                assert answer.json()["error"]["code"] in ("database_unavailable", kind)
                assert gained == {kind: 1.0}, path
