"""Which backend a process uses: ``get_backend(spec)`` builds the one a name
(or ``PACKMULE_BACKEND``, default ``local``) stands for, from the classes
registered under the ``packmule.backends`` entry point group, once per name and
settings per process; while a test of ``packmule.testing`` runs, its backend
(``Scope``).  The driver, the worker and the faces all choose a backend here;
the environment variables themselves are read in ``packmule._core.config``."""

from __future__ import annotations

import importlib
import os
import threading
from dataclasses import dataclass, field
from typing import Any

from packmule.backends.base import Backend

__all__ = ["DEFAULT_BACKEND", "ENTRY_POINT_GROUP", "Scope", "backend_class", "forget_backends", "get_backend",
           "entry_point_of", "note_run", "resolved", "set_scope"]

DEFAULT_BACKEND = "local"
ENTRY_POINT_GROUP = "packmule.backends"

_cache: dict[tuple[str, tuple[tuple[str, str], ...]], Backend] = {}
_cache_lock = threading.Lock()
_resolved: dict[str, type[Backend]] = {}  # name -> its class, read from the entry points by another process


def _after_fork_in_child() -> None:
    """A fork child keeps the cached backends (a Runner made before the fork
    holds its backend anyway: each backend makes the child connections of its
    own), but not the lock, which a thread of the parent may have held."""
    global _cache_lock
    _cache_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


@dataclass
class Scope:
    """What ``packmule.testing`` sets while a test runs: the backend that a
    Runner given no backend (or this backend's name) uses, or None to choose as
    usual; and the runs this process queued jobs into from outside any job, as
    (name, generation) pairs in the order they started."""

    backend: Backend | None
    runs: dict[tuple[str, str], None] = field(default_factory=dict)


_scope: Scope | None = None


def set_scope(scope: Scope | None) -> Scope | None:
    """Make ``scope`` the process's current one (None: none); returns the one it replaces."""
    global _scope
    previous, _scope = _scope, scope
    return previous


def note_run(name: str, gen: str) -> None:
    """Called by every outside enqueue: the current scope, if any, remembers the run."""
    scope = _scope
    if scope is not None:
        scope.runs.setdefault((name, gen))


def entry_point_of(cls: type[Backend]) -> str:
    """``cls`` as the entry point group names it: ``'module:Class'``."""
    return f"{cls.__module__}:{cls.__qualname__}"


def resolved(name: str, target: str) -> None:
    """Take ``target`` (``'module:Class'``, ``entry_point_of`` the class) as the
    class registered under ``name``, without reading the entry points: a
    ``packmule worker`` process whose supervisor read them.  (Reading them
    imports ``importlib.metadata``, about 0.6 MiB and 8 ms in every worker process.)"""
    module, _, qualname = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in qualname.split("."):
        obj = getattr(obj, part)
    if not (isinstance(obj, type) and issubclass(obj, Backend)):
        raise TypeError(f"{target} (backend {name!r}) is not a packmule Backend")
    _resolved[name] = obj


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name`` in the entry point group."""
    given = _resolved.get(name)
    if given is not None:
        return given
    from importlib.metadata import entry_points  # (here: its import costs every worker process 20 ms)

    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    for ep in found:
        cls: type[Backend] = ep.load()
        return cls
    known = sorted(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))
    raise ValueError(
        f"unknown packmule backend {name!r} (from PACKMULE_BACKEND or backend=); "
        f"installed backends: {', '.join(known) or 'none - is packmule installed (pip install -e .)?'}"
    )


def get_backend(spec: object = None) -> Backend:
    """The backend for ``spec``: a Backend object (returned as is), a name, or
    None for ``PACKMULE_BACKEND``.  One instance per name and settings per process;
    while a test of ``packmule.testing`` runs, the test's backend for None and its name."""
    if isinstance(spec, Backend):
        return spec
    scoped = _scope.backend if _scope is not None else None
    if scoped is not None and spec in (None, scoped.name):
        return scoped
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"backend= takes a Backend or a backend name, not {type(spec).__name__}")
    name = spec or os.environ.get("PACKMULE_BACKEND") or DEFAULT_BACKEND
    key = (name, _settings())
    with _cache_lock:
        backend = _cache.get(key)
        if backend is None:
            backend = backend_class(name).from_env(dict(os.environ))
            _cache[key] = backend
        return backend


def _settings() -> tuple[tuple[Any, Any], ...]:
    """The ``PACKMULE_*`` variables, as the key of a cached backend.  (On POSIX read
    from ``os.environ``'s bytes, undecoded: 3 us, where a ``dict(os.environ)`` takes 20
    on every enqueue and wait of a runner made without ``backend=``.)"""
    raw = getattr(os.environ, "_data", None) if os.name == "posix" else None  # (bytes -> bytes there)
    if isinstance(raw, dict):
        return tuple(sorted((k, v) for k, v in raw.items() if k.startswith(b"PACKMULE_")))
    return tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("PACKMULE_")))


def forget_backends() -> None:
    """Close and drop every cached backend (tests; after fork)."""
    with _cache_lock:
        backends = list(_cache.values())
        _cache.clear()
    for backend in backends:
        backend.close()
