"""The status page: ``GET /`` (the whole page) and ``GET /status/fragment`` (its live part)."""

from __future__ import annotations

from datetime import timedelta

from fastapi import APIRouter
from fastapi.responses import HTMLResponse

from tandem.core.dependencies import CurrentInstance
from tandem.status import page, service

router = APIRouter(tags=["status page"])

# About a screenful of runs, whatever the number of tasks.
HISTORY_LIMIT = 20
# Heartbeats may be this many intervals old before an instance is shown late.
LATE_HEARTBEATS = 2

_HEADERS = {
    "Content-Security-Policy": page.CONTENT_SECURITY_POLICY,
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
}


async def _render(instance: CurrentInstance, *, whole: bool) -> HTMLResponse:
    settings = instance.settings
    window = timedelta(seconds=settings.scheduler_live_window)
    snapshot = await instance.database.transact(
        lambda session: service.read_snapshot(session, window, HISTORY_LIMIT), writes=False
    )
    served_by = instance.instance_id
    late_after = LATE_HEARTBEATS * settings.scheduler_heartbeat_interval
    if whole:
        body = page.render_page(
            snapshot,
            served_by=served_by,
            late_after=late_after,
            auth_disabled=settings.auth_disabled,
        )
    else:
        body = page.render_fragment(snapshot, served_by=served_by, late_after=late_after)
    return HTMLResponse(body, headers=_HEADERS)


@router.get(
    "/",
    response_class=HTMLResponse,
    summary="Status page: running and pending tasks, live instances, recent runs",
    description=(
        "An HTML page for people (no external assets, works offline), complete without "
        f"JavaScript and refreshed every {page.REFRESH_SECONDS} s with it. For programs: "
        "`/tasks`, `/instances`, `/metrics`."
    ),
    responses={200: {"content": {"text/html": {}}, "description": "The page."}},
)
async def status_page(instance: CurrentInstance) -> HTMLResponse:
    return await _render(instance, whole=True)


# The page's script swaps this in; not an API of its own.
@router.get("/status/fragment", response_class=HTMLResponse, include_in_schema=False)
async def status_fragment(instance: CurrentInstance) -> HTMLResponse:
    return await _render(instance, whole=False)
