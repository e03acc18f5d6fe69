"""The application factory and its lifespan: wiring only."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline

import tandem
from tandem.access.cache import KeyCache
from tandem.access.endpoints import router as keys_router
from tandem.access.layer import AccessControl
from tandem.access.openapi import document_access
from tandem.access.service import register_configured_key
from tandem.access.sessions import Sessions
from tandem.core.asgi import ASGIApp
from tandem.core.database import Database
from tandem.core.dependencies import Instance, instance_of
from tandem.core.handlers import install_error_handlers
from tandem.core.openapi import install_openapi
from tandem.core.runtime import tune_gc
from tandem.core.settings import Settings, get_settings
from tandem.events.endpoints import router as events_router
from tandem.events.service import StreamWatch
from tandem.maintenance import maintenance_registry
from tandem.observability.endpoints import router as observability_router
from tandem.observability.metrics import INSTANCE_INFO, HttpMetricsMiddleware
from tandem.scheduler.endpoints import router as scheduler_router
from tandem.scheduler.registry import Registry, load_registry
from tandem.scheduler.runner import Runner
from tandem.scheduler.schedule_endpoints import router as schedules_router
from tandem.status.endpoints import router as status_router
from tandem.wallet import hotroutes
from tandem.wallet.endpoints import router as wallet_router
from tandem.wallet.endpoints import wallet_batches_of
from tandem.wallet.fastpath import WalletFastPath
from tandem.wallet.service import WalletBatches

log = logging.getLogger(__name__)


def create_asgi_app(settings: Settings | None = None) -> ASGIApp:
    """What `tandem serve` runs: the FastAPI app with, outside it, the wallet's lean path, the
    access layer (every route's key check, both paths) and the HTTP metrics. Outside, not
    through ``add_middleware``: FastAPI's own middleware stack costs more per request than the
    wallet's whole statement."""
    settings = settings or get_settings()
    app = create_app(settings)
    instance = instance_of(app)
    sessions = Sessions(instance.database, lookups_per_second=settings.auth_lookups_per_second)
    batches = wallet_batches_of(app)
    fast_path = WalletFastPath(app, instance, batches)
    access = AccessControl(fast_path, keys_of(app), sessions, disabled=settings.auth_disabled)
    return HttpMetricsMiddleware(access, instance.instance_id)


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
    keys = KeyCache(
        database, settings.auth_cache_ttl, lookups_per_second=settings.auth_lookups_per_second
    )
    # Where the change stream ends, for the requests waiting on GET /events?wait=.
    watch = StreamWatch(lambda: database.pool)

    # The tasks this instance has code for: what its scheduler runs, and what /schedules
    # checks a schedule's task and params against.
    registry = load_registry(settings.scheduler_tasks)
    if settings.maintenance_enabled:
        registry = Registry.combine(registry, maintenance_registry(database, watch))

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await database.open()
        if settings.auth_disabled:
            log.warning(
                "AUTHENTICATION IS DISABLED (TANDEM_AUTH_DISABLED): anyone who reaches this "
                "instance can read and move money and run tasks"
            )
        registering = asyncio.ensure_future(register_configured_key(settings, database))
        with contextlib.suppress(TimeoutError):
            # Usually done at once; a missing schema must not hold up the start.
            await asyncio.wait_for(asyncio.shield(registering), 2.0)
        await keys.start()
        runner: Runner | None = None
        if settings.scheduler_enabled:
            runner = Runner(settings, registry, database, instance.instance_id)
            await runner.start()
        tune_gc()
        try:
            yield
        finally:
            # Drain first: released runs are picked up elsewhere while we close.
            if runner is not None:
                await runner.stop()
            registering.cancel()
            await watch.close()
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
        # A trailing slash is an unknown path (404) like any other, not a 307 to the path
        # without it: Starlette builds that Location from the request's own scheme (http://
        # behind TLS at the edge), and the policy table knows every route by its one spelling.
        redirect_slashes=False,
    )
    instance.attach(app)
    app.state.keys = keys
    app.state.events_watch = watch
    app.state.task_registry = registry
    # Group commit's queues (tandem/wallet/batching.py), shared by the lean path's balance
    # updates and the transfers route; None: off.
    app.state.wallet_batches = (
        WalletBatches.of(database, settings.wallet_batch_max, settings.wallet_batch_wait)
        if settings.wallet_group_commit
        else None
    )
    # One series per process: an app created again in the same process (the in-process
    # tests) replaces the previous one's.
    INSTANCE_INFO.clear()
    INSTANCE_INFO.labels(instance.instance_id, socket.gethostname(), tandem.__version__).set(1)
    install_error_handlers(app)
    # The hot routes' operations: no FastAPI route serves them (the lean path does).
    install_openapi(app, operations=[hotroutes.OPERATIONS], amend=[document_access])
    app.include_router(wallet_router)
    app.include_router(scheduler_router)
    app.include_router(observability_router)
    app.include_router(status_router)
    app.include_router(keys_router)
    app.include_router(events_router)
    app.include_router(schedules_router)
    return app
