"""``packmule worker``: serve the backend's queue on this machine.

The parent process supervises ``--concurrency`` child processes; each child is
a consumer of its own (its own connections, its own jobs, one at a time per
batch).  The parent restarts a child that exits, recycles one that ran
``--max-jobs-per-child`` jobs or grew past ``--max-memory-per-child``, and on
SIGTERM (or a first SIGINT) drains: children finish their running jobs and exit;
past ``--grace`` seconds they are killed, which hands their jobs back (the
queue frees a dead consumer's reservations).  A second SIGINT stops at once.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import mmap
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from packmule._core.config import POOL_VAR
from packmule._core.errors import BackendUnavailable
from packmule._core.hooks import WorkerSetupFailed, setup_worker

# The supervisor process (``packmule worker``) only starts and watches its worker processes: what serves the
# queue (serve, the watchdog, the backend and its client libraries) and psutil are imported where they are
# used, in the worker process, in a fork child that checks the configuration (``checked``), or on the rare path
# that needs psutil.  Loaded here, they cost the supervisor process about 12 MiB (benchmarks/bench_memory.py).

__all__ = ["CHECK_EVERY", "DEADLINE_VAR", "MAX_BACKOFF", "RESTART_PAUSE", "STOPPED_GRACE", "DeadlineBoard",
           "Supervisor", "add_arguments", "check", "checked", "child_main", "setup_logging", "worker_main"]

log = logging.getLogger("packmule.worker")

CHECK_EVERY = 0.5  # s between the parent's looks at its children
STOPPED_GRACE = 1.0  # s past its jobs' deadline before a stopped worker process is ended
DEADLINE_VAR = "PACKMULE_WORKER_DEADLINE_FILE"  # (parent to child: where the child publishes its deadline)
RESTART_PAUSE = 2.0  # s before restarting a child that died within this long of starting
MAX_BACKOFF = 30.0  # s: the longest wait before retrying unreachable servers


def setup_logging(level: str) -> None:
    logging.basicConfig(level=level.upper(), stream=sys.stderr,
                        format="%(asctime)s packmule[%(process)d] %(levelname)s %(message)s")


# --- the child: one consumer -----------------------------------------------------
def child_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="packmule worker child")
    ap.add_argument("--import", dest="imports", action="append", default=[])
    ap.add_argument("--max-jobs", type=int, default=0)
    ap.add_argument("--log-level", default="INFO")
    ap.add_argument("--backend-class", default="", help="NAME=MODULE:CLASS: the class of backend NAME")
    a = ap.parse_args(argv)
    setup_logging(a.log_level)
    from packmule._worker.serve import serve  # (here: see the top)
    from packmule._worker.watchdog import Watchdog  # (here: see the top)
    from packmule.backends import _choice  # (here: see the top)

    try:
        setup_worker()  # (PACKMULE_WORKER_SETUP, before the runners are imported: django.setup(), say)
    except WorkerSetupFailed as exc:
        log.error("%s", exc)
        return 2
    for module in a.imports:
        importlib.import_module(module)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())  # finish the running batch, then exit
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides what a Ctrl-C means
    threading.Thread(target=_orphaned, args=(os.getppid(), stop), daemon=True, name="packmule-orphan").start()
    deadline_file = os.environ.pop(DEADLINE_VAR, "")
    if deadline_file:
        Watchdog.report = DeadlineBoard(deadline_file).write
        os.unlink(deadline_file)  # (mapped here and in the parent: nothing to clean up)
    if a.backend_class:
        name, _, target = a.backend_class.partition("=")
        _choice.resolved(name, target)
    backend = _choice.get_backend()
    ran, delay = 0, 0.5
    while not stop.is_set():
        try:
            ran += serve(backend, stop, (a.max_jobs - ran) if a.max_jobs else None)
            delay = 0.5
            if a.max_jobs and ran >= a.max_jobs:
                log.info("ran %d jobs: recycling this process", ran)
                break
        except BackendUnavailable as exc:
            log.warning("%s; retrying in %.1fs", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, MAX_BACKOFF)
    return 0


def _orphaned(parent: int, stop: threading.Event) -> None:
    """A worker process whose supervisor is gone (killed with SIGKILL: it could
    not stop its children) finishes its running batch and exits, instead of
    serving on with nobody to stop it."""
    while not stop.wait(1.0):
        if os.getppid() != parent:
            log.warning("the supervisor (pid %d) is gone: finishing the running batch, then exiting", parent)
            stop.set()


class DeadlineBoard:
    """Eight bytes in a file, mapped into memory by a worker process and its
    supervisor: the wall-clock time by which the worker must have handed back
    the jobs it holds (0: none).  Writing it costs no system call."""

    def __init__(self, path: str) -> None:
        with open(path, "r+b") as f:
            self.map = mmap.mmap(f.fileno(), 8)

    def write(self, deadline: float) -> None:
        struct.pack_into("d", self.map, 0, deadline)

    def read(self) -> float:
        value: float = struct.unpack_from("d", self.map, 0)[0]
        return value

    def close(self) -> None:
        self.map.close()


# --- the parent: a supervisor ----------------------------------------------------
class Supervisor:
    def __init__(self, a: argparse.Namespace, backend_class: str = "") -> None:
        self.a = a
        self.backend_class = backend_class  # 'name=module:Class': the entry point its workers need not read
        self.children: list[subprocess.Popen[bytes]] = []
        self.started: dict[int, float] = {}
        self.boards: dict[int, DeadlineBoard] = {}  # pid -> its deadline
        self.dir = tempfile.mkdtemp(prefix="packmule-worker-")
        self.draining = False
        self.interrupts = 0

    def spawn(self) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "packmule._worker.supervisor", "--child", "--log-level", self.a.log_level,
               "--max-jobs", str(self.a.max_jobs_per_child or 0)]
        for module in self.a.imports:
            cmd += ["--import", module]
        if self.backend_class:
            cmd += ["--backend-class", self.backend_class]
        fd, path = tempfile.mkstemp(dir=self.dir)
        os.write(fd, bytes(8))
        os.close(fd)
        child = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, cwd=os.getcwd(), env={**os.environ, DEADLINE_VAR: path,
                                                                                 POOL_VAR: str(self.a.concurrency)})
        self.boards[child.pid] = DeadlineBoard(path)  # (the child removes the file once it has mapped it)
        self.started[child.pid] = time.monotonic()
        log.info("started worker process %d", child.pid)
        return child

    def end_stopped(self, child: subprocess.Popen[bytes]) -> None:
        """A worker process stopped (SIGSTOP, a debugger) past the deadline of the
        jobs it holds is ended, so that its connections' end frees them at once
        (beanstalkd 1.12 may never time them out while it is silent)."""
        board = self.boards.get(child.pid)
        deadline = board.read() if board is not None else 0.0
        if not deadline or time.time() < deadline + STOPPED_GRACE:
            return
        import psutil  # (here: see the top)

        try:
            stopped = psutil.Process(child.pid).status() == psutil.STATUS_STOPPED
        except psutil.NoSuchProcess:
            return
        if stopped:
            log.warning("worker process %d is stopped past its jobs' time_to_run: ending it, so that they go "
                        "to another worker", child.pid)
            child.kill()

    def on_signal(self, signum: int, _frame: object) -> None:
        if signum == signal.SIGINT:
            self.interrupts += 1
            if self.interrupts >= 2:
                log.warning("second interrupt: stopping now; running jobs go back to the queue")
                for child in self.children:
                    _kill(child)
                os._exit(130)
        if not self.draining:
            log.info("%s: draining (running jobs finish, then exit); interrupt again to stop at once",
                     signal.Signals(signum).name)
            self.draining = True
            for child in self.children:
                if child.poll() is None:
                    child.send_signal(signal.SIGTERM)

    def run(self) -> int:
        try:
            return self._run()
        finally:
            shutil.rmtree(self.dir, ignore_errors=True)

    def _run(self) -> int:
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        self.children = [self.spawn() for _ in range(self.a.concurrency)]
        drain_started: float | None = None
        while True:
            if self.draining:
                drain_started = drain_started or time.monotonic()
                if all(c.poll() is not None for c in self.children):
                    log.info("drained: exiting")
                    return 0
                if time.monotonic() - drain_started > self.a.grace:
                    log.warning("grace of %.0fs over: stopping the rest; their jobs go back to the queue",
                                self.a.grace)
                    for child in self.children:
                        _kill(child)
                    return 0
            else:
                self.tend()
            time.sleep(CHECK_EVERY)

    def tend(self) -> None:
        limit = self.a.max_memory_per_child * 1024 * 1024 if self.a.max_memory_per_child else 0
        for i, child in enumerate(self.children):
            code = child.poll()
            if code is None:
                self.end_stopped(child)
                code = child.poll()
            if code is not None:
                board = self.boards.pop(child.pid, None)
                if board is not None:
                    board.close()
                lived = time.monotonic() - self.started.pop(child.pid, 0.0)
                if code != 0:
                    log.warning("worker process %d exited with %s; starting another", child.pid, code)
                if lived < RESTART_PAUSE and code != 0:
                    time.sleep(RESTART_PAUSE)  # dying at start (bad --import?): do not spin
                self.children[i] = self.spawn()
            elif limit:
                import psutil  # (here: see the top)

                try:
                    rss = psutil.Process(child.pid).memory_info().rss
                except psutil.NoSuchProcess:
                    continue
                if rss > limit and child.pid in self.started:
                    log.info("worker process %d uses %d MiB > %d MiB: recycling it after its running jobs",
                             child.pid, rss >> 20, self.a.max_memory_per_child)
                    self.started[child.pid] = time.monotonic()
                    child.send_signal(signal.SIGTERM)


def _kill(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.kill()
        child.wait()


def add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--concurrency", "-c", type=int, default=os.cpu_count() or 1,
                    help="worker processes (default: CPU count)")
    ap.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                    help="import MODULE in every worker process (repeatable): runners pickled by reference")
    ap.add_argument("--max-jobs-per-child", type=int, default=0, metavar="N",
                    help="recycle a worker process after N jobs (default: never)")
    ap.add_argument("--max-memory-per-child", type=int, default=0, metavar="MIB",
                    help="recycle a worker process whose memory passes MIB MiB (default: never)")
    ap.add_argument("--grace", type=float, default=60.0, metavar="SECONDS",
                    help="on SIGTERM, how long running jobs may finish before they are handed back")
    ap.add_argument("--log-level", default="INFO", help="DEBUG, INFO (a line per job state change), WARNING")


def worker_main(a: argparse.Namespace) -> int:
    setup_logging(a.log_level)
    if a.concurrency < 1:
        log.error("--concurrency must be at least 1")
        return 2
    backend = os.environ.get("PACKMULE_BACKEND") or "local"  # (_choice.DEFAULT_BACKEND, not imported: see the top)
    if backend == "local":  # (checked here: the local backend built here may be the coordinator its children join)
        code, name, target = check(a)
    else:
        code, name, target = checked(check, a)
    if code:
        return code
    log.info("serving the %s backend with %d processes", name, a.concurrency)
    return Supervisor(a, f"{backend}={target}").run()


def check(a: argparse.Namespace) -> tuple[int, str, str]:
    """Whether the worker processes can start: the ``PACKMULE_WORKER_SETUP``
    functions succeed, every ``--import`` imports and the backend builds.  (2,
    '', '') if not (and why is logged), else 0, the backend's name and its class
    as the entry point names it."""
    try:
        setup_worker()  # (PACKMULE_WORKER_SETUP: what every worker process does first; failing, it stops here)
    except WorkerSetupFailed as exc:
        log.error("%s; no worker process started", exc)
        return 2, "", ""
    for module in a.imports:
        try:
            importlib.import_module(module)
        except ImportError as exc:
            log.error("--import %s: %s (is it on PYTHONPATH, or is the cwd right?)", module, exc)
            return 2, "", ""
    from packmule.backends import _choice  # (here: see the top)

    try:
        backend = _choice.get_backend()
    except (ValueError, TypeError) as exc:
        log.error("%s", exc)
        return 2, "", ""
    cls = _choice.backend_class(os.environ.get("PACKMULE_BACKEND") or _choice.DEFAULT_BACKEND)  # (as get_backend's)
    return 0, backend.name, _choice.entry_point_of(cls)


def checked(fn: Callable[[argparse.Namespace], Any], a: argparse.Namespace) -> Any:
    """``fn(a)`` run in a fork child of this process: what it imports (the user's
    ``--import`` modules, the backend's client libraries) stays out of the
    supervisor, which never uses it.  Returns what ``fn`` returned, or raises
    what it raised (its traceback in the child added as a note)."""
    read, write = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: answer, and end without running the parent's exit handlers
        os.close(read)
        try:
            answer: tuple[str, Any, str] = ("value", fn(a), "")
        except BaseException as exc:  # noqa: BLE001 (raised again in the parent)
            answer = ("raise", exc, traceback.format_exc())
        try:
            data = pickle.dumps(answer)
        except Exception:  # noqa: BLE001 (an exception that does not pickle: its text does)
            data = pickle.dumps(("raise", RuntimeError(repr(answer[1])), answer[2]))
        with os.fdopen(write, "wb") as f:
            f.write(data)
        logging.shutdown()
        sys.stderr.flush()
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as f:
        data = f.read()
    _, status = os.waitpid(pid, 0)
    if not data:
        raise RuntimeError(f"the check of the configuration ended without an answer (wait status {status})")
    kind, value, text = pickle.loads(data)
    if kind == "raise":
        if hasattr(value, "add_note"):
            value.add_note(f"(raised in the supervisor's check of the configuration)\n{text}")
        raise value
    return value


if __name__ == "__main__" and sys.argv[1:2] == ["--child"]:
    sys.exit(child_main(sys.argv[2:]))
