"""The wallet's server-side functions (files in ``sql/``), declared once: the migration that
creates each version and the test of the catalog both read these. A released version is
never edited; a change is a new file and a new declaration (see tandem/core/functions.py)."""

from __future__ import annotations

from pathlib import Path

from tandem.core.functions import ServerFunction

_SQL = Path(__file__).resolve().parent / "sql"


TRANSFER_V1 = ServerFunction(
    "tandem_transfer_v1",
    _SQL / "transfer_v1.sql",
    "p_from bigint, p_to bigint, p_amount bigint, p_reference text, p_key text, p_api_key bigint",
)

# The trigger function of the journal's append-only triggers (no caller: the triggers).
APPEND_ONLY_V1 = ServerFunction("tandem_append_only_v1", _SQL / "append_only_v1.sql", "")

# The tables APPEND_ONLY_V1 guards; each has a trigger named <table>_append_only.
APPEND_ONLY_TABLES = ("ledger_entries", "transfers")
# Guarded by APPEND_ONLY_V1 too since migration 0014 (APPEND_ONLY_TABLES stays what 0011
# made): the scheduler's audit rows, who ran, paused or resumed a task.
APPEND_ONLY_AUDIT_TABLES = ("task_actions",)

# Whether a mint fits under the owner's daily ceiling: called inside the functions below
# (as their owner), by nobody else (no EXECUTE for PUBLIC, none for the application).
MINT_ALLOWED_V1 = ServerFunction(
    "tandem_mint_allowed_v1", _SQL / "mint_allowed_v1.sql", "p_amount bigint", execute=()
)

APPLY_DELTA_V1 = ServerFunction.as_owner(
    _SQL,
    "tandem_apply_delta_v1",
    "p_user bigint, p_amount bigint, p_reference text, p_key text, p_api_key bigint",
)

CREATE_USER_V1 = ServerFunction.as_owner(
    _SQL, "tandem_create_user_v1", "p_balance bigint, p_api_key bigint"
)

TRANSFER_V2 = ServerFunction.as_owner(_SQL, "tandem_transfer_v2", TRANSFER_V1.arguments)

# --- holds (migration 0016) ------------------------------------------------------------------
# APPLY_DELTA_V1 and TRANSFER_V2 stay: the previous release's instances call them during a
# rolling deploy (they ignore held; holds are enabled only once none is live: 0017).

# Releases one user's expired holds: called inside the functions below (as their owner), by
# nobody else.
RELEASE_EXPIRED_V1 = ServerFunction(
    "tandem_release_expired_v1",
    _SQL / "release_expired_v1.sql",
    # As PostgreSQL prints a function with OUT parameters and no RETURNS.
    "p_user bigint, OUT released_holds integer, OUT released_amount bigint",
    execute=(),
)

APPLY_DELTA_V2 = ServerFunction.as_owner(_SQL, "tandem_apply_delta_v2", APPLY_DELTA_V1.arguments)

TRANSFER_V3 = ServerFunction.as_owner(_SQL, "tandem_transfer_v3", TRANSFER_V1.arguments)

CREATE_HOLD_V1 = ServerFunction.as_owner(
    _SQL,
    "tandem_create_hold_v1",
    "p_user bigint, p_to bigint, p_amount bigint, p_expires_in integer, p_reference text, "
    "p_key text, p_api_key bigint",
)

CAPTURE_HOLD_V1 = ServerFunction.as_owner(
    _SQL,
    "tandem_capture_hold_v1",
    "p_hold bigint, p_amount bigint, p_to bigint, p_key text, p_api_key bigint",
)

RELEASE_HOLD_V1 = ServerFunction.as_owner(
    _SQL, "tandem_release_hold_v1", "p_hold bigint, p_key text, p_api_key bigint"
)

# The expiry task's batch (tandem.expire_holds, run on the application's role).
EXPIRE_HOLDS_V1 = ServerFunction.as_owner(_SQL, "tandem_expire_holds_v1", "p_limit integer")

# The trigger function of the holds rows' UPDATE trigger (no caller: the trigger).
HOLD_TRANSITION_V1 = ServerFunction(
    "tandem_hold_transition_v1", _SQL / "hold_transition_v1.sql", ""
)

# Guarded by APPEND_ONLY_V1 since migration 0016 (APPEND_ONLY_TABLES stays what 0011 made):
# every UPDATE, DELETE and TRUNCATE of a hold's events; a hold row's DELETE and TRUNCATE
# (its UPDATE by HOLD_TRANSITION_V1).
APPEND_ONLY_HOLD_EVENTS = "hold_events"
APPEND_ONLY_HOLDS = "holds"

# What migration 0016 creates, in order (a caller after its callee).
HOLD_FUNCTIONS = (
    RELEASE_EXPIRED_V1,
    APPLY_DELTA_V2,
    TRANSFER_V3,
    CREATE_HOLD_V1,
    CAPTURE_HOLD_V1,
    RELEASE_HOLD_V1,
    EXPIRE_HOLDS_V1,
    HOLD_TRANSITION_V1,
)

# --- group commit (migration 0018) ----------------------------------------------------------

# A batch of one user's balance changes, each decided on the balance the ones before it left
# (wallet/batching.py sends it). Created alone: nothing of an older release calls it, and it
# reads and writes only what APPLY_DELTA_V2 does.
APPLY_DELTAS_V1 = ServerFunction.as_owner(
    _SQL,
    "tandem_apply_deltas_v1",
    "p_user bigint, p_amounts bigint[], p_references text[], p_keys text[], p_api_keys bigint[]",
)

# A batch of transfers into one payee, each decided on the balances the ones before it left
# (wallet/batching.py sends it). Created with APPLY_DELTAS_V1, for the same reasons.
TRANSFER_BATCH_V1 = ServerFunction.as_owner(
    _SQL,
    "tandem_transfer_batch_v1",
    "p_to bigint, p_froms bigint[], p_amounts bigint[], p_references text[], p_api_keys bigint[]",
)

# What migration 0018 creates.
GROUP_COMMIT_FUNCTIONS = (APPLY_DELTAS_V1, TRANSFER_BATCH_V1)

# The versions this code calls, in the order they must be created (a caller after its callee).
CURRENT = (
    MINT_ALLOWED_V1,
    CREATE_USER_V1,
    APPEND_ONLY_V1,
    *HOLD_FUNCTIONS,
    *GROUP_COMMIT_FUNCTIONS,
)
