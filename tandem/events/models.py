"""The change stream's tables. ``events`` is written only by the owner's trigger functions
(with the change each reports, in its transaction) and stamped and pruned only by the owner's
functions; the application's role reads it. Webhook endpoints and their delivery records are
the application's working tables."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    ARRAY,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Text,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column

from tandem.core.models import Base

# Every event type, as its trigger function writes it (tandem/events/sql).
WALLET_EVENT_TYPES = (
    "user.created",
    "balance.updated",
    "transfer.created",
    "hold.created",
    "hold.captured",
    "hold.released",
    "hold.expired",
)
TASK_EVENT_TYPES = (
    "task.run.failed",
    "task.run.lost",
    "task.run.timed_out",
    "task.run.exhausted",
)
EVENT_TYPES = WALLET_EVENT_TYPES + TASK_EVENT_TYPES

# An endpoint's state: delivering, or given up on (failing past the retry window: disabled).
ENDPOINT_STATES = ("active", "failing")
# How an attempt to deliver ended.
DELIVERY_OUTCOMES = ("delivered", "failed")


def _one_of(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


class Event(Base):
    """One event: what changed, as the change's own transaction wrote it. ``position`` is its
    place in the stream, given once by the sequencer after its commit (NULL until then)."""

    __tablename__ = "events"
    __table_args__ = (
        CheckConstraint(_one_of("type", EVENT_TYPES), name="type"),
        # Every index but the key and the sequencer's own is partial on a position: writing
        # an event (in the change's transaction) touches two indexes; the stamp, off the
        # change's path, adds the readers' entries.
        Index(
            "uq_events_position",
            "position",
            unique=True,
            postgresql_where=text("position IS NOT NULL"),
        ),
        # What the sequencer stamps next: the committed events without a position, by id.
        Index("ix_events_unstamped", "id", postgresql_where=text("position IS NULL")),
        # A user's events in stream order: GET /events?userId= and keys bound to users.
        Index(
            "ix_events_user_id",
            "user_id",
            "position",
            postgresql_where=text("position IS NOT NULL"),
        ),
        Index(
            "ix_events_other_user_id",
            "other_user_id",
            "position",
            postgresql_where=text("other_user_id IS NOT NULL AND position IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    type: Mapped[str] = mapped_column(Text, nullable=False)
    # The user it is about (a transfer's or a hold's payer); NULL for the cron's events.
    user_id: Mapped[int | None] = mapped_column(BigInteger)
    # The other user of a transfer, or of a hold with a payee.
    other_user_id: Mapped[int | None] = mapped_column(BigInteger)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB, nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    position: Mapped[int | None] = mapped_column(BigInteger)


class EventStream(Base):
    """The stream's one row: the last position stamped (the sequencer's fence: locked by the
    stamping transaction) and the last one pruned (a cursor below it has expired)."""

    __tablename__ = "event_stream"
    __table_args__ = (CheckConstraint("id", name="one_row"),)

    id: Mapped[bool] = mapped_column(primary_key=True, server_default=text("true"))
    last_position: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
    pruned_through: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=text("0")
    )


class WebhookEndpoint(Base):
    """A receiver of events: its URL, the types it wants (NULL: all), its signing secrets and
    its cursor (the position delivered through)."""

    __tablename__ = "webhook_endpoints"
    __table_args__ = (
        CheckConstraint(_one_of("state", ENDPOINT_STATES), name="state"),
        CheckConstraint("types IS NULL OR cardinality(types) > 0", name="types"),
        CheckConstraint(
            "(previous_secret IS NULL) = (previous_secret_until IS NULL)", name="previous_secret"
        ),
        CheckConstraint("attempts >= 0", name="attempts"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    url: Mapped[str] = mapped_column(Text, nullable=False)
    types: Mapped[list[str] | None] = mapped_column(ARRAY(Text))
    enabled: Mapped[bool] = mapped_column(Boolean, nullable=False, server_default=text("true"))
    state: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'active'"))
    secret: Mapped[str] = mapped_column(Text, nullable=False)
    # The secret before the last rotation, still signing (beside the new one) until then.
    previous_secret: Mapped[str | None] = mapped_column(Text)
    previous_secret_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Delivered (acknowledged) through this position; the next is the first after it.
    position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # Bumped by a replay: a delivery worker's cursor write of an older generation is refused.
    generation: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    # The failed attempts at the event after ``position`` since the first (NULL: none).
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default=text("0"))
    failing_since: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    next_attempt_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    # The API key that created it.
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))


class WebhookDelivery(Base):
    """One attempt to deliver one event to one endpoint."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint(_one_of("outcome", DELIVERY_OUTCOMES), name="outcome"),
        Index("ix_webhook_deliveries_endpoint_id", "endpoint_id", "id"),
        Index("ix_webhook_deliveries_created_at", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    endpoint_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("webhook_endpoints.id", ondelete="CASCADE"), nullable=False
    )
    # No foreign key: events are pruned, the record of their delivery may outlive them.
    event_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    position: Mapped[int] = mapped_column(BigInteger, nullable=False)
    attempt: Mapped[int] = mapped_column(Integer, nullable=False)
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    status_code: Mapped[int | None] = mapped_column(Integer)
    duration_ms: Mapped[int] = mapped_column(Integer, nullable=False)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
