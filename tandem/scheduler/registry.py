"""Tasks are Python coroutines registered by name, with the model of their params (a pydantic
model: defaults and validation) and, for a *code schedule*, a schedule (an interval, or a
cron expression in a time zone) and its policies (missed slots, overlap, timeout, retries).

A schedule is a row of the ``tasks`` table: a code schedule is upserted from its definition
by every instance on start (same name as its task, ``source`` code), without touching runtime
state; an API schedule (``/schedules``) names a task and gives its own spec and params. The
claim reads spec, params and policies from the row it locks (claims.effective_definition).
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import timedelta
from typing import Any

from pydantic import BaseModel, ValidationError

from tandem.scheduler.schedules import (
    Cron,
    Every,
    MissedSlots,
    Schedule,
    ScheduleError,
    default_grace,
)


class TaskCancelledError(Exception):
    """Raised inside a task body (by ``TaskContext.sleep``/``check``) once its run was
    cancelled: fenced out, self-fenced, or drained at shutdown."""


@dataclass
class TaskContext:
    """What a running task gets: who it is, a logger, and a way to notice cancellation.

    A run is cancelled (asyncio cancellation at its next ``await``, and ``cancelled`` set)
    when another instance took it over, when it could not renew its lease in time
    (self-fencing, a margin before the lease can expire), or at shutdown. A body that blocks
    the event loop blocks that too: run blocking work with ``asyncio.to_thread`` in steps,
    and call ``check()`` between them and right before every effect outside the database
    (a thread cannot be cancelled; after a long pause of the whole process, ``check()`` still
    knows the deadline has passed before the timer has had a chance to run). Writes to a
    system that accepts a fencing token should carry ``fence``.
    """

    # The schedule's name (a code schedule's is its task's).
    name: str
    instance_id: str
    fence: int
    time_scale: float
    log: logging.LoggerAdapter[logging.Logger]
    # 1 for a slot's first run, then each retry's number (max_attempts at most, except that a
    # run lost with its instance is always run again).
    attempt: int = 1
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The event loop's time (loop.time()) at which this run gives itself up unless a lease
    # renewal moves it on; set by the runner.
    held_until: float = float("-inf")
    # The run's params: an instance of the task's params model (the raw JSON object for a
    # task without one).
    params: Any = None
    # The task (code) it runs.
    task: str = ""
    # Why it runs: "schedule", "manual" (asked for through the API) or "retry".
    trigger: str = "schedule"

    @property
    def run_id(self) -> str:
        return f"{self.name}#{self.fence}"

    def check(self) -> None:
        """Raise TaskCancelledError once the run is cancelled or past its deadline."""
        if self.cancelled.is_set() or asyncio.get_running_loop().time() >= self.held_until:
            raise TaskCancelledError(self.run_id)

    async def sleep(self, seconds: float) -> None:
        """Sleep ``seconds`` of task time (scaled), returning early with TaskCancelledError
        when the run is cancelled."""
        try:
            await asyncio.wait_for(self.cancelled.wait(), seconds * self.time_scale)
        except TimeoutError:
            return
        raise TaskCancelledError(self.run_id)


TaskFunction = Callable[[TaskContext], Awaitable[None]]


async def _no_body(ctx: TaskContext) -> None:
    raise LookupError(f"task {ctx.name!r} has no function")


class ParamsError(ValueError):
    """Params that the task's model refuses: ``errors`` as pydantic gives them (each with its
    field path, ``loc``)."""

    def __init__(self, task: str, errors: list[dict[str, Any]]) -> None:
        self.errors = errors
        where = ".".join(str(p) for p in errors[0]["loc"]) if errors and errors[0]["loc"] else ""
        first = errors[0]["msg"] if errors else "invalid"
        super().__init__(f"params of task {task!r}: {where + ': ' if where else ''}{first}")


class NoParams(BaseModel, extra="forbid"):
    """The params of a task that takes none: the empty object only."""


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    # None: a task without a code schedule (it runs on API schedules only).
    schedule: Schedule | None
    function: TaskFunction
    # Watched tasks (housekeeping) keep their health gauges while paused, and export since
    # when they are paused: pausing one cannot silence its alerts.
    watched: bool = False
    missed: MissedSlots = MissedSlots.COALESCE
    # How late a slot may start and still count as on time (policy skip).
    grace: timedelta = timedelta(seconds=60)
    # The most missed slots a claim catches up on (policy catch_up): the newest ones.
    catch_up_limit: int = 10
    # A run still going after this long is cancelled and recorded as timed_out.
    timeout: timedelta | None = None
    # Attempts per slot (1: no retries); a failed or timed-out attempt is retried after
    # retry_delay(attempt, retry_backoff, retry_backoff_max).
    max_attempts: int = 1
    retry_backoff: timedelta = timedelta(seconds=10)
    retry_backoff_max: timedelta = timedelta(hours=1)
    # The model of its params (NoParams: it takes none).
    params: type[BaseModel] = NoParams
    # What a slot or a manual run does while a run is still going (models.OVERLAP_POLICIES).
    overlap: str = "skip"

    @property
    def function_name(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"

    def parse_params(self, raw: object) -> BaseModel:
        """``raw`` (JSON data) as the task's params model; ParamsError with field paths when
        the model refuses it. Data only: a model's fields are values, never code to import."""
        try:
            return self.params.model_validate(raw)
        except ValidationError as error:
            raise ParamsError(
                self.name, [dict(e) for e in error.errors(include_url=False, include_input=False)]
            ) from None

    def stored_params(self, raw: object) -> dict[str, Any]:
        """``raw`` validated and as stored: the model's JSON, defaults filled in."""
        return self.parse_params(raw).model_dump(mode="json")

    def scaled(self, factor: float) -> TaskDefinition:
        """The definition with its durations times ``factor`` (the compressed time of tests
        and demos; a cron schedule keeps the calendar's)."""
        if factor == 1:
            return self
        return replace(
            self,
            schedule=None if self.schedule is None else self.schedule.scaled(factor),
            grace=self.grace * factor,
            timeout=None if self.timeout is None else self.timeout * factor,
            retry_backoff=self.retry_backoff * factor,
            retry_backoff_max=self.retry_backoff_max * factor,
        )


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}

    def task(
        self,
        name: str,
        every: timedelta | None = None,
        *,
        cron: str | None = None,
        tz: str = "UTC",
        watched: bool = False,
        missed: MissedSlots | str = MissedSlots.COALESCE,
        grace: timedelta | None = None,
        catch_up_limit: int = 10,
        timeout: timedelta | None = None,
        max_attempts: int = 1,
        retry_backoff: timedelta = timedelta(seconds=10),
        retry_backoff_max: timedelta = timedelta(hours=1),
        params: type[BaseModel] = NoParams,
        overlap: str = "skip",
    ) -> Callable[[TaskFunction], TaskFunction]:
        """Decorator: register ``function`` as task ``name`` taking ``params`` (a pydantic
        model), with a code schedule of the same name due ``every`` interval or at the times
        of the ``cron`` expression in time zone ``tz`` (an IANA name); with neither, the task
        runs on API schedules only. A bad expression, zone or option raises ValueError here,
        so a server with one does not start."""
        problem = f"task {name!r}"
        if every is not None and cron is not None:
            raise ValueError(f"{problem} takes one of every= and cron=, not both")
        try:
            schedule: Schedule | None = (
                Every(every) if every is not None else Cron(cron, tz) if cron is not None else None
            )
        except ScheduleError as error:
            raise ValueError(f"{problem}: {error}") from None
        if not (isinstance(params, type) and issubclass(params, BaseModel)):
            raise ValueError(f"{problem}: params must be a pydantic model class")
        if schedule is not None:
            try:
                params.model_validate({})
            except ValidationError:
                raise ValueError(
                    f"{problem}: a code schedule runs with its params model's defaults, and "
                    f"{params.__name__} has a field without one (drop every=/cron= and make "
                    "schedules of it through the API)"
                ) from None
        if overlap not in ("skip", "buffer_one", "cancel_other"):
            raise ValueError(
                f"{problem}: overlap={overlap!r} is not one of skip, buffer_one, cancel_other"
            )

        try:
            policy = MissedSlots(missed)
        except ValueError:
            choices = ", ".join(m.value for m in MissedSlots)
            raise ValueError(f"{problem}: missed={missed!r} is not one of {choices}") from None
        if catch_up_limit < 1:
            raise ValueError(f"{problem}: catch_up_limit must be at least 1")
        if max_attempts < 1:
            raise ValueError(f"{problem}: max_attempts must be at least 1")
        for label, value in (("timeout", timeout), ("retry_backoff", retry_backoff)):
            if value is not None and value <= timedelta(0):
                raise ValueError(f"{problem}: {label} must be positive")
        definition = TaskDefinition(
            name=name,
            schedule=schedule,
            function=_no_body,  # the decorated function, below
            watched=watched,
            missed=policy,
            grace=(
                timedelta(seconds=60)
                if schedule is None
                else default_grace(schedule)
                if grace is None
                else grace
            ),
            catch_up_limit=catch_up_limit,
            timeout=timeout,
            max_attempts=max_attempts,
            retry_backoff=retry_backoff,
            retry_backoff_max=max(retry_backoff_max, retry_backoff),
            params=params,
            overlap=overlap,
        )

        def register(function: TaskFunction) -> TaskFunction:
            self._add(replace(definition, function=function))
            return function

        return register

    def _add(self, definition: TaskDefinition) -> None:
        name = definition.name
        if name in self._tasks:
            raise ValueError(f"task {name!r} is registered twice")
        if not name or "/" in name:
            # The name is a path segment of /tasks/{name}/..., and a deleted schedule's row
            # is renamed "<name>/<id>".
            raise ValueError(f"task name {name!r} must be non-empty and contain no '/'")
        self._tasks[name] = definition

    @classmethod
    def combine(cls, *registries: Registry) -> Registry:
        """A new registry with every task of ``registries``; a name in two is an error."""
        combined = cls()
        for registry in registries:
            for definition in registry.all():
                combined._add(definition)
        return combined

    def get(self, name: str) -> TaskDefinition | None:
        return self._tasks.get(name)

    def all(self) -> list[TaskDefinition]:
        return list(self._tasks.values())

    def scheduled(self) -> list[TaskDefinition]:
        """The tasks with a code schedule."""
        return [d for d in self._tasks.values() if d.schedule is not None]


def load_registry(path: str) -> Registry:
    """Import ``module:attribute`` and return that Registry."""
    module_name, _, attribute = path.partition(":")
    registry = getattr(importlib.import_module(module_name), attribute or "registry")
    if not isinstance(registry, Registry):
        raise TypeError(f"{path} is not a tandem.scheduler.registry.Registry")
    return registry
