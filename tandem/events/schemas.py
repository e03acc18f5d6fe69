"""What the change stream's routes show, as the OpenAPI schema documents it."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class Event(BaseModel):
    """One event, as GET /events lists it and a webhook's body carries it."""

    model_config = ConfigDict(extra="allow")

    id: str = Field(description="Stable across redeliveries and replays (the `webhook-id`).")
    type: str
    createdAt: datetime
    data: dict[str, Any]


class EventPage(BaseModel):
    events: list[Event]
    next: str = Field(description="The cursor to pass as `after` for what follows.")


_STRICT = ConfigDict(strict=True, extra="forbid", populate_by_name=True)
# An event type's shape only (which ones exist is the service's to say, with its own code).
EventType = Annotated[str, Field(pattern=r"^[a-z][a-z_.]{0,63}$")]


class EndpointCreate(BaseModel):
    model_config = ConfigDict(
        **_STRICT,
        json_schema_extra={
            "examples": [{"url": "https://orders.example.com/hooks/tandem", "types": None}]
        },
    )

    url: str = Field(min_length=1, max_length=2048, description="http or https, no credentials.")
    types: list[EventType] | None = Field(
        default=None, min_length=1, max_length=32, description="Only these types (null: all)."
    )


class EndpointUpdate(BaseModel):
    model_config = _STRICT

    url: str | None = Field(default=None, min_length=1, max_length=2048)
    types: list[EventType] | None = Field(default=None, min_length=1, max_length=32)
    enabled: bool | None = Field(
        default=None, description="true: deliver again (a failing endpoint starts afresh)."
    )


class SecretRotation(BaseModel):
    model_config = _STRICT

    overlap: int = Field(
        default=86_400,
        ge=0,
        le=7 * 86_400,
        description="Seconds the old secret keeps signing beside the new one.",
    )


class Replay(BaseModel):
    model_config = _STRICT

    from_: str = Field(alias="from", max_length=20, description="A cursor of GET /events.")


class WebhookEndpoint(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int
    url: str
    types: list[str] | None
    enabled: bool
    state: str = Field(description="active, or failing (past the retry window: disabled).")
    cursor: str = Field(description="Delivered through this position of the stream.")
    attempts: int = Field(description="Failed attempts at the next event.")
    failing_since: datetime | None = Field(alias="failingSince")
    next_attempt_at: datetime | None = Field(alias="nextAttemptAt")
    created_at: datetime = Field(alias="createdAt")
    updated_at: datetime = Field(alias="updatedAt")
    previous_secret_until: datetime | None = Field(
        alias="previousSecretUntil", description="The old secret signs too until then."
    )
    secret: str | None = Field(
        default=None, description="Shown once: at creation and at a rotation (whsec_...)."
    )


class WebhookEndpointList(BaseModel):
    endpoints: list[WebhookEndpoint]


class WebhookDelivery(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    id: int
    event_id: str = Field(alias="eventId")
    cursor: str
    attempt: int
    outcome: str = Field(description="delivered (a 2xx) or failed")
    status_code: int | None = Field(alias="statusCode")
    duration_ms: int = Field(alias="durationMs")
    error: str | None
    created_at: datetime = Field(alias="createdAt")


class WebhookDeliveryList(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    deliveries: list[WebhookDelivery]
    next_before: int | None = Field(alias="nextBefore")
