"""Configuration: every environment variable packmule reads, read here, only when
a backend is built (never at import time).

=====================  ==========================================================
PACKMULE_BACKEND       ``local`` (default) or ``beanstalk``, or any name registered
                       under the ``packmule.backends`` entry point group
PACKMULE_WORKERS       local: worker processes to start (default: CPU count)
PACKMULE_BEANSTALKD    beanstalk: ``host:port,host:port`` (default 127.0.0.1:11300)
PACKMULE_MEMCACHED     beanstalk: ``host:port,...`` (default 127.0.0.1:11211)
PACKMULE_ZOOKEEPER     beanstalk: ``host:port,...`` (default 127.0.0.1:2181)
PACKMULE_TUBE          beanstalk: the tube jobs go to (default ``packmule``)
PACKMULE_SECRET        beanstalk: the HMAC key every process shares
PACKMULE_INSECURE      beanstalk: ``1`` to run without a secret on private servers
PACKMULE_STATE_TTL     seconds a run's state is kept in the store (default 7 days)
PACKMULE_MAX_PAYLOAD   bytes: the largest pickled argument list, runner or return value
                       packmule carries, on every backend alike (default 32 MiB)
PACKMULE_DELAY_SCALE   a factor on the delays packmule picks itself: retry backoff, a
                       continuation's re-check of its inputs, a wait's poll interval
                       (default 1; ``packmule.testing`` sets 0.001 so tests never wait)
PACKMULE_DASHBOARD_TOKEN  the token every request to the dashboard (``packmule.web``) must
                       carry; required to serve it on an address other than loopback
PACKMULE_DASHBOARD_PORT   a driver process serves the dashboard on this loopback port from
                       its first run on (the local backend's runs are visible only there)
=====================  ==========================================================
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packmule.backends.base import Backend

DEFAULT_BACKEND = "local"
DEFAULT_STATE_TTL = 7 * 24 * 3600.0  # memcached caps relative expiry at 30 days
ENTRY_POINT_GROUP = "packmule.backends"
DEFAULT_MAX_PAYLOAD = 32 * 1024 * 1024  # bytes: fits a default memcached (64 MB) with room to spare
DELAY_SCALE_VAR = "PACKMULE_DELAY_SCALE"

_cache: dict[tuple[str, tuple[tuple[str, str], ...]], Backend] = {}
_cache_lock = threading.Lock()


def _after_fork_in_child() -> None:
    """A fork child keeps the cached backends (a Runner made before the fork
    holds its backend anyway: each backend makes the child connections of its
    own), but not the lock, which a thread of the parent may have held."""
    global _cache_lock
    _cache_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)


def state_ttl(env: Mapping[str, str] | None = None) -> float:
    env = os.environ if env is None else env
    raw = env.get("PACKMULE_STATE_TTL", "")
    try:
        return float(raw) if raw else DEFAULT_STATE_TTL
    except ValueError:
        raise ValueError(f"PACKMULE_STATE_TTL={raw!r} is not a number of seconds") from None


def max_payload(env: Mapping[str, str] | None = None) -> int:
    """The largest payload (pickled arguments of one job, a runner, a return
    value) packmule carries: the same on every backend, so code that works on
    one works on all.  Larger ones are refused at the call (or fail the job)."""
    env = os.environ if env is None else env
    raw = env.get("PACKMULE_MAX_PAYLOAD", "")
    if not raw:
        return DEFAULT_MAX_PAYLOAD
    if not raw.isdigit() or int(raw) < 1024:
        raise ValueError(f"PACKMULE_MAX_PAYLOAD={raw!r}: give a whole number of bytes >= 1024")
    return int(raw)


def spill_above(env: Mapping[str, str] | None = None) -> int | None:
    """``PACKMULE_SPILL_ABOVE``: a payload (queue body, stored value) over this many
    bytes goes to the store in chunks even where the backend could hold it whole
    (a memcached started with a small ``-I``; the conformance suite sets it so the
    chunked path runs on every backend).  None: only over the backend's own limits."""
    raw = (os.environ if env is None else env).get("PACKMULE_SPILL_ABOVE", "")
    if not raw:
        return None
    if not raw.isdigit() or int(raw) < 1024:
        raise ValueError(f"PACKMULE_SPILL_ABOVE={raw!r}: give a whole number of bytes >= 1024")
    return int(raw)


def delay_scale(env: Mapping[str, str] | None = None) -> float:
    """``PACKMULE_DELAY_SCALE``: the factor on retry backoff and poll delays (1
    unless set; ``packmule.testing`` sets it for its workers and the test)."""
    env = os.environ if env is None else env
    raw = env.get(DELAY_SCALE_VAR, "")
    try:
        scale = float(raw) if raw else 1.0
    except ValueError:
        scale = -1.0
    if not 0 <= scale <= 1:
        raise ValueError(f"{DELAY_SCALE_VAR}={raw!r}: give a factor from 0 to 1 (1: delays as documented)")
    return scale


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


def backend_class(name: str) -> type[Backend]:
    """The backend class registered under ``name`` in the entry point group."""
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
    from packmule.backends.base import Backend

    if isinstance(spec, Backend):
        return spec
    scoped = _scope.backend if _scope is not None else None
    if scoped is not None and spec in (None, scoped.name):
        return scoped
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"backend= takes a Backend or a backend name, not {type(spec).__name__}")
    env = dict(os.environ)
    name = spec or env.get("PACKMULE_BACKEND") or DEFAULT_BACKEND
    settings = tuple(sorted((k, v) for k, v in env.items() if k.startswith("PACKMULE_")))
    key = (name, settings)
    with _cache_lock:
        backend = _cache.get(key)
        if backend is None:
            backend = backend_class(name).from_env(env)
            _cache[key] = backend
        return backend


def forget_backends() -> None:
    """Close and drop every cached backend (tests; after fork)."""
    with _cache_lock:
        backends = list(_cache.values())
        _cache.clear()
    for backend in backends:
        backend.close()


def split_servers(value: str, variable: str) -> list[tuple[str, int]]:
    """``'h1:p1,h2:p2'`` -> ``[('h1', p1), ('h2', p2)]``, or a ValueError naming the variable."""
    servers = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{variable}={value!r}: {part!r} is not host:port")
        servers.append((host, int(port)))
    if not servers:
        raise ValueError(f"{variable} is empty; give host:port[,host:port...]")
    return servers


def dashboard_token(env: Mapping[str, str] | None = None) -> str | None:
    """``PACKMULE_DASHBOARD_TOKEN``, or None when unset or empty."""
    env = os.environ if env is None else env
    return env.get("PACKMULE_DASHBOARD_TOKEN") or None


def dashboard_port(env: Mapping[str, str] | None = None) -> int | None:
    """``PACKMULE_DASHBOARD_PORT``: the port a driver serves the dashboard on, or None when unset."""
    env = os.environ if env is None else env
    raw = env.get("PACKMULE_DASHBOARD_PORT", "")
    if not raw:
        return None
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise ValueError(f"PACKMULE_DASHBOARD_PORT={raw!r}: give a TCP port number from 1 to 65535")
    return int(raw)
