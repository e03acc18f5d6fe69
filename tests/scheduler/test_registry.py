"""Registering tasks: the registry refuses definitions the scheduler or the API cannot serve."""

from __future__ import annotations

from datetime import timedelta

import pytest

from tandem.scheduler.registry import Registry, TaskContext


async def _noop(_: TaskContext) -> None:
    return None


@pytest.mark.parametrize(
    ("name", "every"),
    [
        ("", timedelta(seconds=1)),
        ("reports/daily", timedelta(seconds=1)),  # would not fit /tasks/{name}/history
        ("Zero", timedelta(0)),
        ("Negative", timedelta(seconds=-1)),
    ],
)
def test_bad_definitions_are_refused(name: str, every: timedelta) -> None:
    """An empty name, a '/' in the name, or a non-positive interval is refused at import."""
    with pytest.raises(ValueError, match="task"):
        Registry().task(name, every)(_noop)


def test_a_name_is_registered_once() -> None:
    """Two tasks with one name would share one row of the tasks table: refused."""
    registry = Registry()
    registry.task("Once", timedelta(seconds=1))(_noop)
    with pytest.raises(ValueError, match="twice"):
        registry.task("Once", timedelta(seconds=2))(_noop)
