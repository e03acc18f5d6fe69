"""Wallet tables. Money is integer units (BIGINT); the database refuses a negative balance."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger, CheckConstraint, DateTime, Identity, Text, func
from sqlalchemy.orm import Mapped, mapped_column

from tandem.core.models import Base

DEFAULT_BALANCE = 10_000


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    balance: Mapped[int] = mapped_column(
        BigInteger, nullable=False, server_default=str(DEFAULT_BALANCE)
    )
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    updated_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class IdempotencyKey(Base):
    """The first outcome of a keyed balance update or transfer, written in the same
    transaction as the change itself, so a retry can never apply twice."""

    __tablename__ = "idempotency_keys"
    # Unique per caller (migration 0009: UNIQUE NULLS NOT DISTINCT (api_key_id, key)); the
    # table has no primary key, the mapper names that pair.
    __mapper_args__ = {"primary_key": ["api_key_id", "key"]}  # noqa: RUF012

    # The API key that sent it (NULL: anonymous, or stored before keys).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    key: Mapped[str] = mapped_column(Text, nullable=False)
    # "update" (user_id, amount) or "transfer" (user_id -> to_user_id, amount).
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default="update")
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    to_user_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    # "ok" or the stable error code of the refusal that was answered. What an applied request
    # did is in the journal (its entry or transfer carries the key), which is never pruned.
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    # The balance an "ok" answered, for keys stored before the journal kept them (0008).
    balance: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class LedgerEntry(Base):
    """One change of one balance, with the balance after it; append-only (migration 0008's
    triggers refuse UPDATE, DELETE and TRUNCATE). Mapped for the ORM's one insert (a new
    user's opening entry); everything else is in the repository's SQL."""

    __tablename__ = "ledger_entries"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    transfer_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    reference: Mapped[str | None] = mapped_column(Text, nullable=True)
    idempotency_key: Mapped[str | None] = mapped_column(Text, nullable=True)
    # The API key that made the change (migration 0009; NULL before keys or when anonymous).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
