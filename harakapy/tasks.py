"""Plugins' background tasks: the ``@background`` marker and the runner that keeps them going.

Rules:

1. Tasks start after ``startup`` (and after a reload's ``config_reload``), with the plugin
   set that passed it; a reload cancels the old set's tasks and starts the new set's.
   SIGTERM cancels them and waits for them to finish their ``finally`` blocks.
2. A task that raises is logged with its plugin's name and started again after a backoff
   that doubles from 1 s to 5 minutes; it never stops the server. A periodic task that
   returns runs again ``every`` seconds later; a long-lived one that returns is done.
3. A task runs once per installation, not once per process: the runner that holds an
   exclusive ``flock`` on ``DIR/state/background.lock`` runs them, and any other process
   over the same config directory waits and takes over when that one exits (the kernel
   drops the lock of a dead process). ``per_process=True`` tasks (flushing a process's own
   buffers) run in every process.

Time comes from the server's clock, so tests move it instead of sleeping.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, overload

from harakapy.clock import Clock
from harakapy.locks import ProcessLock

if TYPE_CHECKING:
    from harakapy.view import Server

log = logging.getLogger("harakapy.tasks")

MARKER = "harakapy_background"
FIRST_BACKOFF = 1.0
MAX_BACKOFF = 300.0
# How often a process that does not run the installation's tasks checks whether the one
# that did has gone.
STANDBY_POLL = 5.0

TaskFunction = Callable[["Server"], Awaitable[None]]
F = TypeVar("F", bound=TaskFunction)


@dataclass(frozen=True, slots=True)
class TaskSpec:
    """What ``@background`` says about one function."""

    every: float | None
    per_process: bool


@dataclass(frozen=True, slots=True)
class BackgroundTask:
    """One plugin's background task, as found at load time."""

    plugin: str
    name: str
    function: TaskFunction
    spec: TaskSpec


@overload
def background(function: F, /) -> F: ...
@overload
def background(*, every: float | None = None, per_process: bool = False
               ) -> Callable[[F], F]: ...


def background(function: F | None = None, /, *, every: float | None = None,
               per_process: bool = False) -> F | Callable[[F], F]:
    """Mark an ``async def task(server)`` in a plugin as a background task.

    ::

        @background(every=3600)
        async def refresh(server):
            ...

    :param every: Seconds between the end of one run and the start of the next; ``None``
        (the default) for a task that runs until the server stops.
    :param per_process: Run in every server process instead of once per installation.
    """
    if every is not None and not every > 0:
        raise ValueError(f"every must be a positive number of seconds, not {every!r}")

    def mark(target: F) -> F:
        if not inspect.iscoroutinefunction(target):
            raise TypeError(f"@background needs an async def function, not {target!r}")
        setattr(target, MARKER, TaskSpec(every, per_process))
        return target

    return mark(function) if function is not None else mark


def tasks_of(plugin: str, module: object) -> list[BackgroundTask]:
    """The functions ``@background`` marked in a plugin's module, in definition order."""
    found = []
    for name, value in vars(module).items():
        spec = getattr(value, MARKER, None)
        if isinstance(spec, TaskSpec):
            found.append(BackgroundTask(plugin, name, value, spec))
    return found


class TaskRunner:
    """Runs the background tasks of the current plugin set.

    :param clock: For periods and backoff.
    :param lock_path: The installation's lock file (``DIR/state/background.lock``).
    """

    def __init__(self, clock: Clock, lock_path: Path) -> None:
        self.clock = clock
        self.lock = ProcessLock(lock_path)
        self._tasks: list[asyncio.Task[None]] = []
        self._standby: asyncio.Task[None] | None = None
        self._current: list[tuple[BackgroundTask, Server]] = []

    @property
    def running(self) -> list[str]:
        """``plugin.function`` of each task running now, for logs and tests."""
        return [task.get_name() for task in self._tasks if not task.done()]

    async def start(self, tasks: list[tuple[BackgroundTask, Server]]) -> None:
        """Start ``tasks`` (each with its plugin's view), after stopping the old set."""
        await self.stop(keep_lock=True)
        self._current = tasks
        for task, view in tasks:
            if task.spec.per_process:
                self._launch(task, view)
        installation = [(task, view) for task, view in tasks if not task.spec.per_process]
        if not installation:
            return
        if self.lock.try_acquire():
            for task, view in installation:
                self._launch(task, view)
        else:
            log.info("background tasks run in another process (%s holds the lock)",
                     self.lock.path)
            self._standby = asyncio.get_running_loop().create_task(
                self._wait_for_lock(), name="background.standby")

    async def stop(self, *, keep_lock: bool = False) -> None:
        """Cancel every task and wait for them; release the lock unless ``keep_lock``."""
        pending = {*self._tasks, *([self._standby] if self._standby else [])}
        while pending:
            for task in pending:
                task.cancel()
            # A task whose cancellation a library swallowed (a timeout it converted into
            # its own error, say) goes on to its next wait: it is cancelled again there,
            # rather than holding the stop for ever.
            _done, pending = await asyncio.wait(pending, timeout=1.0)
            for task in pending:
                log.warning("background task %s went on after it was cancelled; "
                            "cancelling it again", task.get_name())
        self._tasks.clear()
        self._standby = None
        if not keep_lock:
            self.lock.release()

    async def _wait_for_lock(self) -> None:
        while not self.lock.try_acquire():
            await self.clock.sleep(STANDBY_POLL)
        log.info("background tasks taken over by this process")
        for task, view in self._current:
            if not task.spec.per_process:
                self._launch(task, view)

    def _launch(self, task: BackgroundTask, view: Server) -> None:
        self._tasks.append(asyncio.get_running_loop().create_task(
            self._keep_running(task, view), name=f"{task.plugin}.{task.name}"))

    async def _keep_running(self, task: BackgroundTask, view: Server) -> None:
        failures = 0
        while True:
            try:
                await task.function(view)
            except Exception:  # not BaseException: cancellation must pass through
                failures += 1
                delay = min(MAX_BACKOFF, FIRST_BACKOFF * 2 ** (failures - 1))
                log.exception("plugin %s background task %s failed; starting it again "
                              "in %.0fs", task.plugin, task.name, delay)
                await self.clock.sleep(delay)
                continue
            failures = 0
            if task.spec.every is None:
                log.info("plugin %s background task %s finished", task.plugin, task.name)
                return
            await self.clock.sleep(task.spec.every)
