"""Group commit: ``tandem_apply_deltas_v1``, a batch of one user's balance changes in one
statement, and ``tandem_transfer_batch_v1``, a batch of transfers into one payee
(tandem/wallet/sql; sent by tandem/wallet/batching.py).

An expand with nothing to contract: the previous release never calls them, and they change
nothing an older instance reads differently (each item is journaled as
``tandem_apply_delta_v2`` and ``tandem_transfer_v3`` journal it). Optional for this release
(tandem/core/migrations.py OPTIONAL): while the holds' contract (0017) waits for older
instances, the database stays below this, and every change goes alone until it is applied.
The downgrade drops them (this release's instances then send every change alone).

Revision ID: 0018_group_commit
Revises: 0017_holds_contract
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

from tandem.wallet.functions import GROUP_COMMIT_FUNCTIONS

revision: str = "0018_group_commit"
down_revision: str | None = "0017_holds_contract"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    for function in GROUP_COMMIT_FUNCTIONS:
        for statement in function.create_statements():
            op.execute(statement)


def downgrade() -> None:
    for function in reversed(GROUP_COMMIT_FUNCTIONS):
        op.execute(function.drop_statement())
