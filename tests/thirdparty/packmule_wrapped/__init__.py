"""A packmule backend that hands everything to the local backend.

It is the third party of the conformance suite's own check: registered under
the ``packmule.backends`` entry point group as ``wrapped``, it starts its own
workers (through the local backend's ``ensure_workers``), so running
``PACKMULE_CONFORMANCE_BACKENDS=wrapped python -m pytest --pyargs packmule.conformance``
needs nothing else.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

from packmule.backends.base import Backend
from packmule.backends.local import LocalBackend


class WrappedBackend(Backend):
    name = "wrapped"

    def __init__(self, inner: Backend | None = None) -> None:
        self.inner = inner if inner is not None else LocalBackend(workers=2)
        self.queue, self.store = self.inner.queue, self.inner.store
        self.ledger = self.inner.ledger  # (without it: a backend that cannot run schedules)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        # at least two workers, so that a job can move from one worker to another
        return cls(LocalBackend.from_env({"PACKMULE_WORKERS": "2", **env}))

    def secret(self) -> bytes:
        return self.inner.secret()

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return self.inner.lock(name, timeout)

    def ensure_workers(self) -> None:
        self.inner.ensure_workers()

    def close(self) -> None:
        self.inner.close()
