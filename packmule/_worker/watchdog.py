"""Time-to-run, enforced from inside the worker as well as by the queue.

A worker process hands back (releases) a job it holds once the job's
time_to_run has passed, so another worker runs it, whatever the queue server
does about it.  beanstalkd 1.12 is the reason: seen here, a job whose holder
had waited in ``reserve-with-timeout`` was sometimes never timed out (its
``time-left`` went negative and stayed reserved; beanstalkd issues #174, #262,
#380 describe the same).  On the local backend the coordinator does the same
thing first; the second release is ignored (a lapsed handle).

A stopped process stops its watchdog too: its job then goes back when the
queue times it out, or when the process is resumed, whichever comes first.
beanstalkd 1.12 may not time it out at all, so a process may also publish its
deadline (``Watchdog.report``): ``packmule worker`` ends a worker process that
is stopped past it, and its connection's end frees its jobs.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Any

from packmule.backends.base import Queue

__all__ = ["TICK", "Watchdog"]

TICK = 0.25  # s between looks


class Watchdog:
    # Where this process publishes the wall-clock time by which it must have handed
    # back what it holds (0: it holds nothing), for a supervisor to read.
    report: Callable[[float], None] | None = None

    def __init__(self, queue: Queue) -> None:
        self.queue = queue
        self._lock = threading.Lock()
        self._held: dict[int, tuple[float, float, Any]] = {}  # id(handle) -> (deadline, ttr, handle)
        self._thread: threading.Thread | None = None

    def hold(self, handle: Any, ttr: float) -> None:
        with self._lock:
            self._held[id(handle)] = (time.monotonic() + ttr, ttr, handle)
            self._publish()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, daemon=True, name="packmule-ttr")
                self._thread.start()

    def touch(self, handle: Any) -> None:
        with self._lock:
            held = self._held.get(id(handle))
            if held is not None:
                self._held[id(handle)] = (time.monotonic() + held[1], held[1], handle)
                self._publish()

    def settle(self) -> None:
        """The batch is being committed: stop watching its jobs."""
        with self._lock:
            self._held.clear()
            self._publish()

    def _publish(self) -> None:
        """(Under the lock.)  Tell ``report`` the earliest deadline held, as wall-clock time."""
        if Watchdog.report is not None:
            soonest = min((deadline for deadline, _, _ in self._held.values()), default=None)
            Watchdog.report(0.0 if soonest is None else time.time() + soonest - time.monotonic())

    def _run(self) -> None:
        while True:
            time.sleep(TICK)
            now = time.monotonic()
            with self._lock:
                late = [handle for deadline, _, handle in self._held.values() if deadline <= now]
                for handle in late:
                    del self._held[id(handle)]
            for handle in late:
                with contextlib.suppress(Exception):  # the queue is unreachable: its own timeout will do it
                    self.queue.release(handle, 0.0)
