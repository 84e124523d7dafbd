"""Runners the conformance suite runs.  They live in an importable module so
that workers of any backend can load them by reference."""

from __future__ import annotations

import os
import random
import time
from typing import Any

import packmule

WAIT_LIMIT = 15.0  # s a blocking deferred_result of the suite waits: a broken backend fails, not hangs


def note(path: str, text: str) -> None:
    """Append a line to a file: how tests see what jobs did, from any process."""
    with open(path, "a") as f:
        f.write(text + "\n")


def lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return f.read().split()
    except FileNotFoundError:
        return []


class SleepyRunner(packmule.Runner):
    """The seed's example, with naps of 0 or 0.02 s."""

    wait_timeout = WAIT_LIMIT
    record_return_values = True

    def run_async(self, nap_count: int = 100) -> packmule.JobRef:
        return self.enqueue("run", nap_count)

    def run(self, nap_count: int = 100) -> Any:
        jobs = [self.enqueue("snooze", random.randint(0, 1)) for _ in range(nap_count)]
        return self.deferred_result("wakeup", jobs)

    def wakeup(self, durations: list[int]) -> int:
        return sum(durations)

    def snooze(self, duration: int) -> int:
        time.sleep(duration * 0.02)
        return duration


class Tree(packmule.Runner):
    """Fan-outs nested two levels deep: values come back in order."""

    wait_timeout = WAIT_LIMIT
    record_return_values = True

    def root(self, width: int) -> Any:
        return self.deferred_result("collect", self.enqueue_each("branch", range(width), width))

    def branch(self, i: int, width: int) -> Any:
        return self.deferred_result("collect", self.enqueue_each("leaf", range(width), i))

    def leaf(self, j: int, i: int) -> str:
        return f"{i}.{j}"

    def collect(self, values: list[Any]) -> list[Any]:
        return values

    def empty(self) -> Any:
        return self.deferred_result("collect", [])

    def ident(self, x: Any) -> Any:
        return x

    def modules_loaded(self, names: list[str]) -> list[str]:
        """Which of ``names`` this worker process has imported."""
        import sys

        return [name for name in names if name in sys.modules]

    def side_continuation(self, path: str) -> str:
        self.deferred_result("mark", [self.enqueue("ident", 1)], path)
        return "returned first"

    def mark(self, values: list[Any], path: str) -> None:
        note(path, f"mark{values[0]}")

    def return_child(self) -> packmule.JobRef:
        return self.enqueue("ident", "child value")

    def fan_of(self, values: list[Any]) -> Any:
        """A continuation over one child per value: its values in the list's order."""
        return self.deferred_result("collect", self.enqueue_each("ident", values))


class Flaky(packmule.Runner):
    """Jobs that fail: a number of times, or always."""

    wait_timeout = WAIT_LIMIT
    record_return_values = True
    retry_delay = 0.0

    def fail_times(self, path: str, times: int) -> str:
        note(path, "try")
        if len(lines(path)) <= times:
            raise RuntimeError(f"planned failure {len(lines(path))}")
        return "recovered"

    def always(self, tag: str) -> None:
        raise ValueError(f"always fails: {tag}")

    def ok(self, x: Any) -> Any:
        return x

    def parent(self, tags: list[str]) -> Any:
        jobs = [self.enqueue("always" if t.startswith("bad") else "ok", t) for t in tags]
        return self.deferred_result("collect", jobs)

    def grandparent(self) -> Any:
        return self.deferred_result("collect", [self.enqueue("parent", ["fine", "bad-deep"])])

    def collect(self, values: list[Any]) -> list[Any]:
        return values


class Worky(packmule.Runner):
    """Jobs that leave traces in files: which process ran them, how often."""

    wait_timeout = WAIT_LIMIT
    record_return_values = True

    def pid_then_sleep(self, path: str, seconds: float, value: Any = None) -> Any:
        note(path, str(os.getpid()))
        time.sleep(seconds)
        return value

    def sleeper_fan(self, path: str, n: int, seconds: float) -> Any:
        jobs = self.enqueue_each("pid_then_sleep_item", range(n), path=path, seconds=seconds)
        return self.deferred_result("total", jobs)

    def pid_then_sleep_item(self, i: int, path: str, seconds: float) -> int:
        note(path, str(os.getpid()))
        time.sleep(seconds)
        return i

    def stamp_then_sleep(self, i: int, path: str, seconds: float) -> int:
        note(path, repr(time.monotonic()))  # one clock for every process of this machine
        time.sleep(seconds)
        return i

    def enqueue_then_slow_once(self, path: str, width: int, seconds: float) -> Any:
        """Enqueue ``width`` children; the first execution then sleeps ``seconds``
        (past time_to_run, so the job runs again), later ones return at once."""
        first = not lines(path)
        note(path, "start")
        jobs = self.enqueue_each("item", range(width))
        if first:
            time.sleep(seconds)
        note(path, "end")
        return self.deferred_result("total", jobs)

    def item(self, i: int) -> int:
        return i

    def total(self, values: list[int]) -> int:
        return sum(values)

    def collect(self, values: list[Any]) -> list[Any]:
        return values

    def touching(self, path: str, seconds: float, step: float) -> str:
        note(path, "run")
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            time.sleep(step)
            self.touch()
        return "touched"

    def locked_increment(self, i: int, path: str) -> int:
        with self.lock("conformance-counter", timeout=60):
            value = int(lines(path)[-1]) if lines(path) else 0
            time.sleep(0.001)
            with open(path, "w") as f:
                f.write(f"{value + 1}\n")
        return i

    def incr_noop(self, i: int) -> int:
        return i

    def incr(self, i: int, key: str) -> int | None:
        return self.backend.store.incr_many({key: 1})[key]

    def add(self, i: int, key: str) -> bool:
        return key in self.backend.store.add_many({key: str(i).encode()}, 60)


_HOARD: list[bytes] = []  # memory a job keeps in its worker process


class Hog(packmule.Runner):
    wait_timeout = WAIT_LIMIT
    record_return_values = True

    def hog(self, mib: int) -> int:
        _HOARD.append(b"x" * (mib << 20))
        return os.getpid()

    def pid(self) -> int:
        return os.getpid()

    def first(self, values: list[int]) -> int:
        return values[0]


class Unpicklable:
    def __reduce__(self) -> Any:
        raise TypeError("this object refuses to be pickled")


class Plain(packmule.Runner):
    wait_timeout = WAIT_LIMIT

    def work(self, x: Any = None) -> Any:
        return x


class Gated(packmule.Runner):
    """Jobs that wait for a file to exist (a test opens the gate when it has
    done what it must do while they are queued or running)."""

    def wait_for(self, i: int, gate: str) -> int:
        deadline = time.monotonic() + 120
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate {gate} was not opened within 120 s")
            time.sleep(0.02)
        return i

    def collect(self, values: list[Any]) -> list[Any]:
        return values


class Timed(packmule.Runner):
    """Jobs that note when they started (``time.time()``: one clock for every
    process of this machine), for the tests of delays and priorities."""

    wait_timeout = WAIT_LIMIT
    record_return_values = True

    def stamp(self, path: str, tag: str) -> str:
        note(path, f"{tag}@{time.time():.6f}")
        return tag

    def hold(self, started: str, gate: str) -> str:
        """Note that it runs, then keep its worker busy until ``gate`` exists."""
        note(started, str(os.getpid()))
        deadline = time.monotonic() + 120
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the gate {gate} was not opened within 120 s")
            time.sleep(0.02)
        return "held"

    def echo(self, *args: Any, **kwargs: Any) -> Any:
        return [list(args), kwargs]


def stamps(path: str) -> list[tuple[str, float]]:
    """What ``Timed.stamp`` noted: (tag, start time), in the order noted."""
    return [(tag, float(at)) for tag, _, at in (line.partition("@") for line in lines(path))]
