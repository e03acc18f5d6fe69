"""POST /keys: the request and the answer (the token shown once)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

from tandem.core.callers import WALLET_READ, WALLET_WRITE
from tandem.core.ids import INT64_MAX

# The longest life of a key made through the API (seconds); the owner's function keeps it.
BOUND_KEY_MAX_SECONDS = 24 * 3600
# Users one key may be bound to: a token for one end user (or a household), not a list.
BOUND_KEY_MAX_USERS = 100


class BoundKeyCreate(BaseModel):
    model_config = ConfigDict(
        strict=True,
        extra="forbid",
        populate_by_name=True,
        json_schema_extra={
            "examples": [
                {"name": "app-user-42", "scopes": [WALLET_READ, WALLET_WRITE], "userIds": [42]}
            ]
        },
    )

    name: str = Field(
        min_length=1, max_length=64, description="Unique among keys, revoked ones included."
    )
    # A scope's shape only (what it may be is the owner's function's to say, with its own
    # codes): no text that PostgreSQL would refuse, such as a NUL, reaches it.
    scopes: list[Annotated[str, Field(pattern=r"^[a-z]{1,16}(:[a-z]{1,16})?$")]] = Field(
        max_length=8,
        description="Within `wallet:read` and `wallet:write`, and within the calling key's.",
    )
    user_ids: list[Annotated[int, Field(ge=1, le=INT64_MAX)]] = Field(
        alias="userIds",
        max_length=BOUND_KEY_MAX_USERS,
        description="The users the key may touch (at least one, each existing).",
    )
    expires_in: int = Field(
        default=BOUND_KEY_MAX_SECONDS,
        alias="expiresIn",
        # Wide enough for the function to refuse what is out of its range with its own code;
        # narrow enough to stay an interval PostgreSQL can compute.
        ge=-(10**9),
        le=10**9,
        description=f"Seconds until it expires: 1..{BOUND_KEY_MAX_SECONDS} (the default).",
    )


class BoundKey(BaseModel):
    model_config = ConfigDict(populate_by_name=True)

    name: str
    token: str = Field(description="Shown once: only its SHA-256 is stored.")
    scopes: list[str]
    user_ids: list[Annotated[int, Field(ge=1, le=INT64_MAX)]] = Field(alias="userIds")
    expires_at: datetime = Field(alias="expiresAt")
