"""The spawner threads: run: tasks are started off the loop, each by a thread pinned to its cores.

Owns: one thread per core set (at most MAX_SPAWNERS, the least recently used retired), the
queue of tasks each has to start and the queue of what they started, which the loop takes
over. Not here: what a spawn does (chute.execution.local, chute.execution.runner), the
loop (the caller's reactor).

Off the loop, because a spawn waits for the child's exec (vfork), and pinning the loop's
own thread around it would move the loop to the task's cores and back: meanwhile the loop
records results and takes files (the GIL is free while a spawn waits). A thread per core
set, because a child inherits its parent thread's affinity: started from a thread already
there, a task is pinned without any move (chute.execution.runner.spawn skips the system
calls).
Crash safety: nothing durable is written here.
Diagnostics: none of its own: a spawn that fails is a Result in the queue.
Limits: put and stop are called from the loop's thread.
"""

from __future__ import annotations

import contextlib
import os
import queue
import threading
from collections import deque
from collections.abc import Callable

from chute.execution.executor import Result, Task
from chute.execution.runprocess import RunProcess
from chute.scheduling.topology import format_cpulist

MAX_SPAWNERS = 128  # spawner threads kept (one per core set); the least recently used goes

Spawned = tuple[str, RunProcess | Result]  # a task's key and what its spawn gave


class _Spawner:
    """A thread that starts the run: tasks of one core set, pinned to those cores for life."""

    def __init__(
        self,
        cores: tuple[int, ...],
        spawn: Callable[[Task], RunProcess | Result],
        out: deque[Spawned],
        post: Callable[[Callable[[], None]], None],
        register: Callable[[], None],
    ):
        self._cores = cores
        self._spawn = spawn
        self._out = out
        self._post = post
        self._register = register
        self._queue: queue.SimpleQueue[Task | None] = queue.SimpleQueue()
        name = f"chute-spawn-{format_cpulist(cores) if cores else 'any'}"
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def put(self, task: Task) -> None:
        self._queue.put(task)

    def retire(self) -> None:
        """Start what is queued, then end (without waiting here)."""
        self._queue.put(None)

    def stop(self) -> None:
        """Start nothing more of what is queued; return once the thread is gone."""
        with contextlib.suppress(queue.Empty):
            while True:
                self._queue.get_nowait()
        self._queue.put(None)
        self._thread.join()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _loop(self) -> None:
        if self._cores:
            with contextlib.suppress(OSError):  # a bad core set fails in each spawn instead
                os.sched_setaffinity(0, self._cores)
        while (task := self._queue.get()) is not None:
            self._out.append((task.key, self._spawn(task)))
            self._post(self._register)  # the loop's thread takes it over


class Spawners:
    """The spawner threads of one executor: `spawn(task)` runs in them, what it gives lands
    in `spawned`, and `register` is posted to the loop after each."""

    def __init__(
        self,
        spawn: Callable[[Task], RunProcess | Result],
        post: Callable[[Callable[[], None]], None],
        register: Callable[[], None],
    ):
        self._spawn = spawn
        self._post = post
        self._register = register
        self._by_cores: dict[tuple[int, ...], _Spawner] = {}  # least recently used first
        self._retired: list[_Spawner] = []  # dropped from _by_cores, maybe still starting
        self.spawned: deque[Spawned] = deque()

    def put(self, task: Task) -> None:
        """`task` is started by the thread of its core set."""
        cores = task.cores
        spawner = self._by_cores.pop(cores, None)
        if spawner is None:
            if len(self._by_cores) >= MAX_SPAWNERS:
                # Its queue may still hold tasks: it starts them, then ends.
                oldest = self._by_cores.pop(next(iter(self._by_cores)))
                oldest.retire()
                self._retired = [s for s in self._retired if s.alive] + [oldest]
            spawner = _Spawner(cores, self._spawn, self.spawned, self._post, self._register)
        self._by_cores[cores] = spawner  # now the most recently used
        spawner.put(task)

    def stop(self) -> None:
        """No further spawns; returns once every thread is gone (what they started is in
        `spawned`)."""
        for spawner in [*self._by_cores.values(), *self._retired]:
            spawner.stop()
        self._by_cores.clear()
        self._retired.clear()
