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
