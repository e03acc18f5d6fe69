"""API key tokens: made, hashed and checked here, nowhere else.

A token is ``tdm_`` + 32 random bytes (URL-safe base64): 256 bits, so a plain SHA-256 of it
is what is stored and looked up. Password hashes (bcrypt, argon2) are slow on purpose to resist
guessing low-entropy secrets; a random 256-bit token cannot be guessed, and a fast hash keeps
the lookup one index probe (the approach of GitHub's and Stripe's tokens).
"""

from __future__ import annotations

import hashlib
import re
import secrets

from tandem.core.callers import SCOPES

# The longest life `tandem keys create --expires-in` gives (an operator's key; keys made
# through POST /keys live at most 24 hours: the owner's function keeps that).
EXPIRES_IN_MAX = 10 * 365 * 24 * 3600.0
_INT64_MAX = 2**63 - 1
TOKEN_PREFIX = "tdm_"  # noqa: S105  (a prefix, not a secret)
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# What a token looks like; anything else is refused before any lookup.
_TOKEN_RE = re.compile(r"tdm_[A-Za-z0-9_-]{43}")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


def well_formed(token: str) -> bool:
    return _TOKEN_RE.fullmatch(token) is not None


def check_name(name: str) -> str:
    if NAME_RE.fullmatch(name) is None:
        raise ValueError(
            f"invalid key name {name!r}: 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )
    return name


def check_scopes(scopes: list[str]) -> list[str]:
    if not scopes:
        raise ValueError(f"a key needs at least one scope: {', '.join(SCOPES)}")
    unknown = [s for s in scopes if s not in SCOPES]
    if unknown:
        raise ValueError(f"unknown scope {unknown[0]!r}; known: {', '.join(SCOPES)}")
    return sorted(set(scopes))


def check_users(users: list[int]) -> list[int]:
    """The users a key is bound to: at least one, each a positive 64-bit id."""
    if not users:
        raise ValueError("a bound key needs at least one user")
    bad = [u for u in users if not 0 < u <= _INT64_MAX]
    if bad:
        raise ValueError(f"invalid user id {bad[0]}: a positive 64-bit integer")
    return sorted(set(users))
