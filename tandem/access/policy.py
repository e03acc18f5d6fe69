"""What every route requires: the one table the access layer checks, for both HTTP paths.

A path not in the table needs a live key (any scope) before it is even told "not found", so
the route map cannot be probed anonymously. ``tests/access/test_access.py`` checks that every
route the app serves is named here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from tandem.core.callers import TASKS_READ, TASKS_WRITE, USERS_WRITE, WALLET_READ, WALLET_WRITE

PUBLIC = "public"
ANY_KEY = "any key"


@dataclass(frozen=True, slots=True)
class Rule:
    template: str
    # PUBLIC, ANY_KEY or the scope a key needs.
    requirement: str
    # An HTML page for people: anonymous visitors are sent to the login page, and the answer
    # gets the pages' security headers (CSP, no framing).
    page: bool = False


RULES = (
    Rule("/health/live", PUBLIC),
    Rule("/health/ready", PUBLIC),
    # Each instance's own scrape target; nginx refuses it from outside (deploy/nginx/).
    Rule("/metrics", PUBLIC),
    Rule("/static-offline-docs/{path}", PUBLIC),
    Rule("/docs/oauth2-redirect", PUBLIC, page=True),
    Rule("/login", PUBLIC, page=True),
    Rule("/logout", PUBLIC),
    Rule("/docs", ANY_KEY, page=True),
    Rule("/redoc", ANY_KEY, page=True),
    Rule("/openapi.json", ANY_KEY),
    Rule("/", TASKS_READ, page=True),
    Rule("/status/fragment", TASKS_READ, page=True),
    Rule("/balance/update", WALLET_WRITE),
    Rule("/balance/{userId}", WALLET_READ),
    Rule("/balance/{userId}/history", WALLET_READ),
    Rule("/transfers", WALLET_WRITE),
    Rule("/transfers/{transferId}", WALLET_READ),
    Rule("/users", USERS_WRITE),
    Rule("/tasks", TASKS_READ),
    Rule("/tasks/{name}/history", TASKS_READ),
    Rule("/instances", TASKS_READ),
    Rule("/tasks/{name}/run", TASKS_WRITE),
    Rule("/tasks/{name}/pause", TASKS_WRITE),
    Rule("/tasks/{name}/resume", TASKS_WRITE),
)
UNLISTED = Rule("unmatched", ANY_KEY)

_EXACT = {rule.template: rule for rule in RULES if "{" not in rule.template}
_TEMPLATED = [
    (
        re.compile(
            re.sub(
                r"\\\{(\w+)\\\}",
                lambda m: ".+" if m.group(1) == "path" else "[^/]+",
                re.escape(rule.template),
            )
        ),
        rule,
    )
    for rule in RULES
    if "{" in rule.template
]


def rule_for(path: str) -> Rule:
    rule = _EXACT.get(path)
    if rule is not None:
        return rule
    for pattern, templated in _TEMPLATED:
        if pattern.fullmatch(path):
            return templated
    return UNLISTED
