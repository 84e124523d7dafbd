"""Runners that misbehave on purpose, for the fault tests: values that cannot be
stored, jobs that kill their worker, big payloads.  Importable by workers."""

from __future__ import annotations

import os
import signal
import threading
from typing import Any

import packmule
from packmule import _engine

from .runners import lines, note


class Faulty(packmule.Runner):
    record_return_values = True
    retry_delay = 0.05

    def fine(self, x: Any, *_: Any) -> Any:
        return x

    def returns_lock(self) -> Any:
        return threading.Lock()

    def returns_generator(self) -> Any:
        return (i for i in range(3))

    def big_value(self, size: int) -> bytes:
        return b"v" * size

    def measure(self, data: bytes) -> int:
        return len(data)

    def exits(self, path: str) -> None:
        """Kills its worker process, every time."""
        note(path, str(os.getpid()))
        os._exit(1)

    def exits_if(self, i: int, bad: int, path: str) -> int:
        if i == bad:
            note(path, str(os.getpid()))
            os._exit(1)
        return i

    def exits_first_time(self, path: str) -> str:
        if not lines(path):
            note(path, str(os.getpid()))
            os.kill(os.getpid(), signal.SIGKILL)
        return "second life"

    def fan(self, width: int, path: str) -> Any:
        jobs = [self.enqueue("dies_after_commit_write" if i == 1 else "fine", i, path) for i in range(width)]
        return self.deferred_result("total", jobs)

    def total(self, values: list[Any]) -> int:
        return sum(values)

    def hands_off(self, width: int, path: str) -> Any:
        return self.deferred_result("total_then_die", [self.enqueue("fine", i) for i in range(width)], path)

    def total_then_die(self, values: list[Any], path: str) -> int:
        """A continuation whose worker is killed once, right after its commit
        counted it (and the job that returned it) done."""
        if not lines(path):
            note(path, str(os.getpid()))
            _engine.FAULTS["after_counts"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return sum(values)

    def dies_after_commit_write(self, x: int, path: str) -> int:
        """Returns, then has its worker killed between the commit's first store
        write (the value) and its second (the counts), once."""
        if not lines(path):
            note(path, str(os.getpid()))
            _engine.FAULTS["after_add"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return x
