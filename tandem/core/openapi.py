"""The OpenAPI schema: how errors are documented (one envelope model, one way to list the
codes a route may answer, and the two database failures every route that touches the
database shares: tandem/core/failures.py decides which one an answer is), the models that
hand-written parts of the schema refer to, and the app's schema itself (install_openapi).

A model that no FastAPI route declares (a route that parses its raw body, an operation no
route serves) is referred to with ``schema_ref``, which also registers it: the schema's
components are then whatever the code refers to, with no list of models to keep in step.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import pydantic
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

# Every model referred to by schema_ref, by its component name.
_COMPONENTS: dict[str, type[pydantic.BaseModel]] = {}

ErrorCode = tuple[int, str, str]

DATABASE_UNAVAILABLE: ErrorCode = (
    503,
    "database_unavailable",
    "the database could not be reached, or refused or rolled back the statement; nothing "
    "changed: retry after `Retry-After` seconds",
)
OUTCOME_UNKNOWN: ErrorCode = (
    503,
    "outcome_unknown",
    "the connection to the database broke after the change was sent, so it may or may not "
    "have been applied: retry with the same `Idempotency-Key`, which returns the first "
    "outcome or applies the change exactly once (without a key, read the state before "
    "retrying)",
)

_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying.",
        "schema": {"type": "integer"},
    }
}


def schema_ref(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """``{"$ref": ...}`` to ``model``'s component, which the schema then includes."""
    name = model.__name__
    known = _COMPONENTS.setdefault(name, model)
    assert known is model, f"two models are both named {name} in the OpenAPI schema"
    return {"$ref": f"#/components/schemas/{name}"}


def json_request_body(model: type[pydantic.BaseModel], *, required: bool = True) -> dict[str, Any]:
    """The ``requestBody`` of a route that parses its raw bytes itself (FastAPI cannot see its
    model): for ``openapi_extra=`` or a hand-written operation."""
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": schema_ref(model)}},
        }
    }


class ErrorBody(pydantic.BaseModel):
    code: str
    message: str
    details: list[dict[str, Any]] | None = None


class ErrorEnvelope(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        json_schema_extra={
            "examples": [
                {"error": {"code": "insufficient_funds", "message": "the balance is too low"}}
            ]
        }
    )
    error: ErrorBody


def error_responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """FastAPI ``responses=`` for these error codes, grouped by status."""
    out: dict[int | str, dict[str, Any]] = {}
    for status_code, code, description in codes:
        entry = out.setdefault(status_code, {"description": "", "model": ErrorEnvelope})
        entry["description"] = (entry["description"] + f" `{code}`: {description}.").strip()
        if status_code in (429, 503):
            entry["headers"] = _RETRY_AFTER
    return out


def error_responses_schema(*codes: ErrorCode) -> dict[str, dict[str, Any]]:
    """The same as ``error_responses``, as OpenAPI response objects: for operations that no
    FastAPI route declares (the wallet's lean path, tandem/wallet/fastpath.py)."""
    out: dict[str, dict[str, Any]] = {}
    envelope = {"application/json": {"schema": schema_ref(ErrorEnvelope)}}
    for status_code, entry in error_responses(*codes).items():
        response: dict[str, Any] = {"description": entry["description"], "content": envelope}
        if "headers" in entry:
            response["headers"] = entry["headers"]
        out[str(status_code)] = response
    return out


Paths = Mapping[str, Mapping[str, dict[str, Any]]]


def install_openapi(
    app: FastAPI,
    *,
    operations: Iterable[Paths] = (),
    amend: Iterable[Callable[[dict[str, Any]], None]] = (),
) -> None:
    """Serve, as the app's schema, FastAPI's schema of its routes plus ``operations`` (path
    items that no FastAPI route serves), the components every ``schema_ref`` registered, and
    then each of ``amend`` applied to the whole (e.g. the access layer's security)."""
    extra_paths = list(operations)
    amendments = list(amend)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                description=app.description,
                routes=app.routes,
            )
            paths = schema.setdefault("paths", {})
            for items in extra_paths:
                # A copy: the amendments below change operations in place, and the same
                # operations serve every app made in this process.
                for path, methods in copy.deepcopy(items).items():
                    paths.setdefault(path, {}).update(methods)
            for change in amendments:
                change(schema)
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name, model in _COMPONENTS.items():
                model_schema = model.model_json_schema(
                    ref_template="#/components/schemas/{model}", mode="serialization"
                )
                components.update(model_schema.pop("$defs", {}))
                components[name] = model_schema
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
