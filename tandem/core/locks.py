"""Every advisory-lock namespace of Tandem's database, in one table.

PostgreSQL's advisory locks are one namespace per database, shared with any other software
using it: each of Tandem's ids starts with 0x7A6D ("tz") so they stay apart from others'.
The server-side functions spell the same numbers (SQL cannot import them); a test reads each
function's file and checks that the numbers it locks are the ones named here.
"""

from __future__ import annotations

from typing import Final

# Instances that migrate on start may race: the second waits on this (transaction-level, in
# the migration transaction) and then finds nothing to do.
MIGRATION: Final = 0x7A6D_0001

# Claims serialise on this for one statement (the claim function's transaction), so the
# fair-share count is exact. Safety never depends on it: the row lock and the constraints do.
CLAIM: Final = 0x7A6D_0002

# The first key of the two-key form: each instance's database session holds
# (SESSIONS, its session_key) for as long as that session lives; the instance_sessions view
# reads them from pg_locks.
SESSIONS: Final = 0x7A6D_0003

# A ledger verification (a full scan of the journal) holds this for its transaction: at most
# one runs at a time in the database. The cron's run skips when it is held; `tandem ledger
# verify` waits for it.
LEDGER_VERIFICATION: Final = 0x7A6D_0004

ALL: Final = {
    "MIGRATION": MIGRATION,
    "CLAIM": CLAIM,
    "SESSIONS": SESSIONS,
    "LEDGER_VERIFICATION": LEDGER_VERIFICATION,
}
