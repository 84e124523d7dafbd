"""Runners that misbehave on purpose, for the fault tests: values that cannot be
stored, jobs that kill their worker, big payloads.  Importable by workers."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

import packmule
from packmule._model import job as _job

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

    def fan(self, width: int, path: str, point: str = "after_add") -> Any:
        """``width`` inputs of a continuation; the second one's worker dies in
        its commit.  With a width of 1, its count always completes the continuation's."""
        dies = min(1, width - 1)  # the second, or the only one
        jobs = [self.enqueue("noted", i, path + ".ok") for i in range(width) if i != dies]
        jobs.insert(dies, self.enqueue("dies_in_commit", dies, path, point, path + ".ok", width - 1))
        return self.deferred_result("total", jobs)

    def counted_late(self, x: int, seconds: float) -> int:
        """Returns ``x``; its worker counts it done ``seconds`` after storing its value."""
        _job.FAULTS["after_add"] = lambda: time.sleep(seconds)
        return x

    def paused_after_add(self, x: int, path: str, go: str) -> int:
        """Returns ``x``; its worker then waits in the commit after storing the
        value, before counting it done (a line in ``path``.paused says so), until
        the file ``go`` exists (20 s at most)."""
        _job.FAULTS["after_add"] = lambda: _pause(path + ".paused", go, 20)
        return x

    def killed_after_add(self, x: int, path: str) -> int:
        """Returns ``x``; the first time, its worker is killed after storing the
        value, before counting it done."""
        if not lines(path):
            note(path, str(os.getpid()))
            _job.FAULTS["after_add"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return x

    def fails_listed_late(self, seconds: float) -> None:
        """Fails (for good with max_retries=0); its worker pauses ``seconds`` after
        the commit's counts, before the commit ends."""
        _job.FAULTS["after_counts"] = lambda: time.sleep(seconds)
        raise ValueError("listed late")

    def noted(self, x: int, path: str) -> int:
        note(path, str(x))
        return x

    def total(self, values: list[Any]) -> int:
        return sum(values)

    def hands_off(self, width: int, path: str) -> Any:
        return self.deferred_result("total_then_die", [self.enqueue("fine", i) for i in range(width)], path)

    def total_then_die(self, values: list[Any], path: str) -> int:
        """A continuation whose worker is killed once, right after its commit
        counted it (and the job that returned it) done."""
        if not lines(path):
            note(path, str(os.getpid()))
            _job.FAULTS["after_counts"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return sum(values)

    def dies_in_commit(self, x: int, path: str, point: str, others: str, count: int) -> int:
        """Returns, then has its worker killed once in the commit: ``after_add``
        between its first store write (the value) and the counts; ``after_counts``
        after the counts, before the queue puts (so the continuation its count
        completed is never queued: it arrives last, once ``count`` others ran)."""
        if not lines(path):
            note(path, str(os.getpid()))
            deadline = time.monotonic() + 10
            while len(lines(others)) < count and time.monotonic() < deadline:
                time.sleep(0.01)
            time.sleep(0.3)  # (their commits)
            _job.FAULTS[point] = lambda: os.kill(os.getpid(), signal.SIGKILL)
        return x

    # --- a commit cut short, then its job run again (packmule._worker.recovery) ------------
    def enqueues_then_dies(self, width: int, path: str) -> int:
        """Queues ``width`` jobs and returns; the first time, its worker is killed
        in the commit right after the adds: the value and the commit marker are
        stored, but neither the job nor its children are counted yet."""
        if not lines(path):
            note(path, str(os.getpid()))
            _job.FAULTS["after_add"] = lambda: os.kill(os.getpid(), signal.SIGKILL)
        for i in range(width):
            self.enqueue("fine", i)
        return width

    def fan_busy(self, path: str, enqueues: bool, go: str = "") -> Any:
        """A continuation of one input whose commit is cut short after its count
        completed the continuation's, before it queued it (``counted_then_dies``).
        ``enqueues``: the input also queues a job (so it runs again when delivered again)."""
        return self.deferred_result("total", [self.enqueue("counted_then_dies", path, enqueues, go)])

    def counted_then_dies(self, path: str, enqueues: bool, go: str = "") -> int:
        """Returns 5; the first time, its worker is killed in the commit after the
        counts, before the queue puts; with ``go``, it waits there instead (a
        line in ``path``.paused says so) until the file ``go`` exists (20 s at most)."""
        if not lines(path):
            note(path, str(os.getpid()))
            _job.FAULTS["after_counts"] = (lambda: _pause(path + ".paused", go, 20)) if go else (
                lambda: os.kill(os.getpid(), signal.SIGKILL))
        if enqueues:
            self.enqueue("fine", 1)
        return 5

    def holds(self, started: str, release: str, seconds: float) -> str:
        """Runs until the file ``release`` exists (``seconds`` at most): a job that
        keeps the queue from being quiet."""
        note(started, str(os.getpid()))
        deadline = time.monotonic() + seconds
        while not os.path.exists(release) and time.monotonic() < deadline:
            time.sleep(0.05)
        return "released"

    def waits_then_hands_off(self, width: int, started: str, go: str) -> Any:
        """Says it started, waits for the file ``go`` (10 s at most), then returns
        a continuation of ``width`` jobs (its value is the continuation's)."""
        note(started, str(os.getpid()))
        deadline = time.monotonic() + 10
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.deferred_result("total", [self.enqueue("fine", i) for i in range(width)])


def _pause(path: str, go: str, seconds: float) -> None:
    """Say so in ``path``, then wait until the file ``go`` exists (``seconds`` at most)."""
    note(path, str(os.getpid()))
    deadline = time.monotonic() + seconds
    while not os.path.exists(go) and time.monotonic() < deadline:
        time.sleep(0.02)
