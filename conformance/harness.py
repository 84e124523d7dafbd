"""Harnesses: a backend with workers serving it, for the conformance suite.

A harness yields a :class:`Harness`; the suite reaches the backend only through
``harness.backend`` (the interface) and packmule's public API.  A third party
adds theirs with ``register('name', factory)`` in a ``conftest.py``, then runs
``pytest --pyargs packmule.conformance --backends name``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil
from packmule.backends.base import Backend


@dataclass
class Harness:
    backend: Backend
    env: dict[str, str] = field(default_factory=dict)  # what another process needs to reach the backend
    pids: Callable[[], list[int]] = list  # processes that run jobs now

    def worker_pids(self) -> list[int]:
        return self.pids()


Factory = Callable[[], contextlib.AbstractContextManager[Harness]]
HARNESSES: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    HARNESSES[name] = factory


@contextlib.contextmanager
def local_harness() -> Iterator[Harness]:
    from packmule.backends.local import ADDRESS_VAR, SECRET_VAR, LocalBackend

    backend = LocalBackend(workers=2)
    backend.ensure_workers()
    env = {"PACKMULE_BACKEND": "local", ADDRESS_VAR: backend.address, SECRET_VAR: backend.secret().hex()}
    try:
        yield Harness(backend, env, backend.worker_pids)
    finally:
        backend.close()


register("local", local_harness)


def job_processes(parents: list[int]) -> list[int]:
    """PIDs of the processes under these parents (a worker's pool)."""
    out = []
    for pid in parents:
        with contextlib.suppress(psutil.NoSuchProcess):
            out += [c.pid for c in psutil.Process(pid).children(recursive=True)]
    return out


def environ_for(harness: Harness) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    env.update(harness.env)
    return env
