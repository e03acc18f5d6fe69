"""Integers every layer reads the same way: the int64 range of a BIGINT column, and an id as
a path spells it (the access layer checks a bound key's user before the route parses it)."""

from __future__ import annotations

import re

# A balance, an amount, an id and a limit are BIGINT: what fits is the int64 range.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# An id in a path: decimal digits, no sign or leading zero (then at most INT64_MAX).
_ID_RE = re.compile(r"[1-9][0-9]{0,18}")


def id_in(raw: str) -> int | None:
    """The positive 64-bit id ``raw`` spells, or None when it spells none."""
    if _ID_RE.fullmatch(raw) is None or int(raw) > INT64_MAX:
        return None
    return int(raw)
