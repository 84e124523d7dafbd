"""Harnesses: a backend with workers serving it, for the conformance suite.

A harness yields a :class:`Harness`; the suite reaches the backend only through
``harness.backend`` (the interface) and packmule's public API.  :func:`factory_for`
finds a backend's harness: one registered here, else one a package declares
under the ``packmule.conformance_harnesses`` entry point group (``NAME =
"module:factory"``, a factory like those below), else :func:`default_harness`
for a backend that starts its own workers.  A harness's ``bare`` gives a backend of
the same kind that no worker serves: the backend-level tests
(``test_backend_contract.py``) need it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any

import psutil
from packmule.backends._choice import ENTRY_POINT_GROUP, backend_class
from packmule.backends.base import Backend

HARNESS_GROUP = "packmule.conformance_harnesses"  # NAME = "module:factory", for backends with outside workers
SUITE_VARS = {"PACKMULE_CONFORMANCE_BACKENDS", "PACKMULE_REQUIRE_CLUSTER"}  # settings of the suite, not of a backend
# The suite's chunking limit (packmule._transport.spill): payloads over 16 KiB are stored
# in chunks on every backend, also where the store itself has no item limit.
SPILL_VAR, SPILL_ABOVE = "PACKMULE_SPILL_ABOVE", "16384"


@contextlib.contextmanager
def spill_limit() -> Iterator[None]:
    """``PACKMULE_SPILL_ABOVE`` set (unless it is already) for the harness's life:
    the driver reads it, and the workers a harness starts inherit it."""
    saved = os.environ.get(SPILL_VAR)
    os.environ[SPILL_VAR] = saved or SPILL_ABOVE
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(SPILL_VAR, None)


@dataclass
class Harness:
    backend: Backend
    env: dict[str, str] = field(default_factory=dict)  # what another process needs to reach the backend
    pids: Callable[[], list[int]] = list  # processes that run jobs now
    extras: dict[str, Any] = field(default_factory=dict)  # what a backend's own tests need (servers...)
    # A backend of the same kind that NO worker serves (its own queue; the same or
    # a separate store and lock space), for the backend-level contract tests
    # (test_backend_contract.py), which talk to its queue directly and must
    # neither take the workers' jobs nor have theirs taken.  The Harness it
    # yields has ``env`` set so that another process reaches that backend.
    bare: Callable[[], contextlib.AbstractContextManager[Harness]] | None = None

    def worker_pids(self) -> list[int]:
        return self.pids()


Factory = Callable[[], contextlib.AbstractContextManager[Harness]]
HARNESSES: dict[str, Factory] = {}


def register(name: str, factory: Factory) -> None:
    HARNESSES[name] = factory


def factory_for(name: str) -> Factory:
    """The harness factory for the backend registered as ``name``: one registered
    here, else one declared under the :data:`HARNESS_GROUP` entry point group, else
    :func:`default_harness` if the backend starts its own workers.  ``LookupError``
    (saying what to write) otherwise."""
    if name in HARNESSES:
        return HARNESSES[name]
    for ep in entry_points(group=HARNESS_GROUP, name=name):
        factory: Factory = ep.load()
        return factory
    if not entry_points(group=ENTRY_POINT_GROUP, name=name):
        known = sorted({*HARNESSES, *(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))})
        raise LookupError(f"no backend {name!r}: no installed package registers it under the "
                          f"{ENTRY_POINT_GROUP!r} entry point group (installed: {', '.join(known)})")
    cls = backend_class(name)
    if cls.ensure_workers is Backend.ensure_workers:
        raise LookupError(
            f"backend {name!r} ({cls.__module__}.{cls.__qualname__}) does not start its own workers "
            f"(it does not override Backend.ensure_workers), and no package declares a harness that starts "
            f"them under the {HARNESS_GROUP!r} entry point group; see README, 'Write your own backend'")
    return functools.partial(default_harness, name)


@contextlib.contextmanager
def default_harness(name: str) -> Iterator[Harness]:
    """The backend registered as ``name``, built from the environment as a user's
    process builds it, with ``ensure_workers()`` called, and closed afterwards.
    Jobs run in the processes under this one: the backend's ``worker_pids()`` if
    it has one, else every process below this one."""
    cls = backend_class(name)
    backend = cls.from_env(os.environ)
    try:
        backend.ensure_workers()
        env = {k: v for k, v in os.environ.items() if k.startswith("PACKMULE_") and k not in SUITE_VARS}
        env["PACKMULE_BACKEND"] = name
        pids = getattr(backend, "worker_pids", None)
        yield Harness(backend, env, pids if callable(pids) else lambda: job_processes([os.getpid()]),
                      bare=functools.partial(default_bare, cls, name))
    finally:
        backend.close()


@contextlib.contextmanager
def default_bare(cls: type[Backend], name: str) -> Iterator[Harness]:
    """A second instance of a backend that starts its own workers, made with
    ``cls()``, its workers never started.  What building it exports to
    ``os.environ`` is what another process needs to reach it; the harness
    backend's settings are put back.  A backend that cannot be built without
    arguments declares a harness with a ``bare`` instead."""
    saved = {k: v for k, v in os.environ.items() if k.startswith("PACKMULE_")}
    try:
        backend = cls()
    except TypeError as exc:
        raise LookupError(
            f"the backend-level tests need a second {name!r} backend that no worker serves, and "
            f"{cls.__qualname__}() cannot be built without arguments ({exc}): declare a harness with a `bare` "
            f"factory under the {HARNESS_GROUP!r} entry point group (see packmule.conformance.harness)") from exc
    finally:  # the harness backend's settings back, whatever building it did
        exported = {k: v for k, v in os.environ.items() if k.startswith("PACKMULE_") and saved.get(k) != v}
        for k in [k for k in os.environ if k.startswith("PACKMULE_")]:
            if k not in saved:
                del os.environ[k]
        os.environ.update(saved)
    env = {**{k: v for k, v in saved.items() if k not in SUITE_VARS}, **exported, "PACKMULE_BACKEND": name}
    try:
        yield Harness(backend, env)
    finally:
        backend.close()


@contextlib.contextmanager
def local_harness() -> Iterator[Harness]:
    from packmule.backends.local import ADDRESS_VAR, SECRET_VAR, LocalBackend

    backend = LocalBackend(workers=2)
    backend.ensure_workers()
    env = {"PACKMULE_BACKEND": "local", ADDRESS_VAR: backend.address, SECRET_VAR: backend.secret().hex()}
    try:
        yield Harness(backend, env, backend.worker_pids, bare=local_bare)
    finally:
        backend.close()


@contextlib.contextmanager
def local_bare() -> Iterator[Harness]:
    """A second local backend: its own coordinator (queue, store, lock dir), its
    workers never started.  Building it exports its address to ``os.environ``;
    the harness backend's is put back, so runners keep finding theirs."""
    from packmule.backends.local import ADDRESS_VAR, SECRET_VAR, LocalBackend

    saved = {var: os.environ.get(var) for var in (ADDRESS_VAR, SECRET_VAR)}
    backend = LocalBackend(workers=1)
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value
    env = {"PACKMULE_BACKEND": "local", ADDRESS_VAR: backend.address, SECRET_VAR: backend.secret().hex()}
    try:
        yield Harness(backend, env)
    finally:
        backend.close()


register("local", local_harness)


def _listed(servers: list[Any]) -> str:
    """A server list as a variable gives it; several are labelled m1, m2, ... (so that a
    test may reach one at another address, through a proxy, and still name it alike)."""
    if len(servers) == 1:
        return str(servers[0].address)
    return ",".join(f"m{i}={server.address}" for i, server in enumerate(servers, 1))


@contextlib.contextmanager
def beanstalk_harness(concurrency: int = 2, worker_args: tuple[str, ...] = (), beanstalkds: int = 1,
                      memcacheds: int = 1, zookeepers: int = 1,
                      worker_env: Mapping[str, str] | None = None) -> Iterator[Harness]:
    """Real beanstalkd, memcached and ZooKeeper on free loopback ports (``beanstalkds``
    and ``memcacheds`` of the first two; ``zookeepers`` > 1: an ensemble of that many
    members), and a ``packmule worker --concurrency 2`` serving them (none with
    concurrency 0), with ``worker_env`` added to its environment; all stopped by PID.
    ``extras`` holds the servers: ``beanstalkd``/``memcached`` the first of each,
    ``beanstalkds``/``memcacheds`` the lists;
    ``zookeeper`` the standalone server or the ``ZooKeeperEnsemble`` (both stop, kill
    and start; ``.address`` is ``PACKMULE_ZOOKEEPER``), ``zookeepers`` its members."""
    import secrets
    import tempfile

    import pytest
    from packmule.backends.beanstalk import BeanstalkBackend

    from .ensemble import ZooKeeperEnsemble
    from .servers import Beanstalkd, Memcached, ZooKeeper, servers_installed

    missing = servers_installed()
    if missing:
        pytest.skip(missing)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with tempfile.TemporaryDirectory(prefix="packmule-cluster-") as tmp, contextlib.ExitStack() as servers:
        bss = [servers.enter_context(Beanstalkd(tmp)) for _ in range(beanstalkds)]
        mcs = [servers.enter_context(Memcached(tmp)) for _ in range(memcacheds)]
        zk = servers.enter_context(ZooKeeperEnsemble(tmp, zookeepers) if zookeepers > 1 else ZooKeeper(tmp))
        zks = zk.members if isinstance(zk, ZooKeeperEnsemble) else [zk]
        env = {"PACKMULE_BACKEND": "beanstalk", "PACKMULE_BEANSTALKD": ",".join(s.address for s in bss),
               "PACKMULE_MEMCACHED": _listed(mcs), "PACKMULE_ZOOKEEPER": zk.address,
               "PACKMULE_SECRET": secrets.token_hex(16), "PACKMULE_TUBE": "conformance"}
        if SPILL_VAR in os.environ:
            env[SPILL_VAR] = os.environ[SPILL_VAR]
        backend = BeanstalkBackend.from_env(env)
        harness = Harness(backend, env)
        run_env = environ_for(harness)
        run_env["PYTHONPATH"] = os.pathsep.join([root, run_env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        run_env.update(worker_env or {})
        harness.extras.update(beanstalkd=bss[0], memcached=mcs[0], zookeeper=zk, beanstalkds=bss, memcacheds=mcs,
                              zookeepers=zks, env=run_env, root=root)
        worker = start_worker(harness, concurrency, *worker_args) if concurrency else None
        harness.pids = lambda: job_processes([worker.pid]) if worker else []
        harness.extras["worker"] = worker
        harness.bare = lambda: beanstalk_bare(harness)
        try:
            yield harness
        finally:
            if worker is not None:
                stop_worker(worker)
            backend.close()


register("beanstalk", beanstalk_harness)


@contextlib.contextmanager
def beanstalk_degraded_ensemble_harness() -> Iterator[Harness]:
    """The beanstalk harness on a 3-member ZooKeeper ensemble whose leader is
    killed (SIGKILL) before any test: the whole suite, on two members of three
    (``--backends beanstalk-zk-degraded``)."""
    with beanstalk_harness(zookeepers=3) as h:
        h.extras["zookeeper"].leader().kill()
        h.extras["zookeeper"].wait_for_leader()
        yield h


register("beanstalk-zk-degraded", beanstalk_degraded_ensemble_harness)


@contextlib.contextmanager
def beanstalk_bare(harness: Harness) -> Iterator[Harness]:
    """The harness's servers, on a tube of its own that no worker watches."""
    import secrets

    from packmule.backends.beanstalk import BeanstalkBackend

    env = dict(harness.env, PACKMULE_TUBE=f"bare-{secrets.token_hex(4)}")
    backend = BeanstalkBackend.from_env(env)
    try:
        yield Harness(backend, env)
    finally:
        backend.close()


def start_worker(harness: Harness, concurrency: int, *args: str) -> subprocess.Popen[bytes]:
    """``packmule worker`` serving the harness's backend; returns once it serves."""
    worker = subprocess.Popen([sys.executable, "-m", "packmule", "worker", "--concurrency", str(concurrency),
                               "--log-level", os.environ.get("PACKMULE_TEST_WORKER_LOG", "WARNING"),
                               "--grace", "10", *args], env=harness.extras["env"], cwd=harness.extras["root"],
                              stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while harness.backend.queue.stats().workers < concurrency:
        if worker.poll() is not None or time.monotonic() > deadline:
            stop_worker(worker)
            raise RuntimeError(f"packmule worker did not start serving (exit {worker.poll()})")
        time.sleep(0.1)
    return worker


def stop_worker(worker: subprocess.Popen[bytes]) -> int:
    """SIGTERM (drain), then SIGKILL if it takes more than 20 s; its exit code."""
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(20)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    return worker.returncode


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
