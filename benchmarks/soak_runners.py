"""The runners of ``benchmarks/soak.py``, in an importable module: local workers
and ``packmule worker`` processes load them by reference (the repository root is
on their PYTHONPATH).

Each method is deterministic in its arguments, so the driver computes every
run's value and counts on its own (``expected_*`` functions below).  Files that
jobs write live in the runner's ``scratch`` directory, shared by every process
on this machine.
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from typing import Any

import packmule

BIG = 5_000_000  # bytes: the size of a big argument and of a big value


def big_blob(seed: int) -> bytes:
    """BIG bytes that depend on ``seed`` (so a mixed-up value shows)."""
    return random.Random(seed).randbytes(BIG)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leaf_value(i: int, j: int) -> int:
    return (i * 1009 + j) ** 2 % 1_000_003


def note(path: str, text: str) -> int:
    """Append a line to ``path`` (one write with O_APPEND) and return how many lines it has now."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (text + "\n").encode())
    finally:
        os.close(fd)
    with open(path) as f:
        return sum(1 for _ in f)


class Soak(packmule.Runner):
    """Every kind of run of the soak.  ``scratch`` (a directory) is set by the driver."""

    record_return_values = True
    retry_delay = 0.1
    time_to_run = 30.0
    max_crashes = 1000  # the chaos thread kills workers at random: the deaths are not the jobs' fault
    scratch = ""

    # --- two-level fan-out: root -> branches -> leaves; sums come back up -------------
    def tree(self, width: int, depth2: int) -> Any:
        return self.deferred_result("total", self.enqueue_each("branch", range(width), depth2))

    def branch(self, i: int, depth2: int) -> Any:
        return self.deferred_result("total", self.enqueue_each("leaf", range(depth2), i))

    def leaf(self, j: int, i: int) -> int:
        return leaf_value(i, j)

    def total(self, values: list[int]) -> int:
        return sum(values)

    # --- the same tree with values not recorded: the root writes its sum to a file ----
    def tree_to_file(self, width: int, depth2: int) -> Any:
        return self.deferred_result("write_total", self.enqueue_each("branch", range(width), depth2))

    def write_total(self, values: list[int]) -> None:
        path = os.path.join(self.scratch, f"{self.name}.result")
        tmp = f"{path}.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(str(sum(values)))
        os.replace(tmp, path)

    # --- leaves that fail a planned number of times, then succeed ------------------------
    def retried(self, n: int, fails: int) -> Any:
        return self.deferred_result("total", self.enqueue_each("flaky", range(n), fails))

    def flaky(self, i: int, fails: int) -> int:
        attempts = note(os.path.join(self.scratch, f"{self.name}.{i}.tries"), str(os.getpid()))
        if attempts <= fails:
            raise RuntimeError(f"planned failure {attempts} of {fails} (item {i})")
        return leaf_value(i, fails)

    # --- some leaves fail for good: the root fails by its input ---------------------------
    def doomed(self, n: int, bad: list[int]) -> Any:
        return self.deferred_result("total", self.enqueue_each("maybe_fail", range(n), bad))

    def maybe_fail(self, i: int, bad: list[int]) -> int:
        if i in bad:
            raise ValueError(f"planned for good: item {i}")
        return leaf_value(i, 0)

    # --- slow leaves ------------------------------------------------------------------------
    def slow(self, naps: list[float]) -> Any:
        return self.deferred_result("total", self.enqueue_each("nap", range(len(naps)), naps))

    def nap(self, i: int, naps: list[float]) -> int:
        time.sleep(naps[i])
        return leaf_value(i, 7)

    # --- 5 MB arguments (made inside the root job) and 5 MB values -----------------------
    def big(self, seeds: list[int]) -> Any:
        return self.deferred_result("digests", [self.enqueue("echo", big_blob(s)) for s in seeds])

    def echo(self, data: bytes) -> bytes:
        return data[::-1]

    def digests(self, values: list[bytes]) -> list[tuple[int, str]]:
        return [(len(v), digest(v)) for v in values]

    # --- the driver's own fan-in: a blocking deferred_result --------------------------------
    def square(self, i: int) -> int:
        return leaf_value(i, 3)


def expected_tree(width: int, depth2: int) -> int:
    return sum(leaf_value(i, j) for i in range(width) for j in range(depth2))


def expected_big(seeds: list[int]) -> list[tuple[int, str]]:
    return [(BIG, digest(big_blob(s)[::-1])) for s in seeds]
