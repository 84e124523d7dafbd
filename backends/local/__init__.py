"""The ``local`` backend: worker processes on this machine, no servers.

The first process that uses it starts a coordinator process (``coordinator.py``)
that holds the queue and the store in memory (``core.py``) and listens on a Unix
socket in a private temp dir, then starts ``PACKMULE_WORKERS`` worker processes
(``worker.py``) that reach it over that socket, as this process does too.  It
exports the socket's address and the secret to its environment, so every
process it starts - workers, and any process a job starts - joins the same
backend as a client.  A worker that dies is noticed at once (its socket
closes): its jobs are ready again and a new worker replaces it.  The
coordinator ends with the process that started it.  Jobs are serialized and
signed exactly as on a cluster.
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
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Client
from typing import Any

from packmule.backends.base import Backend, Put, Queue, QueueStats, Reserved, Store
from packmule.backends.local.core import receive, send

from packmule._errors import BackendUnavailable

log = logging.getLogger("packmule")

ADDRESS_VAR, SECRET_VAR = "PACKMULE_LOCAL_ADDRESS", "PACKMULE_LOCAL_SECRET"
RESTART_PAUSE = 1.0  # s between restarts of a worker that keeps dying at start
STOP_GRACE = 5.0  # s close() gives workers to finish their batch before it kills them
MAX_UNANSWERED = 64  # requests a client posts before it reads their answers
CONNECT_TIMEOUT = 30.0  # s a client waits for the coordinator to take its connection and check its secret


def _lock(lock_dir: str, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
    path = os.path.join(lock_dir, hashlib.sha1(name.encode()).hexdigest() + ".lock")
    return _filelock(path, name, timeout)


@contextlib.contextmanager
def _filelock(path: str, name: str, timeout: float | None) -> Iterator[None]:
    import filelock  # (here: only jobs that lock pay for its import)

    lock = filelock.FileLock(path, timeout=-1 if timeout is None else timeout, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise TimeoutError(f"lock {name!r} not acquired within {timeout}s") from None
    try:
        yield
    finally:
        lock.release()


def _wait_or_kill(proc: subprocess.Popen[bytes], deadline: float) -> None:
    try:
        proc.wait(max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class LocalBackend(Backend):
    """The process that started the local backend: it owns the coordinator
    process and the worker processes, and reaches the queue and the store over
    the coordinator's socket, like every other process."""

    name = "local"
    worker_hint = "the local backend starts its workers itself: see the log for why they are not running"

    def __init__(self, workers: int | None = None) -> None:
        self._secret = os.urandom(32)
        self._dir = tempfile.mkdtemp(prefix="packmule-")
        self.address = os.path.join(self._dir, "coordinator.sock")
        self.workers = workers or os.cpu_count() or 1
        self.pid = os.getpid()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._closing = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._coordinator = self._start_coordinator()
        self._client = LocalClient(self.address, self._secret)
        self.queue, self.store = self._client.queue, self._client.store
        os.environ[ADDRESS_VAR] = self.address  # children of this process join this backend
        os.environ[SECRET_VAR] = self._secret.hex()
        atexit.register(self.close)

    def _start_coordinator(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **{ADDRESS_VAR: self.address,
                                                                         SECRET_VAR: self._secret.hex()})
        # its stdin is a pipe this process holds: it ends when this process does
        proc = subprocess.Popen([sys.executable, "-m", "packmule.backends.local.coordinator"], env=env,
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != b"ready":
            proc.kill()
            proc.wait()
            shutil.rmtree(self._dir, ignore_errors=True)
            raise BackendUnavailable(f"the local coordinator did not start (exit code {proc.returncode}); "
                                     "see its error above")
        proc.stdout.close()
        return proc

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        global _coordinator, _client
        address = env.get(ADDRESS_VAR)
        if _coordinator is not None and _coordinator.pid == os.getpid() and address in (None, _coordinator.address):
            return _coordinator
        if address and env.get(SECRET_VAR):
            # (a client of another coordinator - one that ended, say - is not this one's)
            if _client is None or _client.pid != os.getpid() or _client.address != address:
                _client = LocalClient(address, bytes.fromhex(env[SECRET_VAR]))
            return _client
        raw = env.get("PACKMULE_WORKERS", "")
        if raw and (not raw.isdigit() or int(raw) < 1):
            raise ValueError(f"PACKMULE_WORKERS={raw!r}: give a whole number of worker processes >= 1")
        _coordinator = cls(int(raw) if raw else None)
        return _coordinator

    def secret(self) -> bytes:
        return self._secret

    def for_thread(self) -> Backend:
        return self._client.for_thread()

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return _lock(self._dir, name, timeout)

    # --- workers ------------------------------------------------------------------
    def ensure_workers(self) -> None:
        if self._started:
            return
        with self._start_lock:
            if not self._started:
                self._procs = [self._spawn() for _ in range(self.workers)]
                self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="packmule-supervise")
                self._supervisor.start()
                self._started = True

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, PACKMULE_BACKEND="local", PYTHONPATH=os.pathsep.join(sys.path),
                   PACKMULE_WORKER_POOL=str(self.workers))  # (for the dashboard)
        return subprocess.Popen([sys.executable, "-m", "packmule.backends.local.worker"], env=env,
                                stdin=subprocess.DEVNULL)

    def _supervise(self) -> None:
        """Replace any worker that exits."""
        while not self._closing.wait(0.05):
            if self._coordinator.poll() is not None:
                log.error("the local coordinator exited with %s: the backend's queue and store are gone",
                          self._coordinator.returncode)
                return
            for i, proc in enumerate(self._procs):
                code = proc.poll()
                if code is None or self._closing.is_set():
                    continue
                log.warning("local worker %d exited with %s; starting another", proc.pid, code)
                if code != 0 and getattr(proc, "_pm_started", 0) > time.monotonic() - RESTART_PAUSE:
                    time.sleep(RESTART_PAUSE)  # dying at start: do not spin
                self._procs[i] = self._spawn()
                self._procs[i]._pm_started = time.monotonic()  # type: ignore[attr-defined]

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes this backend started (for tests and tools)."""
        return [p.pid for p in self._procs if p.poll() is None]

    def close(self, grace: float = STOP_GRACE) -> None:
        """Stop the processes this backend started (by PID, no others): the
        workers get SIGTERM and ``grace`` seconds to finish their batch, then
        SIGKILL; then the coordinator.  ``grace=0`` kills them all at once
        (``packmule.testing``: what a test left running is of no use)."""
        if self._closing.is_set() or self.pid != os.getpid():
            return
        self._closing.set()
        if self._supervisor is not None:
            self._supervisor.join(RESTART_PAUSE + 1)  # it replaces no worker from now on
        for proc in self._procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM if grace > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace
        for proc in self._procs:
            _wait_or_kill(proc, deadline)
        # the coordinator last: draining workers commit through it
        self._client.close()
        assert self._coordinator.stdin is not None
        if grace <= 0:
            self._coordinator.kill()
        with contextlib.suppress(OSError):
            self._coordinator.stdin.close()  # its signal to end
        _wait_or_kill(self._coordinator, deadline)
        shutil.rmtree(self._dir, ignore_errors=True)
        global _coordinator
        if _coordinator is self:
            _coordinator = None
        for var in (ADDRESS_VAR, SECRET_VAR):
            if os.environ.get(var) in (self.address, self._secret.hex()):
                del os.environ[var]


class _Answer:
    """The answer to a request that was sent without waiting for it."""

    __slots__ = ("kind", "value")

    def __init__(self) -> None:
        self.kind: str | None = None  # 'ok' | 'err' once read
        self.value: Any = None


def _connect(address: str, secret: bytes, timeout: float) -> Any:
    """``Client(address, authkey=secret)``, but within ``timeout`` seconds: its
    handshake has no time limit of its own, and a coordinator that takes the
    connection and never answers must not hang this process silently."""
    outcome: list[Any] = []

    def attempt() -> None:
        try:
            outcome.append(Client(address, family="AF_UNIX", authkey=secret))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True, name="packmule-connect")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"it took the connection but did not answer the secret's handshake within {timeout}s "
                           "(stopped or overloaded?)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


class LocalClient(Backend):
    """The backend as any process but the coordinator reaches it: over the socket.

    The coordinator handles a connection's requests one at a time, in order, and
    answers each in that order; so a client need not wait for an answer before
    it sends its next request, and every later request of this process sees the
    effect of the earlier ones.  A request whose answer is only "done" (put, ack,
    release, bury, touch, set, delete) is *posted*: its answer is read with the
    answer of a later request, and a failure it reports is raised there.  A
    worker thus does not sit idle for a round trip per call, and its store
    writes, then its puts, then its acks, still apply in that order.  A
    ``get_many_soon`` read is answered while its caller works on."""

    name = "local"

    def __init__(self, address: str, secret: bytes, role: str = "client") -> None:
        self.address, self._secret, self.pid = address, secret, os.getpid()
        self._lock = threading.Lock()
        # requests sent whose answers are not read yet, oldest first; None for a posted one
        self._unanswered: deque[_Answer | None] = deque()
        self._failure: BaseException | None = None  # the first failure of a posted request, not raised yet
        try:
            self._conn = _connect(address, secret, CONNECT_TIMEOUT)
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
        """Send a request and wait for its answer."""
        with self._lock:
            try:
                send(self._conn, (op, args))
                while self._unanswered:
                    self._read_answer()
                kind, value = receive(self._conn)
            except (OSError, EOFError) as exc:
                raise self._gone(exc) from exc
            self._raise_failure()
        if kind == "err":
            raise value
        return value

    def _post(self, op: str, *args: Any) -> None:
        """Send a request whose answer is only "done", without waiting for it."""
        with self._lock:
            try:
                send(self._conn, (op, args))
                self._unanswered.append(None)
                while len(self._unanswered) >= MAX_UNANSWERED:
                    self._read_answer()
            except (OSError, EOFError) as exc:
                raise self._gone(exc) from exc
            self._raise_failure()

    def _start(self, op: str, *args: Any) -> Callable[[], Any]:
        """Send a request; the returned function waits for its answer."""
        answer = _Answer()
        with self._lock:
            try:
                send(self._conn, (op, args))
            except (OSError, EOFError) as exc:
                raise self._gone(exc) from exc
            self._unanswered.append(answer)

        def result() -> Any:
            with self._lock:
                try:
                    while answer.kind is None:
                        self._read_answer()
                except (OSError, EOFError) as exc:
                    raise self._gone(exc) from exc
            if answer.kind == "err":
                raise answer.value
            return answer.value

        return result

    def _read_answer(self) -> None:
        """Read the answer to the oldest request not waited for."""
        kind, value = receive(self._conn)
        answer = self._unanswered.popleft()
        if answer is not None:
            answer.kind, answer.value = kind, value
        elif kind == "err" and self._failure is None:
            self._failure = value

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _gone(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"local coordinator at {self.address} (from {ADDRESS_VAR}) went away: {exc!r}")

    def secret(self) -> bytes:
        return self._secret

    def for_thread(self) -> Backend:
        """A connection of its own: a thread sharing this one could wait long for its
        lock (held through each blocking reserve), and could be handed the failure
        of a request another thread posted."""
        return LocalClient(self.address, self._secret)

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return _lock(os.path.dirname(self.address), name, timeout)

    def close(self) -> None:
        with self._lock, contextlib.suppress(OSError, EOFError):
            while self._unanswered:  # (what was sent applies anyway; this only waits for it)
                self._read_answer()
        self._conn.close()


class _ClientQueue(Queue):
    def __init__(self, client: LocalClient, server: str) -> None:
        self.c, self.server = client, server

    def server_for(self, shard: str) -> str:
        return self.server

    def put_many(self, jobs: Sequence[Put]) -> None:
        self.c._post("put_many", list(jobs))

    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        return [Reserved(*r) for r in self.c._call("reserve_many", max_count, timeout)]

    def ack_many(self, handles: Sequence[Any]) -> None:
        self.c._post("ack_many", list(handles))

    def release(self, handle: Any, delay: float) -> None:
        self.c._post("release", handle, delay)

    def bury(self, handle: Any) -> None:
        self.c._post("bury", handle)

    def touch(self, handle: Any) -> None:
        self.c._post("touch", handle)

    def stats(self) -> QueueStats:
        return QueueStats(*self.c._call("stats"))


class _ClientStore(Store):
    def __init__(self, client: LocalClient) -> None:
        self.c = client

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        keys = list(keys)
        return _present(keys, self.c._call("get_list", keys))

    def get_many_soon(self, keys: Sequence[str]) -> Callable[[], dict[str, bytes]]:
        keys = list(keys)
        answer = self.c._start("get_list", keys)
        return lambda: _present(keys, answer())

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        self.c._post("set_many", dict(items), ttl)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        refused = self.c._call("add_refused", dict(items), ttl)  # usually none: not every key sent back
        return set(items).difference(refused)

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        return self.c._call("incr_many", dict(deltas))  # type: ignore[no-any-return]

    def delete_many(self, keys: Sequence[str]) -> None:
        self.c._post("delete_many", list(keys))


def _present(keys: list[str], values: list[bytes | None]) -> dict[str, bytes]:
    """A get_many result from the coordinator's answer: a value (or None) per key."""
    return {key: value for key, value in zip(keys, values, strict=True) if value is not None}


_coordinator: LocalBackend | None = None
_client: LocalClient | None = None
