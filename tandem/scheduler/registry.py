"""Tasks are Python coroutines registered by name with their interval.

On start every instance upserts the definitions (name, interval, function name) without
touching runtime state, so ``tasks.function_name`` always names code that exists.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta


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

    name: str
    instance_id: str
    fence: int
    time_scale: float
    log: logging.LoggerAdapter[logging.Logger]
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The event loop's time (loop.time()) at which this run gives itself up unless a lease
    # renewal moves it on; set by the runner.
    held_until: float = float("-inf")

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


@dataclass(frozen=True)
class TaskDefinition:
    name: str
    interval: timedelta
    function: TaskFunction
    # Watched tasks (housekeeping) keep their health gauges while paused, and export since
    # when they are paused: pausing one cannot silence its alerts.
    watched: bool = False

    @property
    def function_name(self) -> str:
        return f"{self.function.__module__}.{self.function.__qualname__}"


class Registry:
    def __init__(self) -> None:
        self._tasks: dict[str, TaskDefinition] = {}

    def task(
        self, name: str, every: timedelta, *, watched: bool = False
    ) -> Callable[[TaskFunction], TaskFunction]:
        """Decorator: register ``function`` as task ``name``, due every ``every``."""

        def register(function: TaskFunction) -> TaskFunction:
            if name in self._tasks:
                raise ValueError(f"task {name!r} is registered twice")
            if every <= timedelta(0):
                raise ValueError(f"task {name!r} needs a positive interval")
            if not name or "/" in name:
                # The name is a path segment of /tasks/{name}/...
                raise ValueError(f"task name {name!r} must be non-empty and contain no '/'")
            self._tasks[name] = TaskDefinition(name, every, function, watched)
            return function

        return register

    @classmethod
    def combine(cls, *registries: Registry) -> Registry:
        """A new registry with every task of ``registries``; a name in two is an error."""
        combined = cls()
        for registry in registries:
            for definition in registry.all():
                combined.task(definition.name, definition.interval, watched=definition.watched)(
                    definition.function
                )
        return combined

    def get(self, name: str) -> TaskDefinition | None:
        return self._tasks.get(name)

    def all(self) -> list[TaskDefinition]:
        return list(self._tasks.values())


def load_registry(path: str) -> Registry:
    """Import ``module:attribute`` and return that Registry."""
    module_name, _, attribute = path.partition(":")
    registry = getattr(importlib.import_module(module_name), attribute or "registry")
    if not isinstance(registry, Registry):
        raise TypeError(f"{path} is not a tandem.scheduler.registry.Registry")
    return registry
