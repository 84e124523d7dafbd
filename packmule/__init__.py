"""packmule: run an object's methods as parallel jobs, on one laptop or a whole
cluster, and follow each run by name: its progress, its return value, its failures.

>>> class Sleepy(packmule.Runner):
...     def run(self, n):
...         return self.deferred_result("total", self.enqueue_each("nap", range(n)))
...     def nap(self, i): return i
...     def total(self, values): return sum(values)
"""

from packmule._core.errors import (
    BackendUnavailable,
    Cancelled,
    JobFailed,
    NotReady,
    NoWorkers,
    PackMuleError,
    RunStateLost,
    SecretMismatch,
    ValuesNotRecorded,
)
from packmule._core.types import JobRef, Progress
from packmule._driver.runner import Runner

__all__ = [
    "BackendUnavailable",
    "Cancelled",
    "JobFailed",
    "JobRef",
    "NoWorkers",
    "NotReady",
    "PackMuleError",
    "Progress",
    "Runner",
    "RunStateLost",
    "SecretMismatch",
    "ValuesNotRecorded",
]
