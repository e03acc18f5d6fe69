"""The scheduler's server-side functions (files in ``sql/``), declared once: the migration
that creates each version and the test of the catalog both read these. A released version
is never edited; a change is a new file and a new declaration (see tandem/core/functions.py)."""

from __future__ import annotations

from pathlib import Path

from tandem.core.functions import ServerFunction

_SQL = Path(__file__).resolve().parent / "sql"

CLAIM_ROW_V1 = ServerFunction(
    "tandem_claim_row_v1",
    _SQL / "claim_row_v1.sql",
    "p_instance text, p_lease interval, p_fair boolean, p_fair_fresh boolean, "
    "p_steal_after interval, p_known text[]",
)

CLAIM_RUN_V1 = ServerFunction(
    "tandem_claim_run_v1",
    _SQL / "claim_run_v1.sql",
    "p_instance text, p_key integer, p_lease interval, p_live_window interval, "
    "p_steal_after interval, p_fresh_window interval, p_slack integer, p_known text[], "
    "p_lock_timeout text",
)

OPEN_SESSION_V1 = ServerFunction(
    "tandem_open_session_v1",
    _SQL / "open_session_v1.sql",
    "p_instance text, p_lease interval",
)

HEARTBEAT_V1 = ServerFunction(
    "tandem_heartbeat_v1",
    _SQL / "heartbeat_v1.sql",
    "p_instance text, p_key integer, p_lease interval, p_ids bigint[], p_fences bigint[], "
    "p_anchor timestamp with time zone, p_valid_for interval, p_live_window interval",
)

# The claim of up to p_limit due runs (migration 0020): spec, params and policies read from
# the rows it locks. The v1 pair above stays for the previous release.
CLAIM_ROWS_V1 = ServerFunction(
    "tandem_claim_rows_v1",
    _SQL / "claim_rows_v1.sql",
    "p_instance text, p_lease interval, p_limit integer, p_overdue interval, p_known text[]",
)

CLAIM_RUNS_V1 = ServerFunction(
    "tandem_claim_runs_v1",
    _SQL / "claim_runs_v1.sql",
    "p_instance text, p_key integer, p_lease interval, p_live_window interval, "
    "p_steal_after interval, p_fresh_window interval, p_slack integer, p_known text[], "
    "p_lock_timeout text, p_limit integer",
)

# The audit row of a task command, appended as the owner (migration 0014).
RECORD_TASK_ACTION_V1 = ServerFunction.as_owner(
    _SQL, "tandem_record_task_action_v1", "p_task bigint, p_action text, p_api_key bigint"
)

# The audit row of a schedule command, with its note (migration 0020).
RECORD_TASK_ACTION_V2 = ServerFunction.as_owner(
    _SQL,
    "tandem_record_task_action_v2",
    "p_task bigint, p_action text, p_api_key bigint, p_note text",
)

# The versions this code calls, in the order they must be created (a caller after its callee).
CURRENT = (CLAIM_ROWS_V1, CLAIM_RUNS_V1, OPEN_SESSION_V1, HEARTBEAT_V1, RECORD_TASK_ACTION_V2)
# What migration 0020 creates (the previous release's versions stay).
SCHEDULES_AS_DATA = (CLAIM_ROWS_V1, CLAIM_RUNS_V1, RECORD_TASK_ACTION_V2)
