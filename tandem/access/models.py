"""The API keys' table. A key is revoked, never deleted: the journal and the task audit point
at it for good; the token itself is never stored, only its SHA-256."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
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
        CheckConstraint(
            "debit_per_minute > 0 AND debit_per_hour > 0 AND debit_per_day > 0", name="debit"
        ),
        # A rate is both halves or neither; its window one of keys.RATE_PERIODS.
        CheckConstraint(
            "(rate_requests IS NULL) = (rate_seconds IS NULL) AND rate_requests > 0 "
            "AND rate_seconds IN (1, 60, 3600)",
            name="rate",
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
    # Limits, off unless set (NULL): money leaving users by this key per UTC minute, hour and
    # day (wallet.service.count_debit), and requests per rate_seconds in each process.
    debit_per_minute: Mapped[int | None] = mapped_column(BigInteger)
    debit_per_hour: Mapped[int | None] = mapped_column(BigInteger)
    debit_per_day: Mapped[int | None] = mapped_column(BigInteger)
    rate_requests: Mapped[int | None] = mapped_column(BigInteger)
    rate_seconds: Mapped[int | None] = mapped_column(Integer)
    # The key that minted this one (POST /keys): its limits are this key's, and its debit
    # windows and rate bucket count this key's requests too (NULL: counted as itself).
    parent_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))


class BrowserSession(Base):
    """A login in a browser: the cookie holds a random session token (never the key), of which
    only the SHA-256 is kept. Live while not ended (logout), not expired and its key not
    revoked; looked up on every request that carries it, so a logout or a revocation holds on
    every instance at once."""

    __tablename__ = "browser_sessions"
    __table_args__ = (
        UniqueConstraint("token_sha256", name="uq_browser_sessions_token_sha256"),
        # A revocation ends its key's sessions (one index range).
        Index("ix_browser_sessions_api_key_id", "api_key_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    token_sha256: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    api_key_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("api_keys.id"), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    ended_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
