"""The change stream's server-side functions (files in ``sql/``), declared once: the
migration that creates each version and the test of the catalog both read these."""

from __future__ import annotations

from pathlib import Path

from tandem.core.functions import ServerFunction

_SQL = Path(__file__).resolve().parent / "sql"


def _trigger_function(name: str) -> ServerFunction:
    """A trigger function writing events: run as the owner (the application's role, which
    ends cron runs, may not write events), search_path pinned, callable by no one (a trigger
    runs its function whatever the EXECUTE rights)."""
    return ServerFunction(
        name,
        _SQL / f"{name.removeprefix('tandem_')}.sql",
        "",
        security_definer=True,
        config=("search_path=public, pg_temp",),
        execute=(),
    )


# The events of the journal: a statement trigger on ledger_entries (ledger_entries_events).
EVENTS_FROM_ENTRIES_V1 = _trigger_function("tandem_events_from_entries_v1")
# The events of holds: a statement trigger on hold_events (hold_events_events).
EVENTS_FROM_HOLDS_V1 = _trigger_function("tandem_events_from_holds_v1")
# The cron's failures: a row trigger on task_history (task_history_events).
EVENTS_FROM_RUNS_V1 = _trigger_function("tandem_events_from_runs_v1")

# The sequencer: positions for committed events (the delivery worker calls it).
STAMP_EVENTS_V1 = ServerFunction.as_owner(_SQL, "tandem_stamp_events_v1", "p_limit integer")
# Retention: deletes the oldest stamped events (the housekeeping task calls it).
PRUNE_EVENTS_V1 = ServerFunction.as_owner(
    _SQL, "tandem_prune_events_v1", "p_keep interval, p_limit integer"
)

# What migration 0019 creates, in order.
CHANGE_STREAM_FUNCTIONS = (
    EVENTS_FROM_ENTRIES_V1,
    EVENTS_FROM_HOLDS_V1,
    EVENTS_FROM_RUNS_V1,
    STAMP_EVENTS_V1,
    PRUNE_EVENTS_V1,
)

# Each trigger: its name, table and definition (migration 0019 creates them).
TRIGGERS = (
    (
        "ledger_entries_events",
        "ledger_entries",
        "AFTER INSERT ON ledger_entries REFERENCING NEW TABLE AS new_entries "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {EVENTS_FROM_ENTRIES_V1.name}()",
    ),
    (
        "hold_events_events",
        "hold_events",
        "AFTER INSERT ON hold_events REFERENCING NEW TABLE AS new_hold_events "
        f"FOR EACH STATEMENT EXECUTE FUNCTION {EVENTS_FROM_HOLDS_V1.name}()",
    ),
    (
        "task_history_events",
        "task_history",
        "AFTER UPDATE OF status ON task_history FOR EACH ROW "
        "WHEN (OLD.status = 'running' AND NEW.status IN ('failed', 'lost', 'timed_out')) "
        f"EXECUTE FUNCTION {EVENTS_FROM_RUNS_V1.name}()",
    ),
)

CURRENT = CHANGE_STREAM_FUNCTIONS
