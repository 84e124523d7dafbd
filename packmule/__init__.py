"""packmule: run an object's methods as parallel jobs, on one laptop or a whole
cluster, and follow each run by name: its progress, its return value, its failures.

>>> class Sleepy(packmule.Runner):
...     def run(self, n):
...         return self.deferred_result("total", self.enqueue_each("nap", range(n)))
...     def nap(self, i): return i
...     def total(self, values): return sum(values)
"""

from typing import TYPE_CHECKING

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
from packmule._driver import dashboard as _dashboard

if TYPE_CHECKING:
    from packmule._driver.runner import Runner
    from packmule.backends.base import Backend as _Backend

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
    "cron",
    "current_tick",
    "every",
    "run_schedules",
]


def __getattr__(name: str) -> object:
    """``packmule.Runner``, imported when first asked for: a process that never
    drives a run (``packmule worker``'s supervisor, ``packmule status``'s parser)
    need not load the driver, its pickler and its backends."""
    if name == "Runner":
        # (here, not at the top: the driver is 60 modules, about 8 MiB and 25 ms, that `packmule worker`'s
        # supervisor never uses; bench_memory.py measures it)
        from packmule._driver.runner import Runner

        globals()["Runner"] = Runner
        return Runner
    if name in ("every", "cron"):
        from packmule._model import schedule

        globals().update(every=schedule.every, cron=schedule.cron)
        return globals()[name]
    if name == "run_schedules":
        from packmule.scheduling.faces import run_schedules

        globals()["run_schedules"] = run_schedules
        return run_schedules
    if name == "current_tick":
        from packmule._model.scheduled import current_tick

        globals()["current_tick"] = current_tick
        return current_tick
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# The one place that wires a face into the core: a driver asked to serve the
# dashboard (PACKMULE_DASHBOARD_PORT) serves packmule.web through this hook, so
# the driver never imports the web face.
def _web_serve() -> _dashboard.Serve:
    import packmule.web  # (here, not at the top: the web extra is optional, and only a run that asks needs it)
    from packmule._driver.watcher import Watcher  # (here: as above, only a run that serves a dashboard reads it)

    def serve(host: str, port: int, backend: "_Backend") -> str:  # (a name for type checkers only)
        return packmule.web.serve(host, port, watcher=Watcher(backend), background=True)

    return serve


_dashboard.install(_web_serve)
