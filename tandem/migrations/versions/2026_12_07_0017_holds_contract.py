"""Holds, the contract: holds may be made (``wallet_settings.holds_enabled = true``).

The previous release's instances ignore ``users.held``: while one is live, a hold would let
its withdrawals and transfers be refused by the CHECK on ``held`` with an error instead of a
409. So this runs only when no live instance reports a release before 0016
(``instances.revision`` of the instances holding their session lock): otherwise it raises
ContractWaitsError, and ``tandem migrate`` stops just before it (POST /holds answers 503
``holds_unavailable``), says which instances it waits for, and succeeds; run it again once
they are replaced. An instance with the scheduler off never joins, so it is not seen:
replace those before running this. The downgrade turns holds off again (those made stay,
and are captured, released and expired as before).

Revision ID: 0017_holds_contract
Revises: 0016_holds
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tandem.core.migrations import (
    HOLDS_EXPAND_REVISION,
    OLDER_LIVE_INSTANCES,
    ContractWaitsError,
    revisions_since,
)

revision: str = "0017_holds_contract"
down_revision: str | None = "0016_holds"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    older = (
        op.get_bind()
        .execute(
            sa.text(OLDER_LIVE_INSTANCES),
            {"accepted": sorted(revisions_since(HOLDS_EXPAND_REVISION))},
        )
        .all()
    )
    if older:
        raise ContractWaitsError(revision, down_revision or "", [(r[0], r[1]) for r in older])
    op.execute("UPDATE wallet_settings SET holds_enabled = true")


def downgrade() -> None:
    op.execute("UPDATE wallet_settings SET holds_enabled = false")
