"""The access layer in the OpenAPI schema: the bearer scheme, and on every protected
operation the scope it needs (from the one table the access layer checks, policy.py) and
its 401/403."""

from __future__ import annotations

import copy
from typing import Any

from tandem.access import policy
from tandem.core.openapi import error_responses_schema

_ACCESS_ERRORS = error_responses_schema(
    (401, "unauthenticated", "no API key, or an unknown or revoked one"),
    (403, "forbidden", "the API key lacks the scope this needs (or a cross-site cookie)"),
    (429, "rate_limited", "the API key is past its own request rate (`tandem keys create --rate`)"),
)


# What a key bound to users gets on a route, by its binding (policy.Binding).
_BOUND = {
    policy.Binding.UNBOUND_ONLY: "refused (403).",
    policy.Binding.PATH_USER: "only its users; any other is 404 `user_not_found`.",
    policy.Binding.BODY_USER: "only on its users' money (a transfer: from its user, to "
    "anyone); any other is 404 `user_not_found`, nothing changed.",
    policy.Binding.RESOURCE_USER: "only its side of a transfer (the other side's balance "
    "null); a transfer of neither side is 404.",
    policy.Binding.NOT_USER_DATA: "as any key.",
}


def document_access(schema: dict[str, Any]) -> None:
    """Add the access rules to a whole schema, in place (core/openapi.install_openapi)."""
    schemes = schema.setdefault("components", {}).setdefault("securitySchemes", {})
    schemes["apiKey"] = {
        "type": "http",
        "scheme": "bearer",
        "description": "An API key (`tandem keys create`), as Authorization: Bearer <token>.",
    }
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            rule = policy.TABLE.rule_named(method.upper(), path) or policy.UNLISTED
            if rule.requirement == policy.PUBLIC:
                continue
            operation["security"] = [{"apiKey": []}]
            if rule.requirement != policy.ANY_KEY:
                needs = (
                    f"Needs an API key with the scope `{rule.requirement}` (or `all`). "
                    f"A key bound to users: {_BOUND[rule.binding]}"
                )
                operation["description"] = f"{operation.get('description', '')}\n\n{needs}"
            responses = operation.setdefault("responses", {})
            for status_code, response in _ACCESS_ERRORS.items():
                if status_code in responses:  # the route's own 429s: both said
                    said = responses[status_code]
                    said["description"] = f"{said['description']} {response['description']}"
                else:
                    responses[status_code] = copy.deepcopy(response)
