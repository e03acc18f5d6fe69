"""Task registries for the tests that run the cluster cron (in process through
``Settings.scheduler_tasks``, or in server processes through TANDEM_SCHEDULER_TASKS), and the
settings that load them with the compressed timings."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from tandem.scheduler.registry import Registry, TaskContext, TaskFunction
from tests.support.timings import CRON_TIMINGS, cron_settings

HERE = __name__


def scheduler_env(registry: str, **extra: str) -> dict[str, str]:
    """The environment of a server process running ``registry`` (a name of this module, or
    ``module:name``) at the compressed timings."""
    ref = registry if ":" in registry else f"{HERE}:{registry}"
    return {**CRON_TIMINGS, "TANDEM_SCHEDULER_TASKS": ref, **extra}


def scheduler_settings(registry: str, **extra: Any) -> dict[str, Any]:
    """``scheduler_env`` as keyword arguments of ``Settings``, for an app run in process."""
    ref = registry if ":" in registry else f"{HERE}:{registry}"
    return {**cron_settings(), "scheduler_tasks": ref, **extra}


def _busy(seconds: float) -> TaskFunction:
    async def body(ctx: TaskContext) -> None:
        await ctx.sleep(seconds)

    return body


def _failing(seconds: float, message: str) -> TaskFunction:
    async def body(ctx: TaskContext) -> None:
        await ctx.sleep(seconds)
        raise ConnectionError(message)

    return body


# A small cluster's day in compressed time: one task that always runs (its run outlasts its
# interval), a few that come and go, one that fails. Also what docs/status-page.png shows.
showcase = Registry()
showcase.task("ReindexSearch", timedelta(seconds=1))(_busy(300.0))
showcase.task("SendDigests", timedelta(seconds=4))(_busy(1.5))
showcase.task("SyncInventory", timedelta(seconds=5))(_busy(2.5))
showcase.task("RefreshRates", timedelta(seconds=3))(_busy(0.3))
showcase.task("ExpireSessions", timedelta(seconds=6))(_busy(0.5))
showcase.task("ImportPartnerFeed", timedelta(seconds=5))(
    _failing(0.4, "partner feed answered 503 Service Unavailable")
)
showcase.task("RebuildReports", timedelta(seconds=12))(_busy(7.0))
showcase.task("PurgeAuditLog", timedelta(seconds=30))(_busy(2.0))
showcase.task("ExportLedger", timedelta(seconds=8))(_busy(5.0))

# Markup in a task name (code) and in an error message (an exception): the page must show
# both as text. No "/" in the name: /tasks/{name}/history cannot route one, even encoded.
HOSTILE_NAME = 'Feed <b>&"quotes" &amp;'
HOSTILE_ERROR = '<script>alert("tandem")</script> & <img src=x onerror=alert(1)>'
hostile = Registry()
hostile.task(HOSTILE_NAME, timedelta(seconds=0.5))(_failing(0.05, HOSTILE_ERROR))

# One quick task that does nothing, beside which the housekeeping tasks run.
quiet = Registry()
quiet.task("Quick", timedelta(seconds=1))(_busy(0.0))

# Ten equal short tasks due every second: a task API with runs coming and going.
EQUAL_TASKS = [f"Equal{i:02d}" for i in range(1, 11)]
equal = Registry()
for _name in EQUAL_TASKS:
    equal.task(_name, timedelta(seconds=1))(_busy(0.3))

# No task of its own: a server loading it with TANDEM_MAINTENANCE_ENABLED runs only the
# housekeeping tasks (tandem/maintenance.py).
housekeeping = Registry()


class LabelParams(BaseModel):
    """The params of ``probe.label``: a label each run records (its history's params) and
    how long it runs."""

    model_config = ConfigDict(strict=True, extra="forbid")

    label: str = Field(min_length=1, max_length=100)
    seconds: float = Field(default=0.0, ge=0, le=600)


async def _labelled(ctx: TaskContext) -> None:
    await ctx.sleep(ctx.params.seconds)


# Schedules as data: a task with params and no code schedule (schedules made through the API
# run it), and one code schedule beside it.
catalog = Registry()
catalog.task("probe.label", params=LabelParams)(_labelled)
catalog.task("probe.coded", timedelta(hours=1))(_busy(0.0))

# The release before probe.label (a rolling deploy): its instances never claim its schedules.
catalog_before = Registry()
catalog_before.task("probe.coded", timedelta(hours=1))(_busy(0.0))
