"""The application factory and its lifespan: wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from starlette.exceptions import HTTPException as StarletteHTTPException

import tandem
from tandem.access import policy
from tandem.access.cache import KeyCache
from tandem.access.layer import AccessControl
from tandem.access.service import KeyCommandError, ensure_configured_key
from tandem.core.database import Database
from tandem.core.dependencies import Instance, instance_of
from tandem.core.errors import AppError, envelope
from tandem.core.failures import count_answered, error_for_unexpected
from tandem.core.openapi import error_responses_schema
from tandem.core.settings import Settings, get_settings
from tandem.maintenance import maintenance_registry
from tandem.observability.endpoints import router as observability_router
from tandem.observability.metrics import INSTANCE_INFO, ASGIApp, HttpMetricsMiddleware
from tandem.scheduler.endpoints import router as scheduler_router
from tandem.scheduler.registry import Registry, load_registry
from tandem.scheduler.runner import Runner
from tandem.status.endpoints import router as status_router
from tandem.wallet.endpoints import LEAN_MODELS, lean_operations
from tandem.wallet.endpoints import router as wallet_router
from tandem.wallet.fastpath import WalletFastPath
from tandem.wallet.schemas import TransferCreate, UserCreate

log = logging.getLogger(__name__)

_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    return JSONResponse(envelope(code, message, details), status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        count_answered(exc)
        return JSONResponse(exc.to_dict(), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def request_validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        details = [
            {
                "field": ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body",
                "type": e.get("type", "value_error"),
                "message": e.get("msg", "invalid"),
            }
            for e in exc.errors()
        ]
        return _error(422, "validation_error", "invalid request", details)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:
            # FastAPI's "error parsing the body" (e.g. bytes that are not UTF-8): for the
            # client it is malformed input like any other, so the same 422 and code.
            return _error(422, "validation_error", str(exc.detail))
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        response = _error(exc.status_code, code, str(exc.detail))
        if exc.headers:
            response.headers.update(exc.headers)
        return response

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        writes = request.method not in ("GET", "HEAD", "OPTIONS")
        error = error_for_unexpected(exc, writes=writes)
        log.error("%s", error.code, exc_info=exc)
        count_answered(error)
        return JSONResponse(error.to_dict(), status_code=error.status_code, headers=error.headers)


def _install_openapi(app: FastAPI) -> None:
    """FastAPI's schema of its routes, plus the wallet's two lean-path operations (no FastAPI
    route serves them: endpoints.lean_operations) and the request models that routes reading
    their raw body declare by reference."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            paths = schema.setdefault("paths", {})
            for path, operations in lean_operations().items():
                paths.setdefault(path, {}).update(operations)
            _document_access(schema)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for model in (*LEAN_MODELS, TransferCreate, UserCreate):
                model_schema = model.model_json_schema(
                    ref_template="#/components/schemas/{model}", mode="serialization"
                )
                components.update(model_schema.pop("$defs", {}))
                components[model.__name__] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


_ACCESS_ERRORS = error_responses_schema(
    (401, "unauthenticated", "no API key, or an unknown or revoked one"),
    (403, "forbidden", "the API key lacks the scope this needs (or a cross-site cookie)"),
)


def _document_access(schema: dict[str, Any]) -> None:
    """The bearer scheme, and on every protected operation the scope it needs (from the one
    table the access layer checks, access/policy.py) and its 401/403."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`tandem keys create`), as Authorization: Bearer <token>.",
    }
    for path, operations in schema.get("paths", {}).items():
        rule = policy.rule_for(path.replace("{", "").replace("}", ""))
        if rule.requirement == policy.PUBLIC:
            continue
        for operation in operations.values():
            operation["security"] = [{"apiKey": []}]
            if rule.requirement != policy.ANY_KEY:
                needs = f"Needs an API key with the scope `{rule.requirement}` (or `all`)."
                operation["description"] = f"{operation.get('description', '')}\n\n{needs}"
            for status_code, response in _ACCESS_ERRORS.items():
                operation.setdefault("responses", {}).setdefault(status_code, response)


def _tune_gc() -> None:
    """A burst keeps ~10000 connections' objects alive, and every full collection walks them
    all: ~30% of the server's CPU with the default thresholds. Freeze what startup allocated
    (never garbage) and collect the young generation less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def create_asgi_app(settings: Settings | None = None) -> ASGIApp:
    """What `tandem serve` runs: the FastAPI app with, outside it, the wallet's lean path, the
    access layer (every route's key check, both paths) and the HTTP metrics. Outside, not
    through ``add_middleware``: FastAPI's own middleware stack costs more per request than the
    wallet's whole statement."""
    settings = settings or get_settings()
    app = create_app(settings)
    instance = instance_of(app)
    access = AccessControl(
        WalletFastPath(app, instance), keys_of(app), disabled=settings.auth_disabled
    )
    return HttpMetricsMiddleware(access, instance.instance_id)


async def _register_configured_key(settings: Settings, database: Database) -> None:
    """The configured key (TANDEM_API_KEY or its file), registered once the schema is there:
    an instance may start before its migrations, so it tries again until it can."""
    token = settings.configured_api_key()
    if token is None:
        return
    while True:
        try:
            async with database.hot.acquire() as conn:
                await ensure_configured_key(conn, token, settings.api_key_name)
            return
        except KeyCommandError as error:
            log.error("%s", error)
            return
        except Exception as error:
            log.warning("cannot register the configured API key yet (%s); retrying", error)
            await asyncio.sleep(1.0)


def keys_of(app: FastAPI) -> KeyCache:
    """The process's API keys (create_asgi_app's access layer reads them; no route does)."""
    keys = app.state.keys
    assert isinstance(keys, KeyCache), "create_app() attaches the keys"
    return keys


def create_app(settings: Settings | None = None) -> FastAPI:
    """The FastAPI application: every route but the wallet's two hot ones, all documented
    (those two too); the lean path that serves those is create_asgi_app's."""
    settings = settings or get_settings()
    database = Database(settings)
    instance = Instance(settings, database)
    keys = KeyCache(database, settings.auth_cache_ttl)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await database.open()
        if settings.auth_disabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (TANDEM_AUTH_DISABLED): anyone who reaches this "
                "instance can read and move money and run tasks"
            )
        registering = asyncio.ensure_future(_register_configured_key(settings, database))
        with contextlib.suppress(TimeoutError):
            # Usually done at once; a missing schema must not hold up the start.
            await asyncio.wait_for(asyncio.shield(registering), 2.0)
        await keys.start()
        runner: Runner | None = None
        if settings.scheduler_enabled:
            registry = load_registry(settings.scheduler_tasks)
            if settings.maintenance_enabled:
                registry = Registry.combine(registry, maintenance_registry(database))
            runner = Runner(settings, registry, database, instance.instance_id)
            await runner.start()
        _tune_gc()
        try:
            yield
        finally:
            # Drain first: released runs are picked up elsewhere while we close.
            if runner is not None:
                await runner.stop()
            registering.cancel()
            await keys.stop()
            await database.close()

    app = FastAPIOffline(
        title="Tandem",
        version=tandem.__version__,
        description=(
            "Atomic wallet balances and a cluster cron over one PostgreSQL. Errors are "
            '`{"error": {"code", "message"}}` with stable codes.'
        ),
        lifespan=lifespan,
        # Metrics are Prometheus (/metrics); FastAPI's OpenTelemetry hooks would only add
        # per-request environment lookups.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    instance.attach(app)
    app.state.keys = keys
    # One series per process: an app created again in the same process (the in-process
    # tests) replaces the previous one's.
    INSTANCE_INFO.clear()
    INSTANCE_INFO.labels(instance.instance_id, socket.gethostname(), tandem.__version__).set(1)
    _install_error_handlers(app)
    _install_openapi(app)
    app.include_router(wallet_router)
    app.include_router(scheduler_router)
    app.include_router(observability_router)
    app.include_router(status_router)
    return app
