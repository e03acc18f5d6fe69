"""Wallet tables, and the facts they keep. Money is integer units (BIGINT); the database
refuses a negative balance, and the journal is append-only (its triggers, running
``tandem_append_only_v1``, refuse UPDATE, DELETE and TRUNCATE for every role)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Date,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    Numeric,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.orm import Mapped, mapped_column

# The journal is signed by API keys: its foreign keys name api_keys, which the mapper must
# find on the metadata.
import tandem.access.models  # noqa: F401

# A balance and an amount are BIGINT: core.ids.INT64_MAX bounds them. Named here too, as the
# released SQL files (tandem/wallet/sql/transfer_v1.sql) name it; the one definition is core's.
from tandem.core.ids import INT64_MAX as INT64_MAX
from tandem.core.models import Base

# A new user's balance when none is given (and user 1's, made by the first migration).
DEFAULT_BALANCE = 10_000
# The longest reference a change or a transfer may carry (characters).
REFERENCE_MAX_LENGTH = 255

JOURNAL_KINDS = ("opening", "deposit", "withdrawal", "transfer")


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint("balance >= 0", name="balance_not_negative"),)

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    # 0: a row inserted without its balance is no money (users are made by
    # tandem_create_user_v1, with the opening entry; migration 0014).
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))
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
    __table_args__ = (
        # Unique per caller; NULLS NOT DISTINCT: anonymous requests share one namespace. The
        # key first: a lookup by key is an index probe that then tells the callers apart.
        UniqueConstraint(
            "key",
            "api_key_id",
            name="uq_idempotency_keys_caller_key",
            postgresql_nulls_not_distinct=True,
        ),
        # Retention pruning scans by age.
        Index("ix_idempotency_keys_created_at", "created_at"),
    )
    # The table has no primary key: the mapper names the unique pair.
    __mapper_args__ = {"primary_key": ["key", "api_key_id"]}  # noqa: RUF012

    key: Mapped[str] = mapped_column(Text, nullable=False)
    user_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # "ok" or the stable error code of the refusal that was answered. What an applied request
    # did is in the journal (its entry or transfer carries the key), which is never pruned.
    outcome: Mapped[str] = mapped_column(Text, nullable=False)
    # The balance an "ok" answered, for keys stored before the journal kept them.
    balance: Mapped[int | None] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )
    # "update" (user_id, amount) or "transfer" (user_id -> to_user_id, amount).
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'update'"))
    to_user_id: Mapped[int | None] = mapped_column(BigInteger)
    reference: Mapped[str | None] = mapped_column(Text)
    # The API key that sent it (NULL: anonymous, or stored before keys).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger)


class IdempotencyUsage(Base):
    """Keys stored per caller and day (UTC): one row per caller, day and server backend, so
    counting never makes two connections wait for each other."""

    __tablename__ = "idempotency_usage"
    __table_args__ = (
        # The day first: the count reads one day of one caller (an index range).
        UniqueConstraint(
            "day",
            "api_key_id",
            "backend",
            name="uq_idempotency_usage",
            postgresql_nulls_not_distinct=True,
        ),
    )
    # The table has no primary key: the mapper names the unique triple.
    __mapper_args__ = {"primary_key": ["day", "api_key_id", "backend"]}  # noqa: RUF012

    api_key_id: Mapped[int | None] = mapped_column(BigInteger)
    day: Mapped[date] = mapped_column(Date, nullable=False)
    backend: Mapped[int] = mapped_column(Integer, nullable=False)
    used: Mapped[int] = mapped_column(BigInteger, nullable=False)


class WalletSetting(Base):
    """The owner's settings of the money functions, one row; the application's role may not
    even read it. ``daily_mint_ceiling``: money the deposits and opening balances may create
    per day (UTC), all callers together; NULL (the default) sets no ceiling."""

    __tablename__ = "wallet_settings"
    __table_args__ = (
        CheckConstraint("id", name="one_row"),
        CheckConstraint("daily_mint_ceiling >= 0", name="daily_mint_ceiling_not_negative"),
    )

    id: Mapped[bool] = mapped_column(primary_key=True, server_default=text("true"))
    daily_mint_ceiling: Mapped[int | None] = mapped_column(BigInteger)


class MintUsage(Base):
    """Money created per day (UTC) under the ceiling: one row per day and server backend, so
    two mints never wait for each other on a counter. Written only by the money functions
    (as the owner)."""

    __tablename__ = "mint_usage"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    backend: Mapped[int] = mapped_column(Integer, primary_key=True)
    minted: Mapped[int] = mapped_column(Numeric, nullable=False)


class KeyDebit(Base):
    """Money that left users by an API key with a debit limit, per window (its length and
    start, UTC-aligned) and server backend: as idempotency_usage, a backend runs one
    transaction at a time, so two debits never wait on one counter row. Only keys with a
    limit are counted."""

    __tablename__ = "key_debits"
    __table_args__ = (
        # The key and window first: a count reads one window of one key (an index range).
        UniqueConstraint("api_key_id", "seconds", "window_start", "backend", name="uq_key_debits"),
    )
    # The table has no primary key: the mapper names the unique quadruple.
    __mapper_args__ = {  # noqa: RUF012
        "primary_key": ["api_key_id", "seconds", "window_start", "backend"]
    }

    api_key_id: Mapped[int] = mapped_column(BigInteger, nullable=False)
    seconds: Mapped[int] = mapped_column(Integer, nullable=False)
    window_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    backend: Mapped[int] = mapped_column(Integer, nullable=False)
    # numeric: a window's sum of 64-bit amounts cannot overflow.
    amount: Mapped[Decimal] = mapped_column(Numeric, nullable=False)


def _reference_length() -> CheckConstraint:
    return CheckConstraint(
        f"char_length(reference) <= {REFERENCE_MAX_LENGTH}", name="reference_length"
    )


class Transfer(Base):
    """One transfer between two users; its two legs are journal entries carrying its id.
    Append-only."""

    __tablename__ = "transfers"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("from_user_id <> to_user_id", name="two_users"),
        _reference_length(),
        # An applied key, once per caller, for good (partial: only keyed transfers).
        Index(
            "uq_transfers_idempotency_key",
            "idempotency_key",
            "api_key_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    from_user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    to_user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    reference: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    # The API key that made it (NULL before keys or when anonymous).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))


class LedgerEntry(Base):
    """One change of one balance, with the balance after it; append-only. A balance is always
    the sum of its user's entries. Mapped for the ORM's one insert (a new user's opening
    entry); everything else is in the repository's SQL."""

    __tablename__ = "ledger_entries"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        CheckConstraint(f"kind IN ({', '.join(repr(k) for k in JOURNAL_KINDS)})", name="kind"),
        CheckConstraint("(kind = 'transfer') = (transfer_id IS NOT NULL)", name="transfer_leg"),
        CheckConstraint(
            "(kind = 'opening' AND amount = balance) OR (kind = 'deposit' AND amount > 0) "
            "OR (kind = 'withdrawal' AND amount < 0) OR (kind = 'transfer' AND amount <> 0)",
            name="sign",
        ),
        _reference_length(),
        # History pages (newest first, keyset on id) and the balance at an instant.
        Index("ix_ledger_entries_user_id", "user_id", "id"),
        Index("ix_ledger_entries_user_id_created_at", "user_id", "created_at", "id"),
        # A transfer's two legs (only legs are indexed).
        Index(
            "ix_ledger_entries_transfer_id",
            "transfer_id",
            postgresql_where=text("transfer_id IS NOT NULL"),
        ),
        # An applied key, once per caller, for good (partial: only keyed changes).
        Index(
            "uq_ledger_entries_idempotency_key",
            "idempotency_key",
            "api_key_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    balance: Mapped[int] = mapped_column(BigInteger, nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    transfer_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("transfers.id"))
    reference: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    # The API key that made the change (NULL before keys or when anonymous).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
