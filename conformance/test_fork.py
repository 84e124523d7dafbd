"""A process that used the backend, then forked: each child (``os.fork``,
multiprocessing's ``fork`` start method) runs and waits on runs of its own with
the parent's backend object and Runners, while the parent goes on with its own;
every answer is the asker's.  Real forks of the test process; each child has an
alarm and the parent waits on everything with a deadline, so a crossed or dead
connection fails the test instead of hanging it.  The backend object each test
forks with is its own (``for_thread``: its own connections, where the backend
has them), so one whose connection a child crossed breaks no other test."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import select
import signal
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import packmule

from .harness import Harness
from .runners import Tree

WAIT = 20  # s a child or the parent gets for its runs: far beyond what they need
FORK = multiprocessing.get_context("fork")
FORK_WITH_THREADS = "ignore:This process .* is multi-threaded:DeprecationWarning"  # Python >= 3.12
pytestmark = pytest.mark.filterwarnings(FORK_WITH_THREADS)


@pytest.fixture
def backend(harness: Harness) -> Any:
    own = harness.backend.for_thread()
    yield own
    if own is not harness.backend:
        own.close()


# --- what each process runs ------------------------------------------------------------------------
def own_runs(backend: Any, tag: str, width: int) -> dict[str, Any]:
    """An async run (enqueue, wait, value) and a blocking one, each tagged with ``tag``."""
    tree = Tree(None, backend=backend)
    tree.enqueue("fan_of", [f"{tag}:{k}" for k in range(width)])
    progress = tree.wait(timeout=WAIT)
    return {"progress": str(progress), "value": tree.get_return_value(),
            "sync": Tree(None, backend=backend).root(width)}


def expected(tag: str, width: int) -> dict[str, Any]:
    return {"progress": f"{width + 1}.0 / {width + 1}.0", "value": [f"{tag}:{k}" for k in range(width)],
            "sync": [[f"{i}.{j}" for j in range(width)] for i in range(width)]}


def child_runs(before: packmule.Runner, backend: Any, tag: str, width: int) -> dict[str, Any]:
    """In a child: the parent's finished run read through the parent's Runner, then runs of its own."""
    return {"before": str(before.update_progress()), **own_runs(backend, tag, width)}


def _alarm(signum: int, frame: Any) -> None:
    raise TimeoutError(f"this fork child was still running after {WAIT * 2} s")


# --- forking and collecting ------------------------------------------------------------------------
def fork(target: Callable[..., Any], *args: Any) -> tuple[int, int]:
    """Fork a child that runs ``target(*args)`` and writes its outcome as JSON to a
    pipe; returns its pid and the pipe's read end.  The child never returns here."""
    read, write = os.pipe()
    pid = os.fork()
    if pid:
        os.close(write)
        return pid, read
    code, outcome = 1, {"error": "did not start"}
    try:
        os.close(read)
        signal.signal(signal.SIGALRM, _alarm)
        signal.alarm(WAIT * 2)
        outcome = {"ok": target(*args)}
        code = 0
    except BaseException:
        outcome = {"error": traceback.format_exc()}
    finally:
        with contextlib.suppress(BaseException):
            os.write(write, json.dumps(outcome).encode())
        os._exit(code)


def outcomes(children: list[tuple[int, int]], within: float) -> list[Any]:
    """What each child wrote, once all have exited (killed, by pid, past ``within`` s)."""
    deadline = time.monotonic() + within
    output = {fd: b"" for _, fd in children}
    open_fds = set(output)
    while open_fds and time.monotonic() < deadline:
        ready, _, _ = select.select(list(open_fds), [], [], max(0.0, deadline - time.monotonic()))
        for fd in ready:
            chunk = os.read(fd, 1 << 16)
            if chunk:
                output[fd] += chunk
            else:
                open_fds.discard(fd)
    codes = [reap(pid, deadline) for pid, _ in children]
    for fd in output:
        os.close(fd)
    results = []
    for (pid, fd), code in zip(children, codes, strict=True):
        text = output[fd].decode(errors="replace")
        assert text, f"fork child {pid} wrote nothing within {within} s (exit status {code})"
        outcome = json.loads(text)
        assert "ok" in outcome, f"fork child {pid} failed:\n{outcome['error']}"
        results.append(outcome["ok"])
    return results


def reap(pid: int, deadline: float) -> int:
    """The child's exit status; SIGKILLed if it has not exited by ``deadline``."""
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return os.waitpid(pid, 0)[1]


class InThread:
    """``target(*args)`` in a thread of this process, so that a wait that never
    returns (a child read its answer) fails the test instead of hanging it."""

    def __init__(self, target: Callable[..., Any], *args: Any) -> None:
        self.outcome: list[Any] = []
        self.thread = threading.Thread(target=self._run, args=(target, *args), daemon=True)
        self.thread.start()

    def _run(self, target: Callable[..., Any], *args: Any) -> None:
        try:
            self.outcome.append(("ok", target(*args)))
        except BaseException as exc:
            self.outcome.append(("error", exc))

    def result(self, within: float = WAIT * 2) -> Any:
        self.thread.join(within)
        assert self.outcome, f"the parent's call did not return within {within} s"
        kind, value = self.outcome[0]
        if kind == "error":
            raise value
        return value


def within(target: Callable[..., Any], *args: Any) -> Any:
    """``target(*args)`` in the parent, failing (not hanging) past WAIT * 2 s."""
    return InThread(target, *args).result()


def _use(backend: Any) -> Tree:
    before = Tree(None, backend=backend)
    before.enqueue("fan_of", ["before"])
    assert before.wait(timeout=WAIT) == "2.0 / 2.0"
    return before


def used(backend: Any) -> Tree:
    """The parent uses the backend before it forks: a run enqueued and waited on."""
    return within(_use, backend)


# --- os.fork ---------------------------------------------------------------------------------------
def test_a_forked_child_and_its_parent_each_get_their_own_answers(backend):
    before = used(backend)
    [child] = [fork(child_runs, before, backend, "child", 4)]
    parent = within(own_runs, backend, "parent", 3)
    [got] = outcomes([child], WAIT * 2)
    assert got == {"before": "2.0 / 2.0", **expected("child", 4)}
    assert parent == expected("parent", 3)
    assert within(before.update_progress) == "2.0 / 2.0"


def test_several_forked_children_run_at_once_while_the_parent_runs_too(backend):
    before = used(backend)
    parent = InThread(own_runs, backend, "parent", 6)  # (its requests in flight while the children fork)
    children = [fork(child_runs, before, backend, f"child{n}", 3 + n) for n in range(3)]
    got = outcomes(children, WAIT * 2)
    assert got == [{"before": "2.0 / 2.0", **expected(f"child{n}", 3 + n)} for n in range(3)]
    assert parent.result() == expected("parent", 6)
    assert within(own_runs, backend, "after", 2) == expected("after", 2)


def test_a_grandchild_gets_its_own_answers_too(backend):
    before = used(backend)

    def child_then_grandchild() -> Any:
        grandchild = fork(child_runs, before, backend, "grandchild", 2)
        mine = child_runs(before, backend, "child", 3)
        return [mine, *outcomes([grandchild], WAIT)]

    [got] = outcomes([fork(child_then_grandchild)], WAIT * 2)
    assert got == [{"before": "2.0 / 2.0", **expected(name, width)} for name, width in (("child", 3),
                                                                                           ("grandchild", 2))]


# --- multiprocessing's fork start method -----------------------------------------------------------
def _process_main(conn: Any, before: packmule.Runner, backend: Any, tag: str, width: int) -> None:
    try:
        conn.send(("ok", child_runs(before, backend, tag, width)))
    except BaseException:
        conn.send(("error", traceback.format_exc()))


def test_multiprocessing_fork_children_and_the_parent_each_get_their_own_answers(backend):
    before = used(backend)
    pipes = [FORK.Pipe(duplex=False) for _ in range(3)]
    procs = [FORK.Process(target=_process_main, args=(send, before, backend, f"mp{n}", 2 + n), daemon=True)
             for n, (_, send) in enumerate(pipes)]
    for proc in procs:
        proc.start()
    try:
        parent = within(own_runs, backend, "parent", 4)
        got = []
        for n, (receive, _) in enumerate(pipes):
            assert receive.poll(WAIT * 2), f"multiprocessing child {n} sent nothing within {WAIT * 2} s"
            kind, value = receive.recv()
            assert kind == "ok", f"multiprocessing child {n} failed:\n{value}"
            got.append(value)
    finally:
        for proc in procs:
            proc.join(WAIT)
            if proc.is_alive():
                proc.kill()
                proc.join()
    assert got == [{"before": "2.0 / 2.0", **expected(f"mp{n}", 2 + n)} for n in range(3)]
    assert parent == expected("parent", 4)
    assert [proc.exitcode for proc in procs] == [0, 0, 0]


_pool_backend: Any = None  # what a pool's forked workers find (a backend is not sent to them)


def _pool_task(tag_width: tuple[str, int]) -> dict[str, Any]:
    return own_runs(_pool_backend, *tag_width)


def test_a_multiprocessing_fork_pool_runs_and_waits_on_runs(backend):
    global _pool_backend
    used(backend)
    _pool_backend = backend
    tasks = [(f"pool{n}", 2 + n % 3) for n in range(6)]
    try:
        with FORK.Pool(3) as pool:
            got = pool.map_async(_pool_task, tasks).get(timeout=WAIT * 2)
    finally:
        _pool_backend = None
    assert got == [expected(tag, width) for tag, width in tasks]
    assert within(own_runs, backend, "parent", 3) == expected("parent", 3)


# --- push_progress_updates -------------------------------------------------------------------------
def pushed_progress(runner: Tree, width: int) -> str:
    """In a child: a run of the parent's pushing Runner, followed only through current_progress."""
    runner.enqueue("fan_of", [f"pushed:{k}" for k in range(width)])
    deadline = time.monotonic() + WAIT
    seen = [str(runner.current_progress)]
    while seen[-1] != f"{width + 1}.0 / {width + 1}.0" and time.monotonic() < deadline:
        time.sleep(0.05)
        if str(runner.current_progress) != seen[-1]:
            seen.append(str(runner.current_progress))
    assert seen[-1] == f"{width + 1}.0 / {width + 1}.0", f"current_progress went only {seen}"
    return seen[-1]


def test_a_fork_child_of_a_runner_that_pushes_progress_pushes_its_own(backend):
    used(backend)
    runner = Tree(None, True, backend=backend)  # push_progress_updates: a thread of this process reads it
    assert within(lambda: runner.current_progress) == "0.0 / 0.0"
    parent = InThread(own_runs, backend, "parent", 5)
    [got] = outcomes([fork(pushed_progress, runner, 5)], WAIT * 2)
    assert got == "6.0 / 6.0"
    assert parent.result() == expected("parent", 5)
    deadline = time.monotonic() + WAIT  # the parent's thread goes on, and now sees the child's run
    while runner.current_progress != "6.0 / 6.0" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert runner.current_progress == "6.0 / 6.0"
