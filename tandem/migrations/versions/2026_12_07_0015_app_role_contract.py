"""The contract of the application role's narrowing: the rights 0014 kept are taken away.

Every role but the owner loses INSERT, UPDATE, DELETE and TRUNCATE on ``users``,
``ledger_entries``, ``transfers``, ``api_keys`` (the column right ``UPDATE (last_used_at)``
stays) and ``task_actions``: money, keys and audit rows are written only by the owner
functions (0014) and the owner. ``tandem migrate`` then grants the application's role by
this revision (tandem/core/migrations.py).

Runs only when no live instance reports an older release (``instances.revision`` of the
instances holding their session lock: none, or one before 0014): it raises
ContractWaitsError, and ``tandem migrate`` stops just before it, says which instances it
waits for, and succeeds; run it again once they are replaced. An instance with the
scheduler off never joins, so it is not seen: replace those before running this.

Revision ID: 0015_app_role_contract
Revises: 0014_owner_functions
Create Date: 2026-12-07
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

from tandem.core.migrations import (
    APP_READ_ONLY,
    EXPAND_REVISION,
    OLDER_LIVE_INSTANCES,
    ContractWaitsError,
    revisions_since,
)

revision: str = "0015_app_role_contract"
down_revision: str | None = "0014_owner_functions"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# Every table-level write right held on these tables by a role other than their owner.
WRITE_GRANTS = """
SELECT c.relname, CASE a.grantee WHEN 0 THEN 'PUBLIC' ELSE quote_ident(r.rolname) END,
       a.privilege_type
FROM pg_class c, aclexplode(c.relacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
WHERE c.oid = ANY(CAST(:tables AS regclass[])) AND a.grantee <> c.relowner
  AND a.privilege_type IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')
ORDER BY 1, 2, 3
"""


def upgrade() -> None:
    bind = op.get_bind()
    older = bind.execute(
        sa.text(OLDER_LIVE_INSTANCES), {"accepted": sorted(revisions_since(EXPAND_REVISION))}
    ).all()
    if older:
        raise ContractWaitsError(revision, down_revision or "", [(r[0], r[1]) for r in older])
    grants = bind.execute(sa.text(WRITE_GRANTS), {"tables": list(APP_READ_ONLY)}).all()
    for table, grantee, privilege in grants:
        op.execute(f"REVOKE {privilege} ON {table} FROM {grantee}")
        if table == "api_keys" and privilege == "UPDATE":
            # Revoking the table's UPDATE revokes its columns' too: dating a key's use stays.
            op.execute(f"GRANT UPDATE (last_used_at) ON api_keys TO {grantee}")


def downgrade() -> None:
    # Rights are not schema: `tandem migrate` grants the application's role by the revision
    # it finds (tandem/core/migrations.py grant_app_role), so a downgrade gives them back
    # with its next run.
    pass
