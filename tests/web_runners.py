"""Runners the dashboard's tests, screenshot and benchmarks run.  They live in
an importable module (``tests.web_runners``: the repository root is on the
workers' path) so that workers of any backend load them by reference."""

from __future__ import annotations

import os
import time
from typing import Any

import packmule

GATE_LIMIT = 60.0  # s a gated job waits for its gate before it fails


class Gated(packmule.Runner):
    """Jobs that hold until a file exists: a test decides when a run moves."""

    record_return_values = True
    max_retries = 0

    def held(self, i: int, gate: str) -> int:
        deadline = time.monotonic() + GATE_LIMIT
        while not os.path.exists(gate):
            if time.monotonic() > deadline:
                raise TimeoutError(f"gate {gate} was not opened within {GATE_LIMIT:g} s")
            time.sleep(0.02)
        return i

    def nap(self, i: int, seconds: float) -> int:
        time.sleep(seconds)
        return i

    def fails_if_odd(self, i: int) -> int:
        if i % 2:
            raise ValueError(f"odd item {i} refused")
        return i

    def noop(self, i: int) -> int:
        return i

    def total(self, values: list[Any]) -> int:
        return sum(v for v in values if isinstance(v, int))
