"""The application factory and its lifespan: wiring only."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from fastapi_offline import FastAPIOffline
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.exceptions import HTTPException as StarletteHTTPException

import tandem
from tandem.core.database import create_engine, create_pool, create_sessionmaker
from tandem.core.errors import AppError
from tandem.core.settings import Settings, get_settings
from tandem.observability.endpoints import router as observability_router
from tandem.observability.metrics import HttpMetricsMiddleware
from tandem.wallet.endpoints import router as wallet_router
from tandem.wallet.fastpath import WalletFastPath
from tandem.wallet.schemas import BalanceUpdate

log = logging.getLogger(__name__)

# Failures of the database connection itself: the request may be retried elsewhere.
_UNAVAILABLE = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.CannotConnectNowError)
_HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


@dataclass
class Resources:
    """What the lifespan opens and every request uses."""

    settings: Settings
    engine: AsyncEngine | None = None
    sessionmaker: async_sessionmaker[AsyncSession] | None = None
    pool: asyncpg.Pool | None = field(default=None)

    def require_pool(self) -> asyncpg.Pool:
        assert self.pool is not None, "used outside the lifespan"
        return self.pool


def _error(status: int, code: str, message: str, details: Any = None) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return JSONResponse(exc.to_dict(), status_code=exc.status_code)

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
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        if isinstance(exc, _UNAVAILABLE):
            log.warning("database unavailable: %r", exc)
            return _error(503, "database_unavailable", "the database is unavailable; retry")
        log.exception("unhandled error")
        return _error(500, "internal_error", "internal error")


def _install_openapi(app: FastAPI) -> None:
    """The wallet's update route reads its raw body (one parser for both paths), so its
    request schema is declared by reference; add that schema to the components."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            components["BalanceUpdate"] = BalanceUpdate.model_json_schema(
                ref_template="#/components/schemas/{model}"
            )
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    resources = Resources(settings)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        resources.pool = await create_pool(settings)
        resources.engine = create_engine(settings)
        resources.sessionmaker = create_sessionmaker(resources.engine)
        try:
            yield
        finally:
            await resources.pool.close()
            await resources.engine.dispose()

    app = FastAPIOffline(
        title="Tandem",
        version=tandem.__version__,
        description=(
            "Atomic wallet balances and a cluster cron over one PostgreSQL. Errors are "
            '`{"error": {"code", "message"}}` with stable codes.'
        ),
        lifespan=lifespan,
    )
    app.state.resources = resources
    _install_error_handlers(app)
    _install_openapi(app)
    app.include_router(wallet_router)
    app.include_router(observability_router)
    if settings.wallet_fast_path:
        app.add_middleware(WalletFastPath, pool=resources.require_pool)
    # Added last, so outermost: it also measures what the lean path answers.
    app.add_middleware(HttpMetricsMiddleware)
    return app
