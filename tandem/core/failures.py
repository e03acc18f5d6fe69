"""The one table that turns driver errors into answers.

A database call can fail in two ways that a client must tell apart:

- *not applied*: no connection could be had or made, or the server refused or rolled back
  the statement (shutting down, too many connections, statement timeout, a standby, a
  serialisation failure). Nothing changed: ``database_unavailable``, retry.
- *outcome unknown*: the connection broke after a write was sent and before its answer.
  The change may or may not be committed: ``outcome_unknown``; a retry with the same
  Idempotency-Key returns the stored first outcome or applies exactly once.

Everything else (a constraint the code should have prevented, bad SQL) is a bug: not
classified here, so it stays a 500.
"""

from __future__ import annotations

import socket

import asyncpg
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as SQLAlchemyPoolTimeout

from tandem.core.errors import (
    AppError,
    DatabaseUnavailableError,
    InternalError,
    OutcomeUnknownError,
)

# SQLSTATEs (https://www.postgresql.org/docs/current/errcodes-appendix.html) for which the
# server guarantees the statement did not take effect: it was cancelled or rolled back, or the
# session was refused before it ran anything. The connection itself stays usable for the ones
# marked in _REUSABLE.
_ROLLED_BACK = {
    "57014": "the statement timed out and was rolled back",  # query_canceled
    "40001": "a serialisation failure rolled the transaction back",
    "40P01": "a deadlock rolled the transaction back",
    "55P03": "a lock could not be had in time",  # lock_not_available
    "25006": "the server is a read-only standby",  # read_only_sql_transaction (failover)
    "53300": "the server has too many connections",
    "53400": "the server hit a configured limit",
    "57P03": "the server is starting up or shutting down",  # cannot_connect_now
    "25P03": "the transaction idled past its timeout",  # idle_in_transaction_session_timeout
}
# Of those, the ones after which the connection is still fine to reuse. Not 25006: a
# connection to a standby must be replaced, so that target_session_attrs=read-write finds the
# new primary.
_REUSABLE = {"57014", "40001", "40P01", "55P03"}

# Failures of the connection itself (the socket, the protocol, the server process): what was
# sent on it may or may not have run. asyncpg's InterfaceError and InternalClientError are not
# here: they also mean misuse that never reached the server (a wrong argument count, a codec
# error), which is a bug; refused_before_sending names the ones that mean a dead connection.
_CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    ConnectionError,  # refused, reset, aborted, broken pipe
    TimeoutError,  # the connect deadline, or the client-side statement deadline
    socket.gaierror,  # the host name does not resolve
    asyncpg.PostgresConnectionError,  # class 08, includes ConnectionDoesNotExistError
    asyncpg.AdminShutdownError,  # 57P01: terminated by a fast shutdown or an administrator
    asyncpg.CrashShutdownError,  # 57P02: another backend crashed
)


def _is_lost_connection(exc: BaseException) -> bool:
    if isinstance(exc, _CONNECTION_ERRORS):
        return True
    if type(exc) is OSError:
        # asyncpg's "Multiple exceptions: ..." when every host of a URL refused: a plain
        # OSError (a file error would be one of its subclasses).
        return True
    return refused_before_sending(exc)


def refused_before_sending(exc: BaseException) -> bool:
    """asyncpg refused the call before writing anything, because the connection is closed or
    its protocol is still inside an exchange the server broke off (a FATAL that arrived while
    the connection sat idle: "cannot switch to state ...; another operation is in progress").
    The pool lends a connection to one caller only, so here that means a dead connection."""
    if isinstance(exc, asyncpg.InternalClientError):
        return "another operation" in str(exc)
    return type(exc) is asyncpg.InterfaceError and "connection is closed" in str(exc)


def driver_error(exc: BaseException) -> BaseException:
    """The asyncpg (or socket) error under SQLAlchemy's wrappers, else ``exc`` itself."""
    seen = 0
    while seen < 5:
        seen += 1
        if isinstance(exc, DBAPIError) and exc.orig is not None:
            exc = exc.orig
            continue
        cause = exc.__cause__
        if not isinstance(exc, asyncpg.PostgresError | OSError) and isinstance(
            cause, asyncpg.PostgresError | asyncpg.InterfaceError | OSError
        ):
            exc = cause
            continue
        break
    return exc


def _sqlstate(exc: BaseException) -> str | None:
    state = getattr(exc, "sqlstate", None)
    return state if isinstance(state, str) else None


def is_reusable(failure: BaseException | None) -> bool:
    """Whether a connection whose last call raised ``failure`` is idle and sane, so it may go
    back to a pool. Only a plain ``ERROR`` the server answered in full qualifies: a FATAL
    (shutdown, terminate) leaves the protocol mid-message (asyncpg then refuses the next call
    with "another operation is in progress"), and a client-side failure leaves it unknown."""
    if failure is None:
        return True
    if not isinstance(failure, asyncpg.PostgresError) or _is_lost_connection(failure):
        return False
    state = _sqlstate(failure) or ""
    if state in _ROLLED_BACK and state not in _REUSABLE:
        return False
    return getattr(failure, "severity_en", None) in ("ERROR", None) and not state.startswith(
        ("08", "57P")
    )


def is_stale_connection(exc: BaseException) -> bool:
    """The connection was found closed or broken (not merely slow): worth one retry on a fresh
    connection when nothing can have been applied. A timeout is not: retrying a statement that
    ran out of time doubles the load on a database that is already slow."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    root = driver_error(exc)
    return _is_lost_connection(root) and not isinstance(root, TimeoutError)


def classify(exc: BaseException, *, sent: bool) -> AppError | None:
    """The answer for a database failure, or None when ``exc`` is not one (a bug).

    ``sent``: whether a write may have reached the server (False for reads, for failures
    before the statement was sent, and for failures inside a transaction before COMMIT).
    """
    if isinstance(exc, AppError):
        return exc
    if isinstance(exc, SQLAlchemyPoolTimeout):
        return not_applied("no database connection became free in time")
    root = driver_error(exc)
    state = _sqlstate(root)
    if state in _ROLLED_BACK and not _is_lost_connection(root):
        return not_applied(_ROLLED_BACK[state])
    invalidated = isinstance(exc, DBAPIError) and exc.connection_invalidated
    if _is_lost_connection(root) or invalidated:
        if sent:
            return outcome_unknown()
        return not_applied(f"the database connection failed ({type(root).__name__})")
    return None


def not_applied(reason: str) -> DatabaseUnavailableError:
    return DatabaseUnavailableError(f"the database is unavailable: {reason}; nothing changed")


def outcome_unknown() -> OutcomeUnknownError:
    return OutcomeUnknownError(
        "the connection to the database broke after the change was sent: it may or may not "
        "have been applied; retry with the same Idempotency-Key to learn which"
    )


def error_for_unexpected(exc: BaseException, *, writes: bool) -> AppError:
    """What a client is told about an exception no layer classified: a database failure
    (``writes``: the request may have changed something) or an opaque 500. The caller logs
    ``exc``."""
    return classify(exc, sent=writes) or InternalError("internal error")
