"""The ``local`` backend: worker processes on this machine, no servers.

The first process that uses it becomes the coordinator: it holds the queue and
the store in memory (``core.py``), listens on a Unix socket in a private temp
dir, and starts ``PACKMULE_WORKERS`` worker processes (``worker.py``) that
reach it over that socket.  It exports the socket's address and the secret to
its environment, so every process it starts - workers, and any process a job
starts - joins the same backend as a client.  A worker that dies is noticed at
once (its socket closes): its jobs are ready again and a new worker replaces
it.  Jobs are serialized and signed exactly as on a cluster.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

import filelock
from packmule.backends.base import Backend, Put, Queue, QueueStats, Reserved, Store
from packmule.backends.local.core import Core, call

from packmule._errors import BackendUnavailable

log = logging.getLogger("packmule")

ADDRESS_VAR, SECRET_VAR = "PACKMULE_LOCAL_ADDRESS", "PACKMULE_LOCAL_SECRET"
RESTART_PAUSE = 1.0  # s between restarts of a worker that keeps dying at start


def _lock(lock_dir: str, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
    path = os.path.join(lock_dir, hashlib.sha1(name.encode()).hexdigest() + ".lock")
    return _filelock(path, name, timeout)


@contextlib.contextmanager
def _filelock(path: str, name: str, timeout: float | None) -> Iterator[None]:
    lock = filelock.FileLock(path, timeout=-1 if timeout is None else timeout, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise TimeoutError(f"lock {name!r} not acquired within {timeout}s") from None
    try:
        yield
    finally:
        lock.release()


class _CoreQueue(Queue):
    def __init__(self, core: Core, owner: object) -> None:
        self.core, self.owner = core, owner

    def server_for(self, shard: str) -> str:
        return self.core.server

    def put_many(self, jobs: Sequence[Put]) -> None:
        self.core.put_many(jobs)

    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        return self.core.reserve_many(self.owner, max_count, timeout)

    def ack_many(self, handles: Sequence[Any]) -> None:
        self.core.ack_many(handles)

    def release(self, handle: Any, delay: float) -> None:
        self.core.release(handle, delay)

    def bury(self, handle: Any) -> None:
        self.core.bury(handle)

    def touch(self, handle: Any) -> None:
        self.core.touch(handle)

    def stats(self) -> QueueStats:
        return self.core.stats()


class _CoreStore(Store):
    def __init__(self, core: Core) -> None:
        self.core = core

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self.core.get_many(keys)

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        self.core.set_many(items, ttl)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        return self.core.add_many(items, ttl)

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        return self.core.incr_many(deltas)

    def delete_many(self, keys: Sequence[str]) -> None:
        self.core.delete_many(keys)


class LocalBackend(Backend):
    """The coordinator: owns the queue, the store and the worker processes."""

    name = "local"
    worker_hint = "the local backend starts its workers itself: see the log for why they are not running"

    def __init__(self, workers: int | None = None) -> None:
        self._secret = os.urandom(32)
        self._dir = tempfile.mkdtemp(prefix="packmule-")
        self.address = os.path.join(self._dir, "coordinator.sock")
        self.core = Core(f"local:{os.getpid()}")
        self.queue = _CoreQueue(self.core, owner=self)
        self.store = _CoreStore(self.core)
        self.workers = workers or os.cpu_count() or 1
        self.pid = os.getpid()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closing = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()
        self._listener = Listener(self.address, family="AF_UNIX", authkey=self._secret)
        os.environ[ADDRESS_VAR] = self.address  # children of this process join this backend
        os.environ[SECRET_VAR] = self._secret.hex()
        threading.Thread(target=self._accept, daemon=True, name="packmule-accept").start()
        atexit.register(self.close)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        global _coordinator, _client
        if _coordinator is not None and _coordinator.pid == os.getpid():
            return _coordinator
        if env.get(ADDRESS_VAR) and env.get(SECRET_VAR):
            if _client is None or _client.pid != os.getpid():
                _client = LocalClient(env[ADDRESS_VAR], bytes.fromhex(env[SECRET_VAR]))
            return _client
        raw = env.get("PACKMULE_WORKERS", "")
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise ValueError(f"PACKMULE_WORKERS={raw!r}: give a whole number of worker processes >= 1")
        _coordinator = cls(int(raw) if raw else None)
        return _coordinator

    def secret(self) -> bytes:
        return self._secret

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return _lock(self._dir, name, timeout)

    # --- workers ------------------------------------------------------------------
    def ensure_workers(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self._procs = [self._spawn() for _ in range(self.workers)]
                threading.Thread(target=self._supervise, daemon=True, name="packmule-supervise").start()
                self._started = True

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PACKMULE_BACKEND="local", PYTHONPATH=os.pathsep.join(sys.path))
        return subprocess.Popen([sys.executable, "-m", "packmule.backends.local.worker"], env=env,
                                stdin=subprocess.DEVNULL)

    def _supervise(self) -> None:
        """Replace any worker that exits; sweep expired keys now and then."""
        last_sweep = time.monotonic()
        while not self._closing.wait(0.05):
            for i, proc in enumerate(self._procs):
                code = proc.poll()
                if code is None or self._closing.is_set():
                    continue
                log.warning("local worker %d exited with %s; starting another", proc.pid, code)
                if code != 0 and getattr(proc, "_pm_started", 0) > time.monotonic() - RESTART_PAUSE:
                    time.sleep(RESTART_PAUSE)  # dying at start: do not spin
                self._procs[i] = self._spawn()
                self._procs[i]._pm_started = time.monotonic()  # type: ignore[attr-defined]
            if time.monotonic() - last_sweep > 60:
                self.core.sweep()
                last_sweep = time.monotonic()

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes this backend started (for tests and tools)."""
        return [p.pid for p in self._procs if p.poll() is None]

    # --- serving clients --------------------------------------------------------------
    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                conn = self._listener.accept()
            except OSError:
                return  # closed
            except Exception as exc:  # a client with the wrong key: refuse it, keep serving
                log.warning("local coordinator refused a connection: %r", exc)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True, name="packmule-conn").start()

    def _serve(self, conn: Connection) -> None:
        owner = object()
        worker = False
        try:
            while True:
                op, args = conn.recv()
                if op == "hello":
                    worker = args[0] == "worker"
                    if worker:
                        with self.core.cond:
                            self.core.workers += 1
                    conn.send(("ok", self.core.server))
                    continue
                try:
                    result = ("ok", call(self.core, owner, op, args))
                except Exception as exc:
                    result = ("err", exc)
                conn.send(result)
        except (EOFError, OSError):
            pass  # the client's process ended (or closed): its reservations go back now
        finally:
            back = self.core.release_owner(owner)
            if back:
                log.warning("a local worker went away holding %d jobs; they are ready again", back)
            if worker:
                with self.core.cond:
                    self.core.workers -= 1
            conn.close()

    def close(self) -> None:
        if self._closing.is_set() or self.pid != os.getpid():
            return
        self._closing.set()
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        for proc in self._procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self._listener.close()
        shutil.rmtree(self._dir, ignore_errors=True)
        global _coordinator
        if _coordinator is self:
            _coordinator = None
        for var in (ADDRESS_VAR, SECRET_VAR):
            if os.environ.get(var) in (self.address, self._secret.hex()):
                del os.environ[var]


class LocalClient(Backend):
    """A process other than the coordinator: the same backend over the socket."""

    name = "local"

    def __init__(self, address: str, secret: bytes, role: str = "client") -> None:
        self.address, self._secret, self.pid = address, secret, os.getpid()
        self._lock = threading.Lock()
        try:
            self._conn = Client(address, family="AF_UNIX", authkey=secret)
        except (OSError, EOFError) as exc:
            raise BackendUnavailable(
                f"local coordinator at {address} (from {ADDRESS_VAR}) is not reachable: {exc}; "
                "the process that started it has ended") from exc
        server = self._call("hello", role)
        self.queue = _ClientQueue(self, server)
        self.store = _ClientStore(self)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        return LocalBackend.from_env(env)

    def _call(self, op: str, *args: Any) -> Any:
        with self._lock:
            try:
                self._conn.send((op, args))
                kind, value = self._conn.recv()
            except (OSError, EOFError) as exc:
                raise BackendUnavailable(
                    f"local coordinator at {self.address} (from {ADDRESS_VAR}) went away: {exc!r}") from exc
        if kind == "err":
            raise value
        return value

    def secret(self) -> bytes:
        return self._secret

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return _lock(os.path.dirname(self.address), name, timeout)

    def close(self) -> None:
        self._conn.close()


class _ClientQueue(Queue):
    def __init__(self, client: LocalClient, server: str) -> None:
        self.c, self.server = client, server

    def server_for(self, shard: str) -> str:
        return self.server

    def put_many(self, jobs: Sequence[Put]) -> None:
        self.c._call("put_many", list(jobs))

    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        return [Reserved(*r) for r in self.c._call("reserve_many", max_count, timeout)]

    def ack_many(self, handles: Sequence[Any]) -> None:
        self.c._call("ack_many", list(handles))

    def release(self, handle: Any, delay: float) -> None:
        self.c._call("release", handle, delay)

    def bury(self, handle: Any) -> None:
        self.c._call("bury", handle)

    def touch(self, handle: Any) -> None:
        self.c._call("touch", handle)

    def stats(self) -> QueueStats:
        return QueueStats(*self.c._call("stats"))


class _ClientStore(Store):
    def __init__(self, client: LocalClient) -> None:
        self.c = client

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return self.c._call("get_many", list(keys))  # type: ignore[no-any-return]

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        self.c._call("set_many", dict(items), ttl)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        return self.c._call("add_many", dict(items), ttl)  # type: ignore[no-any-return]

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        return self.c._call("incr_many", dict(deltas))  # type: ignore[no-any-return]

    def delete_many(self, keys: Sequence[str]) -> None:
        self.c._call("delete_many", list(keys))


_coordinator: LocalBackend | None = None
_client: LocalClient | None = None
