"""Task registries for bench/scheduler.py, loaded by the server processes it starts through
TANDEM_SCHEDULER_TASKS (the bench puts this folder on their PYTHONPATH).

- ``equal``: TANDEM_BENCH_TASKS equal tasks (default 100), each due every EQUAL_INTERVAL and
  busy EQUAL_BUSY_SECONDS. The body only sleeps (through ``ctx.sleep``, so a fenced or drained
  run stops at once): what is measured is the scheduler, not the work.
- ``idle``: one task due once a day, so an instance has nothing to do after its first poll.
- ``catalog`` (bench/schedules.py): ``bench.noop``, a task with params and no code schedule.
"""

from __future__ import annotations

import os
from datetime import timedelta

from pydantic import BaseModel, ConfigDict

from tandem.scheduler.registry import Registry, TaskContext

TASKS_ENV = "TANDEM_BENCH_TASKS"
EQUAL_INTERVAL = timedelta(seconds=2)
EQUAL_BUSY_SECONDS = 0.5


async def busy(ctx: TaskContext) -> None:
    """Hold the run for EQUAL_BUSY_SECONDS of task time."""
    await ctx.sleep(EQUAL_BUSY_SECONDS)


async def nothing(ctx: TaskContext) -> None:
    """Return at once."""


equal = Registry()
for number in range(1, int(os.environ.get(TASKS_ENV, "100")) + 1):
    equal.task(f"Equal{number:03d}", EQUAL_INTERVAL)(busy)

idle = Registry()
idle.task("Daily", timedelta(days=1))(nothing)


class Label(BaseModel):
    """The params of ``bench.noop``: a label, validated as any task's params are."""

    model_config = ConfigDict(strict=True, extra="forbid")

    label: str


async def noop(ctx: TaskContext) -> None:
    """Return at once: what bench/schedules.py measures is the claiming."""


# bench/schedules.py: one task with params; its schedules are rows the bench writes.
catalog = Registry()
catalog.task("bench.noop", params=Label)(noop)
