"""Refusals of POST /keys, one per refusal of the owner's function (create_bound_key_v1.sql).
Each carries its HTTP status and stable code; a refusal makes no key."""

from __future__ import annotations

from tandem.core.errors import ConflictError, ForbiddenError, ValidationError


class KeyCallerNotAllowedError(ForbiddenError):
    """The calling key, read again in the database, is not live, bound or lacks keys:write
    (revoked or expired since this instance loaded it)."""

    code = "forbidden"


class KeyUsersRequiredError(ValidationError):
    code = "key_users_required"


class KeyUsersNotFoundError(ValidationError):
    code = "key_users_not_found"


class KeyScopeNotAllowedError(ValidationError):
    code = "key_scope_not_allowed"


class KeyScopeBeyondCallerError(ForbiddenError):
    code = "key_scope_beyond_caller"


class KeyExpiryError(ValidationError):
    code = "key_expiry_out_of_range"


class KeyNameTakenError(ConflictError):
    code = "key_name_taken"


# The function's outcomes, and what each tells the client.
REFUSALS = {
    "caller_not_allowed": (
        KeyCallerNotAllowedError,
        "the calling key is not live, is bound to users, or lacks keys:write",
    ),
    "no_users": (KeyUsersRequiredError, "a key made here is bound to at least one user"),
    "users_not_found": (KeyUsersNotFoundError, "a user in userIds does not exist"),
    "scope_outside_wallet": (
        KeyScopeNotAllowedError,
        "scopes must be among wallet:read and wallet:write (at least one)",
    ),
    "scope_beyond_caller": (
        KeyScopeBeyondCallerError,
        "a key made here cannot have a scope the calling key lacks",
    ),
    "expiry_out_of_range": (KeyExpiryError, "expiresIn must be 1..86400 seconds"),
    "name_taken": (KeyNameTakenError, "a key has this name (revoked keys keep their names)"),
}
