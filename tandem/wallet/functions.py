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

# The versions this code calls, in the order they must be created (a caller after its callee).
CURRENT = (MINT_ALLOWED_V1, APPLY_DELTA_V1, CREATE_USER_V1, TRANSFER_V2, APPEND_ONLY_V1)
