"""Keys bound to the users they may touch, keys that expire, and the function that mints them.

- ``api_keys.bound_user_ids``: the users a key may read and move money of (NULL: unbound,
  every user; when set, at least one). ``api_keys.expires_at``: when it stops being accepted
  (NULL: never).
- ``tandem_create_bound_key_v1``: owner-defined (SECURITY DEFINER, search_path pinned, no
  EXECUTE for PUBLIC), the only way the application makes a key (POST /keys): bound, wallet
  scopes within the calling key's, at most 24 hours (tandem/access/sql/).

Revision ID: 0012_bound_keys
Revises: 0011_functions_as_files
Create Date: 2026-12-07
"""

from collections.abc import Sequence

from alembic import op

from tandem.access.functions import CREATE_BOUND_KEY_V1

revision: str = "0012_bound_keys"
down_revision: str | None = "0011_functions_as_files"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute(
        """
        ALTER TABLE api_keys
            ADD COLUMN bound_user_ids bigint[],
            ADD COLUMN expires_at timestamptz,
            ADD CONSTRAINT ck_api_keys_bound_user_ids
                CHECK (bound_user_ids IS NULL OR cardinality(bound_user_ids) > 0)
        """
    )
    for statement in CREATE_BOUND_KEY_V1.create_statements():
        op.execute(statement)


def downgrade() -> None:
    op.execute(CREATE_BOUND_KEY_V1.drop_statement())
    # A bound or expiring key would be an unbound, everlasting one without these columns.
    op.execute(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp()) "
        "WHERE bound_user_ids IS NOT NULL OR expires_at IS NOT NULL"
    )
    op.execute(
        "ALTER TABLE api_keys DROP CONSTRAINT ck_api_keys_bound_user_ids, "
        "DROP COLUMN bound_user_ids, DROP COLUMN expires_at"
    )
