"""What every route requires: the one table the access layer checks, for both HTTP paths.

Each rule names a route by its method and path template, the scope a key needs, and how the
route is **bound**: what a key bound to users (``Caller.users``) may do there. A rule
without a binding cannot be written (``Rule`` has no default for it, and refuses anything
but a ``Binding``), so a route added later (holds, events, schedules) must say how it is
bound before it can be served to anyone: the test of the table fails for a served route
that has no rule.

A request whose (method, path) is not in the table needs a live key (any scope) before it is
even told "not found" or "method not allowed", so the route map cannot be probed
anonymously. ``HEAD`` is checked as ``GET`` (the same answer without its body).
``tests/access/test_access.py`` checks that every (method, path) the app serves is named here.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from tandem.core.callers import (
    EVENTS_READ,
    KEYS_WRITE,
    SCHEDULES_READ,
    SCHEDULES_WRITE,
    TASKS_READ,
    TASKS_WRITE,
    USERS_WRITE,
    WALLET_READ,
    WALLET_WRITE,
    WEBHOOKS_WRITE,
)

PUBLIC = "public"
ANY_KEY = "any key"


class Binding(enum.Enum):
    """How a key bound to users is held to them on a route (docs/access.md)."""

    # A bound key is refused (403 forbidden): the route is not about one user's money
    # (creating users, tasks, minting keys, the status page).
    UNBOUND_ONLY = "unbound keys only"
    # The path's {userId}: the access layer answers 404 user_not_found for a user the key is
    # not bound to, before the route runs (exactly what a user that does not exist gets).
    PATH_USER = "the user in the path"
    # The user the body names: the wallet service answers 404 user_not_found for another
    # user, after the body is validated and before anything changes or an idempotency key
    # is claimed (the layer never reads bodies).
    BODY_USER = "the user in the body"
    # The users of what is read (a transfer's two sides): the service shows a bound key only
    # its side, and a record of neither side is not found.
    RESOURCE_USER = "the users of the record read"
    # No user's data: public routes, the docs, the login page.
    NOT_USER_DATA = "no user's data"


@dataclass(frozen=True, slots=True)
class Rule:
    method: str
    template: str
    # PUBLIC, ANY_KEY or the scope a key needs.
    requirement: str
    # Required: a route cannot be declared without saying how a bound key is held on it.
    binding: Binding
    # An HTML page for people: anonymous visitors are sent to the login page, and the answer
    # gets the pages' security headers (CSP, no framing).
    page: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.binding, Binding):
            raise TypeError(f"{self.method} {self.template}: binding must be a Binding")
        if self.method not in _METHODS:
            raise ValueError(f"{self.method} {self.template}: unknown method")
        if self.binding is Binding.PATH_USER and "{userId}" not in self.template:
            raise ValueError(f"{self.method} {self.template}: PATH_USER needs a {{userId}}")
        if self.requirement == PUBLIC and self.binding is not Binding.NOT_USER_DATA:
            raise ValueError(f"{self.method} {self.template}: a public route is no user's data")


_METHODS = frozenset({"GET", "POST", "PUT", "PATCH", "DELETE"})
_PUBLIC, _NONE = PUBLIC, Binding.NOT_USER_DATA

RULES = (
    Rule("GET", "/health/live", _PUBLIC, _NONE),
    Rule("GET", "/health/ready", _PUBLIC, _NONE),
    # Each instance's own scrape target; nginx refuses it from outside (deploy/nginx/).
    Rule("GET", "/metrics", _PUBLIC, _NONE),
    Rule("GET", "/static-offline-docs/{path}", _PUBLIC, _NONE),
    Rule("GET", "/docs/oauth2-redirect", _PUBLIC, _NONE, page=True),
    # The layer's own routes (it handles the credential itself), listed for the record.
    Rule("GET", "/login", _PUBLIC, _NONE, page=True),
    Rule("POST", "/login", _PUBLIC, _NONE, page=True),
    Rule("POST", "/logout", _PUBLIC, _NONE),
    Rule("GET", "/docs", ANY_KEY, _NONE, page=True),
    Rule("GET", "/redoc", ANY_KEY, _NONE, page=True),
    Rule("GET", "/openapi.json", ANY_KEY, _NONE),
    Rule("GET", "/", TASKS_READ, Binding.UNBOUND_ONLY, page=True),
    Rule("GET", "/status/fragment", TASKS_READ, Binding.UNBOUND_ONLY, page=True),
    Rule("POST", "/balance/update", WALLET_WRITE, Binding.BODY_USER),
    Rule("GET", "/balance/{userId}", WALLET_READ, Binding.PATH_USER),
    Rule("GET", "/balance/{userId}/history", WALLET_READ, Binding.PATH_USER),
    Rule("POST", "/transfers", WALLET_WRITE, Binding.BODY_USER),
    Rule("GET", "/transfers/{transferId}", WALLET_READ, Binding.RESOURCE_USER),
    # Holds: made for the user in the body; read by a key bound to the payer or the payee,
    # captured and released by one bound to the payer only (the service tells any other
    # bound key the hold does not exist); listed per payer like its history.
    Rule("POST", "/holds", WALLET_WRITE, Binding.BODY_USER),
    Rule("GET", "/holds/{holdId}", WALLET_READ, Binding.RESOURCE_USER),
    Rule("POST", "/holds/{holdId}/capture", WALLET_WRITE, Binding.RESOURCE_USER),
    Rule("POST", "/holds/{holdId}/release", WALLET_WRITE, Binding.RESOURCE_USER),
    Rule("GET", "/balance/{userId}/holds", WALLET_READ, Binding.PATH_USER),
    Rule("POST", "/users", USERS_WRITE, Binding.UNBOUND_ONLY),
    Rule("POST", "/keys", KEYS_WRITE, Binding.UNBOUND_ONLY),
    Rule("GET", "/tasks", TASKS_READ, Binding.UNBOUND_ONLY),
    Rule("GET", "/tasks/{name}/history", TASKS_READ, Binding.UNBOUND_ONLY),
    Rule("GET", "/instances", TASKS_READ, Binding.UNBOUND_ONLY),
    Rule("POST", "/tasks/{name}/run", TASKS_WRITE, Binding.UNBOUND_ONLY),
    Rule("POST", "/tasks/{name}/pause", TASKS_WRITE, Binding.UNBOUND_ONLY),
    Rule("POST", "/tasks/{name}/resume", TASKS_WRITE, Binding.UNBOUND_ONLY),
    # The change stream: a bound key reads its users' events only, and of a transfer its own
    # leg (the service filters). Webhook endpoints receive every user's events: unbound
    # keys only.
    Rule("GET", "/events", EVENTS_READ, Binding.RESOURCE_USER),
    Rule("POST", "/webhook-endpoints", WEBHOOKS_WRITE, Binding.UNBOUND_ONLY),
    Rule("GET", "/webhook-endpoints", EVENTS_READ, Binding.UNBOUND_ONLY),
    Rule("GET", "/webhook-endpoints/{endpointId}", EVENTS_READ, Binding.UNBOUND_ONLY),
    Rule("PATCH", "/webhook-endpoints/{endpointId}", WEBHOOKS_WRITE, Binding.UNBOUND_ONLY),
    Rule("DELETE", "/webhook-endpoints/{endpointId}", WEBHOOKS_WRITE, Binding.UNBOUND_ONLY),
    Rule(
        "POST",
        "/webhook-endpoints/{endpointId}/rotate-secret",
        WEBHOOKS_WRITE,
        Binding.UNBOUND_ONLY,
    ),
    Rule("POST", "/webhook-endpoints/{endpointId}/replay", WEBHOOKS_WRITE, Binding.UNBOUND_ONLY),
    Rule("GET", "/webhook-endpoints/{endpointId}/deliveries", EVENTS_READ, Binding.UNBOUND_ONLY),
    Rule("POST", "/schedules", SCHEDULES_WRITE, Binding.UNBOUND_ONLY),
    Rule("GET", "/schedules", SCHEDULES_READ, Binding.UNBOUND_ONLY),
    Rule("GET", "/schedules/{name}", SCHEDULES_READ, Binding.UNBOUND_ONLY),
    Rule("PATCH", "/schedules/{name}", SCHEDULES_WRITE, Binding.UNBOUND_ONLY),
    Rule("DELETE", "/schedules/{name}", SCHEDULES_WRITE, Binding.UNBOUND_ONLY),
    Rule("GET", "/schedules/{name}/history", SCHEDULES_READ, Binding.UNBOUND_ONLY),
    Rule("POST", "/schedules/{name}/pause", SCHEDULES_WRITE, Binding.UNBOUND_ONLY),
    Rule("POST", "/schedules/{name}/resume", SCHEDULES_WRITE, Binding.UNBOUND_ONLY),
    Rule("POST", "/schedules/{name}/run", SCHEDULES_WRITE, Binding.UNBOUND_ONLY),
)
# Anything else: a live key, then the app's 404 or 405 (no route serves it: nothing to bind).
UNLISTED = Rule("GET", "unmatched", ANY_KEY, Binding.NOT_USER_DATA)


class Table:
    """The rules, looked up by (method, path). Refuses two rules for one (method, template)."""

    def __init__(self, rules: tuple[Rule, ...]) -> None:
        self.rules = rules
        self._by_template: dict[tuple[str, str], Rule] = {}
        for rule in rules:
            if (rule.method, rule.template) in self._by_template:
                raise ValueError(f"{rule.method} {rule.template} is declared twice")
            self._by_template[rule.method, rule.template] = rule
        self._exact = {(r.method, r.template): r for r in rules if "{" not in r.template}
        self._patterns = {r: re.compile(_pattern(r.template)) for r in rules if "{" in r.template}
        self._templated = [(r.method, pattern, r) for r, pattern in self._patterns.items()]

    def rule_for(self, method: str, path: str) -> Rule:
        method = "GET" if method == "HEAD" else method
        rule = self._exact.get((method, path))
        if rule is not None:
            return rule
        for rule_method, pattern, templated in self._templated:
            if rule_method == method and pattern.fullmatch(path):
                return templated
        return UNLISTED

    def rule_named(self, method: str, template: str) -> Rule | None:
        """The rule of a route as the app declares it (method, path template), if any."""
        return self._by_template.get((method, template))

    def path_user(self, rule: Rule, path: str) -> str | None:
        """The raw ``{userId}`` of a path that matched ``rule``."""
        pattern = self._patterns.get(rule)
        match = None if pattern is None else pattern.fullmatch(path)
        return None if match is None else match.group("userId")


def _pattern(template: str) -> str:
    """A template as a regex; ``{userId}`` is captured (the layer checks it), ``{path}`` spans
    segments, every other parameter is one segment."""

    def parameter(match: re.Match[str]) -> str:
        name = match.group(1)
        if name == "path":
            return ".+"
        return "(?P<userId>[^/]+)" if name == "userId" else "[^/]+"

    return re.sub(r"\\\{(\w+)\\\}", parameter, re.escape(template))


TABLE = Table(RULES)


def rule_for(method: str, path: str) -> Rule:
    return TABLE.rule_for(method, path)
