"""The jobs of the issue-18 benchmarks, and what their driver processes read of packmule.

Imported by the driver processes and the workers (by reference, as
``benchmarks._jobs``), which run a contender's staged packmule; only public API,
and private names only where a figure needs them, each with a fallback.
"""

from __future__ import annotations

import os
import time
from typing import Any

import packmule

__all__ = ["Bench", "coordinator_pid", "count_local_requests", "round_trip", "round_trip_on_a_made_run"]


class Bench(packmule.Runner):
    record_return_values = True

    def noop(self, x: Any = None) -> Any:
        return x

    def nap(self, seconds: float) -> float:
        """Sleep, then return when this job's body ended (time.time())."""
        time.sleep(seconds)
        return time.time()

    def collect(self, values: list[Any]) -> list[Any]:
        return values

    def count(self, values: list[Any]) -> int:
        return len(values)


def round_trip(i: int) -> float:
    """One job's round trip on a fresh run: enqueue one no-op job, block on deferred_result of it."""
    runner = Bench(f"rt-{os.getpid()}-{time.monotonic_ns()}-{i}")
    start = time.perf_counter()
    ref = runner.enqueue("noop", i)
    assert runner.deferred_result("collect", [ref]) == [i]
    return time.perf_counter() - start


_KEPT: list[Bench] = []


def round_trip_on_a_made_run(i: int) -> float:
    """``round_trip``'s job on a run made before (its state in the store already):
    what a round trip costs without making the run by name."""
    if not _KEPT:
        runner = Bench(f"rt-made-{os.getpid()}-{time.monotonic_ns()}")
        assert runner.deferred_result("collect", [runner.enqueue("noop", -1)]) == [-1]
        _KEPT.append(runner)
    runner = _KEPT[0]
    start = time.perf_counter()
    ref = runner.enqueue("noop", i)
    assert runner.deferred_result("collect", [ref]) == [i]
    return time.perf_counter() - start


REQUESTS = [0]


def count_local_requests() -> bool:
    """Count each request this process sends to the local coordinator in ``REQUESTS[0]``
    (wrapping ``LocalClient``'s senders); False where this packmule has no such client."""
    try:
        from packmule.backends.local import client
    except ImportError:
        return False
    cls = getattr(client, "LocalClient", None)
    names = [n for n in ("_call", "_post", "_start") if cls is not None and hasattr(cls, n)]
    if not names:
        return False
    for name in names:
        setattr(cls, name, _counted(getattr(cls, name)))
    return True


def _counted(inner: Any) -> Any:
    def counted(self: Any, *args: Any, **kw: Any) -> Any:
        REQUESTS[0] += 1
        return inner(self, *args, **kw)
    return counted


def coordinator_pid(backend: Any) -> int | None:
    """The local backend's coordinator process, or None."""
    proc = getattr(backend, "_coordinator", None)
    pid = getattr(proc, "pid", None)
    if pid is not None:
        return int(pid)
    import psutil

    workers = set(backend.worker_pids())
    others = [c.pid for c in psutil.Process().children() if c.pid not in workers]
    return others[0] if len(others) == 1 else None
