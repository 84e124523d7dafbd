"""packmule's exceptions: one root, so ``except packmule.PackMuleError`` catches them all.

    PackMuleError
    ├── JobFailed            a job (or an input of a deferred_result) failed for good
    ├── NotReady             the run or job has no value yet
    ├── NoWorkers            nothing serves the queue that a wait depends on
    │   └── SecretMismatch   workers refuse the jobs: they have another PACKMULE_SECRET
    ├── RunStateLost         the store lost the run's state (restart, eviction, forget)
    ├── Cancelled            the run was cancelled
    ├── ValuesNotRecorded    values were not kept (record_return_values=False)
    └── BackendUnavailable   a server cannot be reached; names the server and the setting

Bad arguments raise ``ValueError``/``TypeError`` as Python users expect.  Errors
of greenstalk, memcached, kazoo and multiprocessing are translated into these at
the backend boundary.
"""

from __future__ import annotations

__all__ = ["BackendUnavailable", "Cancelled", "JobFailed", "NoWorkers", "NotReady", "PackMuleError", "RunStateLost",
           "SecretMismatch", "ValuesNotRecorded"]


class PackMuleError(Exception):
    """The root of every error packmule raises on its own account."""


class JobFailed(PackMuleError):
    """A job failed for good.

    ``method``, ``args`` (a repr), ``exc_type``, ``message`` and ``traceback``
    (the remote traceback text) describe the original failure, even when it
    reached this job through the inputs of a deferred_result.
    """

    def __init__(self, info: dict[str, str], via: str | None = None) -> None:
        self.info = dict(info)
        self.method = info.get("method", "?")
        self.args_repr = info.get("args", "")
        self.exc_type = info.get("exc_type", "?")
        self.message = info.get("message", "")
        self.traceback = info.get("traceback", "")
        self.job = info.get("job", "")
        head = f"job {self.job} {self.method}({self.args_repr}) failed: {self.exc_type}: {self.message}"
        if via:
            head = f"{via}\n  caused by {head}"
        super().__init__(f"{head}\n--- remote traceback ---\n{self.traceback}".rstrip())


class NotReady(PackMuleError):
    """The value asked for does not exist yet (the run or job is not complete)."""


class NoWorkers(PackMuleError):
    """A wait depends on a queue that no worker serves."""


class SecretMismatch(NoWorkers):
    """Workers refused this process's jobs for their signature: they were signed
    with another ``PACKMULE_SECRET``."""


class RunStateLost(PackMuleError):
    """The run's stored state vanished (store restarted, evicted, or forgotten)."""


class Cancelled(PackMuleError):
    """The run was cancelled; its unstarted jobs were dropped."""


class ValuesNotRecorded(PackMuleError):
    """Return values were not recorded (``record_return_values=False``)."""


class BackendUnavailable(PackMuleError):
    """A server cannot be reached.  The message names the server and the setting that chose it;
    ``server`` is its ``'host:port'`` when the error is about one server."""

    def __init__(self, *args: object, server: str | None = None) -> None:
        super().__init__(*args)
        self.server = server

    def __reduce__(self) -> tuple[object, ...]:
        return _unavailable, (self.args, self.server)


def _unavailable(args: tuple[object, ...], server: str | None) -> BackendUnavailable:
    return BackendUnavailable(*args, server=server)
