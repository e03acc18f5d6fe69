"""Wallet tables, and the facts they keep. Money is integer units (BIGINT); the database
refuses a negative balance, and the journal is append-only (its triggers, running
``tandem_append_only_v1``, refuse UPDATE, DELETE and TRUNCATE for every role)."""

from __future__ import annotations

from datetime import date, datetime
from decimal import Decimal

from sqlalchemy import (
    BigInteger,
    Boolean,
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

# A hold's states: active until captured, released or expired (each once, for good).
HOLD_STATUSES = ("active", "captured", "released", "expired")
# What a hold's events record: its creation, then the one change of its state (a capture of
# part writes 'captured' and 'released', the rest, in the same step).
HOLD_EVENT_KINDS = ("created", "captured", "released", "expired")
# A hold's life when none is asked for, and the longest one may ask for (seconds: 30 days).
HOLD_EXPIRES_IN_DEFAULT = 900
HOLD_EXPIRES_IN_MAX = 2_592_000


class User(Base):
    __tablename__ = "users"
    __table_args__ = (
        CheckConstraint("balance >= 0", name="balance_not_negative"),
        # available = balance - held is never negative: a hold reserves only what is there,
        # and a withdrawal or a transfer spends only what is not reserved.
        CheckConstraint("held >= 0 AND balance - held >= 0", name="held_within_balance"),
    )

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
    # The sum of the user's holds not yet captured or released (expired but not yet released
    # included); written only by the owner functions (migration 0016).
    held: Mapped[int] = mapped_column(BigInteger, nullable=False, server_default=text("0"))


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
    # "update" (user_id, amount) or "transfer" (user_id -> to_user_id, amount); "hold"
    # (user_id for to_user_id, amount, expires_in), "capture" (hold_id of user_id, amount: 0
    # for all, to_user_id given) and "release" (hold_id of user_id, amount 0).
    kind: Mapped[str] = mapped_column(Text, nullable=False, server_default=text("'update'"))
    to_user_id: Mapped[int | None] = mapped_column(BigInteger)
    reference: Mapped[str | None] = mapped_column(Text)
    # The API key that sent it (NULL: anonymous, or stored before keys).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger)
    hold_id: Mapped[int | None] = mapped_column(BigInteger)
    expires_in: Mapped[int | None] = mapped_column(Integer)


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
    # Whether holds may be made: false until no instance of a release that ignores held is
    # live (migration 0016 on a fresh database, else the contract 0017).
    holds_enabled: Mapped[bool] = mapped_column(
        Boolean, nullable=False, server_default=text("false")
    )


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
        # A capture's entries (only those are indexed): the verification and a replay.
        Index(
            "ix_ledger_entries_hold_id",
            "hold_id",
            postgresql_where=text("hold_id IS NOT NULL"),
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
    # The hold a capture's entries come from (NULL for every other entry).
    hold_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("holds.id"))


class Hold(Base):
    """A reservation of part of a user's balance: counted in users.held while active, then
    captured once (all or part, the rest released), released, or expired at ``expires_at``
    (the database clock). Never deleted; its state changes only from 'active', once
    (trigger ``tandem_hold_transition_v1``), each change also a HoldEvent."""

    __tablename__ = "holds"
    __table_args__ = (
        CheckConstraint("amount > 0", name="amount_positive"),
        CheckConstraint("to_user_id <> user_id", name="two_users"),
        CheckConstraint(f"status IN ({', '.join(repr(s) for s in HOLD_STATUSES)})", name="status"),
        CheckConstraint(
            "(status = 'captured') = (captured_amount IS NOT NULL) "
            "AND captured_amount > 0 AND captured_amount <= amount",
            name="captured_amount",
        ),
        CheckConstraint("(status = 'active') = (finished_at IS NULL)", name="finished"),
        CheckConstraint("available_after >= 0", name="available_after_not_negative"),
        _reference_length(),
        # A user's active holds by expiry: the lazy release of its expired ones.
        Index(
            "ix_holds_active_user_id_expires_at",
            "user_id",
            "expires_at",
            postgresql_where=text("status = 'active'"),
        ),
        # Every active hold by expiry: the expiry task's batches and the metrics.
        Index(
            "ix_holds_active_expires_at",
            "expires_at",
            postgresql_where=text("status = 'active'"),
        ),
        # A user's holds, newest first, keyset on id.
        Index("ix_holds_user_id", "user_id", "id"),
        # An applied key, once per caller, for good (partial: only keyed holds).
        Index(
            "uq_holds_idempotency_key",
            "idempotency_key",
            "api_key_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    user_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("users.id"), nullable=False)
    # The payee: given at creation, or by the capture of a hold that had none.
    to_user_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("users.id"))
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    captured_amount: Mapped[int | None] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(Text, nullable=False)
    expires_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), nullable=False)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    reference: Mapped[str | None] = mapped_column(Text)
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    # The API key that made it (NULL when anonymous).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    # The payer's available amount just after it was made (what its creation answered, for a
    # replay of its idempotency key).
    available_after: Mapped[int] = mapped_column(BigInteger, nullable=False)


class HoldEvent(Base):
    """One change of a hold: its creation, capture, release or expiry. Append-only."""

    __tablename__ = "hold_events"
    __table_args__ = (
        CheckConstraint(f"kind IN ({', '.join(repr(k) for k in HOLD_EVENT_KINDS)})", name="kind"),
        CheckConstraint("amount > 0", name="amount_positive"),
        Index("ix_hold_events_hold_id", "hold_id", "id"),
        # An applied key, once per caller, for good (partial: only keyed changes).
        Index(
            "uq_hold_events_idempotency_key",
            "idempotency_key",
            "api_key_id",
            unique=True,
            postgresql_nulls_not_distinct=True,
            postgresql_where=text("idempotency_key IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=True), primary_key=True)
    hold_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("holds.id"), nullable=False)
    kind: Mapped[str] = mapped_column(Text, nullable=False)
    # created: the hold's amount; captured: the amount captured; released, expired: the
    # amount given back.
    amount: Mapped[int] = mapped_column(BigInteger, nullable=False)
    # The API key that made the change (NULL: the expiry task, or anonymous).
    api_key_id: Mapped[int | None] = mapped_column(BigInteger, ForeignKey("api_keys.id"))
    idempotency_key: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.clock_timestamp()
    )
