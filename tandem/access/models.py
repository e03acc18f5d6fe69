"""The API keys' table. A key is revoked, never deleted: the journal and the task audit point
at it for good; the token itself is never stored, only its SHA-256."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    DateTime,
    Identity,
    LargeBinary,
    Text,
    UniqueConstraint,
    func,
)
from sqlalchemy.orm import Mapped, mapped_column

from tandem.access.keys import NAME_RE
from tandem.core.models import Base


class ApiKey(Base):
    __tablename__ = "api_keys"
    __table_args__ = (
        UniqueConstraint("name", name="uq_api_keys_name"),
        UniqueConstraint("token_sha256", name="uq_api_keys_token_sha256"),
        # What `tandem keys create` accepts is what the table keeps.
        CheckConstraint(f"name ~ '^{NAME_RE.pattern}$'", name="name"),
        CheckConstraint("cardinality(scopes) > 0", name="scopes"),
        # NULL: unbound (every user); a bound key names at least one user.
        CheckConstraint(
            "bound_user_ids IS NULL OR cardinality(bound_user_ids) > 0", name="bound_user_ids"
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    name: Mapped[str] = mapped_column(Text, nullable=False)
    token_sha256: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    # Dated by the processes that see it used (the only column the app's role may update).
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The users this key may touch (docs/access.md, "Keys bound to users"); NULL: every user.
    bound_user_ids: Mapped[list[int] | None] = mapped_column(ARRAY(BigInteger))
    # When the key stops being accepted; NULL: never.
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
