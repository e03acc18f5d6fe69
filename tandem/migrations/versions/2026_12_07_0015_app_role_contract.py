"""The contract of the application role's narrowing: the rights 0014 kept are taken away.

Every role but the owner loses INSERT, UPDATE, DELETE and TRUNCATE on ``users``,
``ledger_entries``, ``transfers``, ``api_keys`` (the column right ``UPDATE (last_used_at)``
stays) and ``task_actions``, and INSERT, UPDATE and TRUNCATE on ``browser_sessions`` (DELETE
stays, for housekeeping): money, keys, sessions and audit rows are written only by the owner
functions (0013, 0014) and the owner. ``tandem migrate`` then grants the application's role by
this revision (tandem/core/migrations.py). The downgrade gives the roles the application's
rights of the release before (those that read ``users``: the application's role).

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
    APP_DELETE_ONLY,
    APP_READ_ONLY,
    EXPAND_REVISION,
    OLDER_LIVE_INSTANCES,
    OWNER_ONLY,
    ContractWaitsError,
    app_table_statements,
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
  AND a.privilege_type = ANY(CAST(:privileges AS text[]))
ORDER BY 1, 2, 3
"""

# The roles but the owner that read users: the application's (granted by `tandem migrate`).
READERS = """
SELECT DISTINCT r.rolname FROM pg_class c, aclexplode(c.relacl) a JOIN pg_roles r
    ON r.oid = a.grantee
WHERE c.oid = 'users'::regclass AND a.grantee <> c.relowner AND a.privilege_type = 'SELECT'
ORDER BY 1
"""


def upgrade() -> None:
    bind = op.get_bind()
    older = bind.execute(
        sa.text(OLDER_LIVE_INSTANCES), {"accepted": sorted(revisions_since(EXPAND_REVISION))}
    ).all()
    if older:
        raise ContractWaitsError(revision, down_revision or "", [(r[0], r[1]) for r in older])
    every = ["INSERT", "UPDATE", "DELETE", "TRUNCATE"]
    grants = [
        *bind.execute(
            sa.text(WRITE_GRANTS), {"tables": list(APP_READ_ONLY), "privileges": every}
        ).all(),
        *bind.execute(
            sa.text(WRITE_GRANTS),
            {"tables": list(APP_DELETE_ONLY), "privileges": ["INSERT", "UPDATE", "TRUNCATE"]},
        ).all(),
    ]
    for table, grantee, privilege in grants:
        op.execute(f"REVOKE {privilege} ON {table} FROM {grantee}")
        if table == "api_keys" and privilege == "UPDATE":
            # Revoking the table's UPDATE revokes its columns' too: dating a key's use stays.
            op.execute(f"GRANT UPDATE (last_used_at) ON api_keys TO {grantee}")


def downgrade() -> None:
    # The release before the contract writes with these rights (the expand's): given back
    # here to the application's role, as `tandem migrate` would grant them at 0014. A role
    # whose name `tandem migrate` would not take was not granted by it, and is left alone.
    for (role,) in op.get_bind().execute(sa.text(READERS)).all():
        try:
            statements = app_table_statements(role, contracted=False)
        except ValueError:
            continue
        for statement in statements:
            op.execute(statement)
        op.execute(f"REVOKE ALL ON {', '.join(OWNER_ONLY)} FROM {role}")
