"""Health and metrics endpoints."""

from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from tandem.core.dependencies import Db
from tandem.observability.health import check_readiness
from tandem.observability.metrics import METRICS_CONTENT_TYPE, render_metrics

router = APIRouter(tags=["operations"])


class Liveness(BaseModel):
    status: Literal["ok"] = "ok"


class ReadinessOut(BaseModel):
    status: Literal["ready", "not_ready"]
    database: str
    schema_revision: str | None
    expected_revision: str


@router.get("/health/live", response_model=Liveness, summary="The process answers")
async def live() -> Liveness:
    return Liveness()


@router.get(
    "/health/ready",
    response_model=ReadinessOut,
    summary="The database answers and the schema is at the latest migration",
    responses={503: {"model": ReadinessOut, "description": "Not ready: see the fields."}},
)
async def ready(db: Db) -> JSONResponse:
    result = await check_readiness(db.engine)
    body = ReadinessOut(
        status="ready" if result.ready else "not_ready",
        database=result.database,
        schema_revision=result.schema_revision,
        expected_revision=result.expected_revision,
    )
    return JSONResponse(body.model_dump(), status_code=200 if result.ready else 503)


@router.get(
    "/metrics",
    summary="Prometheus metrics of this instance",
    response_class=Response,
    responses={200: {"content": {METRICS_CONTENT_TYPE: {}}, "description": "Text format."}},
)
async def metrics() -> Response:
    return Response(render_metrics(), media_type=METRICS_CONTENT_TYPE)
