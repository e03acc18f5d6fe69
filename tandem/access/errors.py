"""Refusals of POST /keys, one per refusal of the owner's function (create_bound_key_v1.sql).
Each carries its HTTP status and stable code; a refusal makes no key."""

from __future__ import annotations

from tandem.access.schemas import BOUND_KEY_MAX_USERS
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


class KeyNameInvalidError(ValidationError):
    code = "key_name_invalid"


class KeyUsersTooManyError(ValidationError):
    code = "key_users_too_many"


class KeyTokenTakenError(ConflictError):
    """The token's SHA-256 is another key's: never by chance (256 random bits), so the
    application's fault, told apart from a name taken. Nothing was made; a retry makes a new
    token."""

    code = "key_token_taken"


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
    "name_invalid": (
        KeyNameInvalidError,
        "invalid key name: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit",
    ),
    "too_many_users": (
        KeyUsersTooManyError,
        f"a key made here is bound to at most {BOUND_KEY_MAX_USERS} users",
    ),
    "token_taken": (KeyTokenTakenError, "the new key's token is another key's: retry"),
}
