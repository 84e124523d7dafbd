"""Jobs in time: ``delay=``, ``at=`` and ``priority=`` of ``enqueue``,
``enqueue_each`` and ``enqueue_call``, the same on every backend.

Times are read with ``time.time()`` in the driver and in the jobs (one clock
for every process of this machine).  A delayed job must never start before its
time; it must start within ``LATE`` seconds of it (a worker's poll, on a
loaded machine, with room to spare).
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import random
import threading
import time
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from packmule.backends.base import Backend

import packmule

from .harness import Harness
from .runners import Timed, lines, stamps
from .test_backend_contract import connect

LATE = 2.0  # s after its time within which a due job must have started
WAIT = 30.0  # s a test waits for a run
SPAWN = multiprocessing.get_context("spawn")


def _started(path: str) -> float:
    (_, at), = stamps(path)
    return at


def test_a_delayed_job_waits_in_the_queue_and_runs_once_its_time_has_come(harness: Harness, tmp_path: Any) -> None:
    runner = Timed(backend=harness.backend)
    path = str(tmp_path / "stamps")
    # When a job is queued with a delay of 2 s
    before = time.time()
    runner.enqueue("stamp", path, "late", delay=2)
    # Then it counts in the run at once, and waits in the queue, not in a worker
    assert runner.update_progress() == "0.0 / 1.0"
    assert harness.backend.queue.stats().delayed >= 1
    time.sleep(1.5)
    assert runner.update_progress() == "0.0 / 1.0" and not lines(path)
    # and it runs once 2 s have passed, within a poll
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    assert before + 2 <= _started(path) <= before + 2 + LATE


@pytest.mark.parametrize("delay", [0.3, 1.4, timedelta(milliseconds=2600)])
def test_a_delay_of_a_fraction_of_a_second_is_honoured_on_every_backend(harness: Harness, tmp_path: Any,
                                                                        delay: float | timedelta) -> None:
    # (beanstalkd keeps whole seconds: it gives the job out early, and the worker holds it until its time)
    seconds = delay.total_seconds() if isinstance(delay, timedelta) else delay
    runner = Timed(backend=harness.backend)
    path = str(tmp_path / "stamps")
    before = time.time()
    runner.enqueue("stamp", path, "x", delay=delay)
    runner.wait(timeout=WAIT)
    assert before + seconds <= _started(path) <= before + seconds + LATE


def test_a_job_queued_for_an_aware_datetime_runs_from_then(harness: Harness, tmp_path: Any) -> None:
    runner = Timed(backend=harness.backend)
    path = str(tmp_path / "stamps")
    at = datetime.now(timezone(timedelta(hours=-5))) + timedelta(seconds=1.5)
    runner.enqueue_each("stamp", [path], "x", at=at)  # (enqueue_each: its first argument is the item)
    runner.wait(timeout=WAIT)
    assert at.timestamp() <= _started(path) <= at.timestamp() + LATE
    # and a time already past runs at once
    past = Timed(backend=harness.backend)
    past.enqueue("stamp", str(tmp_path / "past"), "x", at=datetime.now(timezone.utc) - timedelta(days=1))
    assert past.wait(timeout=WAIT) == "1.0 / 1.0"


def test_cancel_drops_jobs_that_wait_for_their_time(harness: Harness, tmp_path: Any) -> None:
    runner = Timed(backend=harness.backend)
    path = str(tmp_path / "stamps")
    for tag in "abc":
        runner.enqueue("stamp", path, tag, delay=1.0)
    runner.cancel()
    with pytest.raises(packmule.Cancelled):
        runner.wait(timeout=WAIT)
    # Then, past their time, none of them ran, and none is left in the queue
    deadline = time.monotonic() + WAIT
    while _queued(harness.backend):
        assert time.monotonic() < deadline, "the cancelled jobs stayed in the queue"
        time.sleep(0.1)
    assert lines(path) == []


def _queued(backend: Backend) -> int:
    stats = backend.queue.stats()
    return stats.ready + stats.reserved + stats.delayed


BAD: list[tuple[dict[str, Any], str]] = [
    ({"at": datetime(2030, 1, 1)}, "naive"),
    ({"delay": -1}, "delay=-1"),
    ({"delay": float("nan")}, "finite"),
    ({"delay": "5"}, "seconds"),
    ({"delay": 1, "at": datetime.now(timezone.utc)}, "not both"),
    ({"delay": 10**12}, "cannot wait"),
    ({"at": datetime.now(timezone.utc) + timedelta(days=10**5)}, "cannot wait"),
    ({"priority": 101}, "-100 to 100"),
    ({"priority": -101}, "-100 to 100"),
    ({"priority": 1.5}, "-100 to 100"),
    ({"priority": True}, "-100 to 100"),
]


@pytest.mark.parametrize(("options", "says"), BAD, ids=[says for _, says in BAD])
def test_bad_timing_is_refused_at_the_call_with_nothing_queued(harness: Harness, tmp_path: Any,
                                                              options: dict[str, Any], says: str) -> None:
    runner = Timed(backend=harness.backend)
    path = str(tmp_path / "stamps")
    with pytest.raises(ValueError, match=says):
        runner.enqueue("stamp", path, "x", **options)
    with pytest.raises(ValueError, match=says):
        runner.enqueue_each("stamp", [path], "x", **options)
    with pytest.raises(ValueError, match=says):
        runner.enqueue_call("stamp", (path, "x"), **options)
    assert runner.update_progress() == "0.0 / 0.0"


def test_a_bad_priority_on_a_class_is_refused_when_the_class_is_defined() -> None:
    with pytest.raises(ValueError, match="Bad.priority must be an int from -100 to 100"):
        class Bad(Timed):
            priority = 500


def test_enqueue_call_gives_a_job_keywords_named_like_the_options(harness: Harness) -> None:
    runner = Timed(backend=harness.backend)
    at = datetime.now(timezone.utc)
    ref = runner.enqueue_call("echo", (1, 2), {"delay": 7, "at": at, "priority": "high"}, delay=0.2, priority=3)
    runner.wait(timeout=WAIT)
    assert runner.get_return_value(ref) == [[1, 2], {"delay": 7, "at": at, "priority": "high"}]
    with pytest.raises(TypeError, match="kwargs= takes a dict"):
        runner.enqueue_call("echo", (), [("delay", 1)])  # type: ignore[arg-type]


def _serve(env: Mapping[str, str], stop: str) -> None:
    """One worker process, serving the backend ``env`` names until ``stop`` exists."""
    from packmule._worker.serve import serve

    done = threading.Event()

    def watch() -> None:
        while not os.path.exists(stop):
            time.sleep(0.05)
        done.set()

    threading.Thread(target=watch, daemon=True).start()
    serve(connect(env), done, reserve_timeout=0.2)


@contextlib.contextmanager
def one_worker(bare: Harness, tmp_path: Any) -> Iterator[None]:
    """Exactly one worker process serves ``bare``: one started here, on the
    ``env`` that reaches it (a backend that starts workers itself starts them
    for the harness's backend, not for ``bare``)."""
    stop = str(tmp_path / "stop-serving")
    proc = SPAWN.Process(target=_serve, args=(dict(bare.env), stop), daemon=True)
    proc.start()
    try:
        yield
    finally:
        open(stop, "w").close()
        proc.join(10)
        if proc.is_alive():
            proc.kill()


def test_once_the_one_worker_frees_jobs_run_in_the_order_of_their_priority(bare: Harness, tmp_path: Any) -> None:
    started, gate, path = (str(tmp_path / name) for name in ("started", "gate", "stamps"))
    runner = Timed(backend=bare.backend)
    with one_worker(bare, tmp_path):
        # Given the one worker held busy
        runner.enqueue("hold", started, gate)
        deadline = time.monotonic() + WAIT
        while not lines(started):
            assert time.monotonic() < deadline, "the job that holds the worker did not start"
            time.sleep(0.02)
        assert bare.backend.queue.stats().reserved == 1
        # When 100 jobs of mixed priorities are queued, some one by one, some in bulk
        rng = random.Random(19)
        queued: list[tuple[int, int]] = []  # (priority, number)
        for n in range(60):
            priority = rng.randint(-10, 10)
            runner.enqueue("stamp", path, f"{priority}:{n}", priority=priority)
            queued.append((priority, n))
        for priority in (-3, 7):  # (one bundle each: one priority, in the order queued)
            n = len(queued)
            runner.enqueue_each("stamp", [path] * 20, f"{priority}:{n}", priority=priority)
            queued += [(priority, n)] * 20
        # and it frees
        open(gate, "w").close()
        assert runner.wait(timeout=WAIT) == "101.0 / 101.0"
    # Then they ran higher priority first, and in the order queued within one priority
    ran = [(int(tag.split(":")[0]), int(tag.split(":")[1])) for tag, _ in stamps(path)]
    assert ran == sorted(queued, key=lambda job: (-job[0], job[1]))


def test_jobs_that_fall_due_while_every_worker_is_busy_run_when_one_frees(harness: Harness, tmp_path: Any) -> None:
    started, gate, path = (str(tmp_path / name) for name in ("started", "gate", "stamps"))
    busy = Timed(backend=harness.backend)
    # Given every worker held busy: jobs that hold one, queued one at a time, each once the one before
    # runs, until one waits 2 s in the queue (a worker running one takes no other, so each goes to a
    # free worker; queued all at once, one worker could reserve several in one batch and leave another
    # free), then 3 more (a worker that was free after all takes one of those before the due jobs)
    most = max(len(harness.pids()), harness.backend.queue.stats().workers) + 1
    for n in range(1, most + 1):
        busy.enqueue("hold", started, gate)
        queued = time.monotonic()
        while len(lines(started)) < n and time.monotonic() - queued < 2.0:
            time.sleep(0.02)
        if len(lines(started)) < n:
            break  # (every worker runs one)
    else:
        pytest.fail(f"{most} jobs that hold a worker all ran at once: more workers than the backend counts")
    for _ in range(3):
        busy.enqueue("hold", started, gate)
    runner = Timed(backend=harness.backend)
    runner.enqueue_each("stamp", [path] * 30, "due", delay=0.2)
    time.sleep(1.0)  # (they are due now; every worker is busy)
    assert runner.update_progress() == "0.0 / 30.0"
    open(gate, "w").close()
    assert runner.wait(timeout=WAIT) == "30.0 / 30.0"
    assert len(stamps(path)) == 30
    busy.wait(timeout=WAIT)
