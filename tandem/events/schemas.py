"""What the change stream's routes show, as the OpenAPI schema documents it."""

from __future__ import annotations

from datetime import datetime
from typing import Any

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
