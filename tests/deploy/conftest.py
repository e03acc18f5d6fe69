"""Fixtures of the deployment tests."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.deploy.edge import Nginx, nginx_starter


@pytest.fixture
def nginx(tmp_path: Path) -> Iterator[Callable[..., Nginx]]:
    """Starts the shipped nginx config in front of the given upstream addresses."""
    with nginx_starter(tmp_path) as start:
        yield start
