"""The change stream: events written with the changes they report, a sequencer's positions,
webhook endpoints and their deliveries.

- ``events``: one row per change of money (the journal's and the holds' statement triggers,
  ``tandem_events_from_entries_v1`` and ``tandem_events_from_holds_v1``) and per failed cron
  run (``tandem_events_from_runs_v1`` on task_history), written in the change's own
  statement, so by every function that writes the journal, this release's or an older one's
  during a rolling deploy. ``position`` is given after the commit by
  ``tandem_stamp_events_v1``; ``event_stream`` is its one row (last position, pruned
  through); ``tandem_prune_events_v1`` deletes past the retention.
- The application's role reads ``events`` and ``event_stream`` and writes neither (only the
  owner's trigger and functions do: tandem/core/migrations.py APP_READ_ONLY_EVENTS);
  ``webhook_endpoints`` and ``webhook_deliveries`` are its working tables.
- Changes made before this migration have no events: the stream starts here.

Optional for this release (tandem/core/migrations.py OPTIONAL), like 0018: until it is
applied the events API answers 503 ``events_unavailable`` and the delivery worker waits.

Revision ID: 0019_change_stream
Revises: 0018_group_commit
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

from tandem.events.functions import CHANGE_STREAM_FUNCTIONS, TRIGGERS

revision: str = "0019_change_stream"
down_revision: str | None = "0018_group_commit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

TABLES = """
CREATE TABLE events (
    id bigint GENERATED ALWAYS AS IDENTITY,
    type text NOT NULL,
    user_id bigint,
    other_user_id bigint,
    data jsonb NOT NULL,
    created_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    position bigint,
    CONSTRAINT pk_events PRIMARY KEY (id),
    CONSTRAINT ck_events_type CHECK (type IN ('user.created', 'balance.updated',
        'transfer.created', 'hold.created', 'hold.captured', 'hold.released', 'hold.expired',
        'task.run.failed', 'task.run.lost', 'task.run.timed_out', 'task.run.exhausted'))
);
CREATE UNIQUE INDEX uq_events_position ON events (position) WHERE position IS NOT NULL;
CREATE INDEX ix_events_unstamped ON events (id) WHERE position IS NULL;
CREATE INDEX ix_events_user_id ON events (user_id, position) WHERE position IS NOT NULL;
CREATE INDEX ix_events_other_user_id ON events (other_user_id, position)
    WHERE other_user_id IS NOT NULL AND position IS NOT NULL;
CREATE TABLE event_stream (
    id boolean DEFAULT true NOT NULL,
    last_position bigint DEFAULT 0 NOT NULL,
    pruned_through bigint DEFAULT 0 NOT NULL,
    CONSTRAINT pk_event_stream PRIMARY KEY (id),
    CONSTRAINT ck_event_stream_one_row CHECK (id)
);
INSERT INTO event_stream DEFAULT VALUES;
CREATE TABLE webhook_endpoints (
    id bigint GENERATED ALWAYS AS IDENTITY,
    url text NOT NULL,
    types text[],
    enabled boolean DEFAULT true NOT NULL,
    state text DEFAULT 'active' NOT NULL,
    secret text NOT NULL,
    previous_secret text,
    previous_secret_until timestamptz,
    position bigint NOT NULL,
    generation integer DEFAULT 0 NOT NULL,
    attempts integer DEFAULT 0 NOT NULL,
    failing_since timestamptz,
    next_attempt_at timestamptz,
    created_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    updated_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    api_key_id bigint,
    CONSTRAINT pk_webhook_endpoints PRIMARY KEY (id),
    CONSTRAINT fk_webhook_endpoints_api_key_id_api_keys
        FOREIGN KEY (api_key_id) REFERENCES api_keys (id),
    CONSTRAINT ck_webhook_endpoints_state CHECK (state IN ('active', 'failing')),
    CONSTRAINT ck_webhook_endpoints_types CHECK (types IS NULL OR cardinality(types) > 0),
    CONSTRAINT ck_webhook_endpoints_previous_secret
        CHECK ((previous_secret IS NULL) = (previous_secret_until IS NULL)),
    CONSTRAINT ck_webhook_endpoints_attempts CHECK (attempts >= 0)
);
CREATE TABLE webhook_deliveries (
    id bigint GENERATED ALWAYS AS IDENTITY,
    endpoint_id bigint NOT NULL,
    event_id bigint NOT NULL,
    position bigint NOT NULL,
    attempt integer NOT NULL,
    outcome text NOT NULL,
    status_code integer,
    duration_ms integer NOT NULL,
    error text,
    created_at timestamptz DEFAULT clock_timestamp() NOT NULL,
    CONSTRAINT pk_webhook_deliveries PRIMARY KEY (id),
    CONSTRAINT fk_webhook_deliveries_endpoint_id_webhook_endpoints
        FOREIGN KEY (endpoint_id) REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    CONSTRAINT ck_webhook_deliveries_outcome CHECK (outcome IN ('delivered', 'failed'))
);
CREATE INDEX ix_webhook_deliveries_endpoint_id ON webhook_deliveries (endpoint_id, id);
CREATE INDEX ix_webhook_deliveries_created_at ON webhook_deliveries (created_at)
"""


def upgrade() -> None:
    for statement in TABLES.split(";"):
        if statement.strip():
            op.execute(statement)
    for function in CHANGE_STREAM_FUNCTIONS:
        for statement in function.create_statements():
            op.execute(statement)
    for name, _table, definition in TRIGGERS:
        op.execute(f"CREATE TRIGGER {name} {definition}")


def downgrade() -> None:
    for name, table, _definition in reversed(TRIGGERS):
        op.execute(f"DROP TRIGGER {name} ON {table}")
    for function in reversed(CHANGE_STREAM_FUNCTIONS):
        op.execute(function.drop_statement())
    for table in ("webhook_deliveries", "webhook_endpoints", "event_stream", "events"):
        op.execute(f"DROP TABLE {table}")
