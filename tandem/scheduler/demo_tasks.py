"""The ten demo tasks `make run` registers (each runs at least 2 minutes, times the time scale,
and logs its start, progress and end with its name, instance and run id), and ``demo.echo``,
a task with params and no code schedule, for /schedules."""

from __future__ import annotations

from datetime import timedelta

from pydantic import BaseModel, ConfigDict, Field

from tandem.core.settings import get_settings
from tandem.scheduler.registry import Registry, TaskContext

RUN_SECONDS = 120.0
PROGRESS_STEPS = 4

registry = Registry()

# (name, interval): the demo's fixed schedule, asserted by tests/scheduler/test_cluster.py.
SCHEDULE: list[tuple[str, timedelta]] = [
    ("TestTask1", timedelta(minutes=5)),
    ("TestTask2", timedelta(hours=1)),
    ("TestTask3", timedelta(minutes=10)),
    ("TestTask4", timedelta(hours=6)),
    ("TestTask5", timedelta(minutes=15)),
    ("TestTask6", timedelta(minutes=30)),
    ("TestTask7", timedelta(days=1)),
    ("TestTask8", timedelta(minutes=20)),
    ("TestTask9", timedelta(minutes=45)),
    ("TestTask10", timedelta(minutes=25)),
]


class DemoTaskFailedError(RuntimeError):
    pass


async def demo_task(ctx: TaskContext) -> None:
    """Work for RUN_SECONDS in PROGRESS_STEPS steps, logging each; fail at the end when this
    task is the one named by TANDEM_SCHEDULER_FAILING_TASK."""
    ctx.log.info("started")
    for step in range(1, PROGRESS_STEPS + 1):
        await ctx.sleep(RUN_SECONDS / PROGRESS_STEPS)
        ctx.log.info("progress %d/%d", step, PROGRESS_STEPS)
    if get_settings().scheduler_failing_task == ctx.name:
        raise DemoTaskFailedError(f"{ctx.name} failed on purpose (TANDEM_SCHEDULER_FAILING_TASK)")
    ctx.log.info("finished")


for _name, _interval in SCHEDULE:
    registry.task(_name, _interval)(demo_task)


class EchoParams(BaseModel):
    """The params of ``demo.echo``: what it logs, and how long it then sleeps."""

    model_config = ConfigDict(strict=True, extra="forbid")

    message: str = Field(max_length=1000)
    seconds: float = Field(default=0.0, ge=0, le=3600, allow_inf_nan=False)


@registry.task("demo.echo", params=EchoParams)
async def echo(ctx: TaskContext) -> None:
    """A task with params and no code schedule, for trying /schedules on a fresh `make run`:
    logs the message, then sleeps that long (task time)."""
    params: EchoParams = ctx.params
    ctx.log.info("echo: %s", params.message)
    await ctx.sleep(params.seconds)
