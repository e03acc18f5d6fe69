"""What endpoints receive, as typed FastAPI dependencies: the process's ``Instance`` (its
settings, its id in the cluster and its ``Database``). Endpoints never read ``app.state``;
the one accessor below does, and checks the type."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, FastAPI, Request

from tandem.core.callers import Caller, caller_of
from tandem.core.database import Database
from tandem.core.settings import Settings


@dataclass(frozen=True)
class Instance:
    """This process. ``instance_id`` names it in the cluster: the scheduler's membership row,
    /instances, the X-Instance-Id response header and the tandem_instance_info metric."""

    settings: Settings
    database: Database
    instance_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def attach(self, app: FastAPI) -> None:
        app.state.instance = self


def instance_of(app: FastAPI) -> Instance:
    instance = app.state.instance
    assert isinstance(instance, Instance), "create_app() attaches the Instance"
    return instance


# async: a plain def would run in FastAPI's thread pool, a thread hop per request.
async def get_instance(request: Request) -> Instance:
    return instance_of(request.app)


async def get_database(request: Request) -> Database:
    return instance_of(request.app).database


async def get_caller(request: Request) -> Caller:
    return caller_of(request.scope)


CurrentInstance = Annotated[Instance, Depends(get_instance)]
# The API key the access layer verified for this request.
CurrentCaller = Annotated[Caller, Depends(get_caller)]
Db = Annotated[Database, Depends(get_database)]
