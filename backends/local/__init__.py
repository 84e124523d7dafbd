"""The ``local`` backend: worker processes on this machine, no servers.

The first process that uses it starts a coordinator process (``coordinator.py``)
that holds the queue and the store in memory (``core.py``) and listens on a Unix
socket in a private temp dir, then starts ``PACKMULE_WORKERS`` worker processes
(``packmule/_worker/local_process.py``: they run the worker loop, a layer above
the backends) that reach it over that socket, as this process does too.  It
exports the socket's address and the secret to its environment, so every
process it starts - workers, and any process a job starts - joins the same
backend as a client.  A worker that dies is noticed at once (its socket
closes): its jobs are ready again and a new worker replaces it.  The
coordinator ends with the process that started it.  Jobs are serialized and
signed exactly as on a cluster.  A process forked from any of these is one
more client, on a connection of its own made at its first request
(``client.py``); it starts, replaces and stops no worker.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Mapping

from packmule.backends.base import Backend
from packmule.backends.local.client import ADDRESS_VAR, SECRET_VAR, LocalClient, _lock

from packmule._core.errors import BackendUnavailable
from packmule._core.fork import forget_at_fork
from packmule._core.hooks import SETUP_FAILED_EXIT, env_for_workers

__all__ = ["ADDRESS_VAR", "SECRET_VAR", "BackendUnavailable", "LocalBackend", "LocalClient"]

log = logging.getLogger("packmule")

RESTART_PAUSE = 1.0  # s between restarts of a worker that keeps dying at start
STOP_GRACE = 5.0  # s close() gives workers to finish their batch before it kills them


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
        self._env: dict[str, str] = {}  # what packmule._core.hooks.WORKER_ENV adds to the workers' environment
        self._given_up: set[int] = set()  # workers whose setup failed: not replaced
        self._closing = threading.Event()
        self._started = False
        self._start_lock = threading.Lock()
        self._supervisor: threading.Thread | None = None
        self._coordinator = self._start_coordinator()
        self._client = LocalClient(self.address, self._secret)
        self.queue, self.store = self._client.queue, self._client.store
        self.ledger = self._client.ledger
        os.environ[ADDRESS_VAR] = self.address  # children of this process join this backend
        os.environ[SECRET_VAR] = self._secret.hex()
        atexit.register(self.close)
        forget_at_fork(self)

    def _forget_inherited(self) -> None:
        """(Run in a fork child.)  The coordinator and the workers stay the
        parent's, and so does ending them: the child is one more client (its
        ``_client`` makes a connection of its own), starts, replaces and stops no
        worker (``close`` ends only its own connection), and closes its copy of
        the coordinator's stdin, so that the coordinator still ends with the
        process that started it."""
        self._supervisor = None
        self._start_lock = threading.Lock()
        if self._coordinator.stdin is not None:
            with contextlib.suppress(OSError):
                self._coordinator.stdin.close()

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
        """Start the workers, once (in the process that started the coordinator;
        in a fork child, nothing: the parent started them before it forked)."""
        if self._started or self.pid != os.getpid():
            return
        with self._start_lock:
            if not self._started:
                self._env = env_for_workers()  # (a framework's additions: may refuse, raising)
                self._procs = [self._spawn() for _ in range(self.workers)]
                self._supervisor = threading.Thread(target=self._supervise, daemon=True, name="packmule-supervise")
                self._supervisor.start()
                self._started = True

    def _spawn(self) -> subprocess.Popen[bytes]:
        env = dict(os.environ, **self._env, PACKMULE_BACKEND="local", PYTHONPATH=os.pathsep.join(sys.path),
                   PACKMULE_WORKER_POOL=str(self.workers))  # (for the dashboard)
        return subprocess.Popen([sys.executable, "-m", "packmule._worker.local_process"], env=env,
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
                if code is None or self._closing.is_set() or proc.pid in self._given_up:
                    continue
                if code == SETUP_FAILED_EXIT:  # (PACKMULE_WORKER_SETUP failed: another would fail alike)
                    self._given_up.add(proc.pid)
                    log.error("local worker %d could not set up (PACKMULE_WORKER_SETUP; its error is above): "
                              "no other is started in its place", proc.pid)
                    continue
                log.warning("local worker %d exited with %s; starting another", proc.pid, code)
                if code != 0 and getattr(proc, "_pm_started", 0) > time.monotonic() - RESTART_PAUSE:
                    time.sleep(RESTART_PAUSE)  # dying at start: do not spin
                self._procs[i] = self._spawn()
                self._procs[i]._pm_started = time.monotonic()  # type: ignore[attr-defined]

    def worker_pids(self) -> list[int]:
        """PIDs of the worker processes this backend started (for tests and tools;
        none in a fork child, which started none)."""
        if self.pid != os.getpid():
            return []
        return [p.pid for p in self._procs if p.poll() is None]

    def close(self, grace: float = STOP_GRACE) -> None:
        """Stop the processes this backend started (by PID, no others): the
        workers get SIGTERM and ``grace`` seconds to finish their batch, then
        SIGKILL; then the coordinator.  ``grace=0`` kills them all at once
        (``packmule.testing``: what a test left running is of no use)."""
        if self.pid != os.getpid():  # a fork child: the processes are its parent's
            self._client.close()
            return
        if self._closing.is_set():
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


_coordinator: LocalBackend | None = None
LocalClient.owner = LocalBackend  # (a client's from_env is the backend's)
_client: LocalClient | None = None


def _start_workers_before_fork() -> None:
    """A process's local backend starts its workers before the process forks
    (if it has not yet: at its first enqueue), as a fork child cannot: its
    children - gunicorn's workers, a multiprocessing pool - would find none."""
    backend = _coordinator
    if backend is None or backend.pid != os.getpid() or backend._closing.is_set():
        return
    try:
        backend.ensure_workers()
    except Exception as exc:  # (the fork goes on; a wait of the child says what is missing)
        log.warning("the local backend could not start its workers before this process forked: %r", exc)


os.register_at_fork(before=_start_workers_before_fork)
