"""FastAPI dependencies every domain's endpoints share."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession


async def get_session(request: Request) -> AsyncIterator[AsyncSession]:
    """One request, one transaction: committed here on success, rolled back on any error."""
    async with request.app.state.resources.sessionmaker() as session, session.begin():
        yield session


# scope="function": commit before the response is sent. With the default ("request") the
# commit would run after the client already has its 2xx, and a read right after could miss
# the write (a test caught exactly that).
Session = Annotated[AsyncSession, Depends(get_session, scope="function")]
