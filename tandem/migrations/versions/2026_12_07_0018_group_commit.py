"""Group commit: ``tandem_apply_deltas_v1``, a batch of one user's balance changes in one
statement (tandem/wallet/sql/apply_deltas_v1.sql; sent by tandem/wallet/batching.py).

An expand with nothing to contract: the previous release never calls it, and it changes
nothing an older instance reads differently (each item is journaled as
``tandem_apply_delta_v2`` journals it). Optional for this release
(tandem/core/migrations.py OPTIONAL): while the holds' contract (0017) waits for older
instances, the database stays below this, and every change goes alone until it is applied.
The downgrade drops it (this release's instances then send every change alone).

Revision ID: 0018_group_commit
Revises: 0017_holds_contract
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

from tandem.wallet.functions import APPLY_DELTAS_V1

revision: str = "0018_group_commit"
down_revision: str | None = "0017_holds_contract"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for statement in APPLY_DELTAS_V1.create_statements():
        op.execute(statement)


def downgrade() -> None:
    op.execute(APPLY_DELTAS_V1.drop_statement())
