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
from packmule._driver import dashboard as _dashboard
from packmule._driver.runner import Runner
from packmule._driver.watcher import Watcher as _Watcher
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
]


# The one place that wires a face into the core: a driver asked to serve the
# dashboard (PACKMULE_DASHBOARD_PORT) serves packmule.web through this hook, so
# the driver never imports the web face.
def _web_serve() -> _dashboard.Serve:
    import packmule.web  # (here, not at the top: the web extra is optional, and only a run that asks needs it)

    def serve(host: str, port: int, backend: _Backend) -> str:
        return packmule.web.serve(host, port, watcher=_Watcher(backend), background=True)

    return serve


_dashboard.install(_web_serve)
