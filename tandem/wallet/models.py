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
    """The first outcome of a keyed balance update, written in the same transaction as the
    change itself, so a retry can never apply twice."""

    __tablename__ = "idempotency_keys"

    key: Mapped[str] = mapped_column(Text, primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # "ok" or the stable error code of the refusal that was answered.
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    balance: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
