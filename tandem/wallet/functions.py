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

CURRENT = (TRANSFER_V1, APPEND_ONLY_V1)
