"""What the dashboard reads, on every backend: the registry of recent runs,
the live workers' beats, and the totals from every worker (packmule/_model/registry.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import uuid

import psutil

from packmule._driver.run_state import RunState
from packmule._driver.watcher import Watcher
from packmule._model.keys import pointer
from packmule._model.registry import BEAT, RUN_SLOTS
from packmule._transport.codec import signer_for

from .faulty import Faulty
from .harness import Harness
from .runners import Flaky, Plain, SleepyRunner, Worky, lines

WAIT = 15  # s


def unique(tag: str) -> str:
    return f"{tag}-{uuid.uuid4().hex[:8]}"


def test_runs_are_listed_newest_first_with_the_progress_update_progress_shows(backend):
    # Given two runs, one after the other, both complete
    tag = unique("listed")
    before = time.time()
    first, second = Plain(f"{tag}-a", backend=backend), Plain(f"{tag}-b", backend=backend)
    first.enqueue_each("work", range(3))
    first.wait(timeout=WAIT)
    second.enqueue_each("work", range(5))
    second.wait(timeout=WAIT)
    # Then the registry lists both, newest first, exactly as update_progress() reads them
    runs = Watcher(backend).runs(name_filter=tag)
    assert [r.name for r in runs] == [second.name, first.name]
    assert [r.progress for r in runs] == [second.update_progress(), first.update_progress()] == \
        ["5.0 / 5.0", "3.0 / 3.0"]
    assert [r.state for r in runs] == ["complete", "complete"]
    assert runs[0].generation == backend.store.get_many([pointer(second.name)])[pointer(second.name)].decode()
    assert before <= runs[1].started_at <= runs[0].started_at <= time.time()
    assert all(r.eta == 0.0 for r in runs)


def test_a_running_run_reads_running_with_a_rate_then_complete_with_its_value(backend):
    runner = SleepyRunner(unique("live"), backend=backend)
    runner.nap_seconds = 0.05
    runner.run_async(40)
    watcher = Watcher(backend)
    deadline = time.monotonic() + WAIT
    seen = set()
    while not runner.update_progress().complete:
        assert time.monotonic() < deadline, f"the run did not complete: {runner.update_progress()}"
        info = watcher.run(runner.name)
        assert info is not None
        seen.add(info.state)
        if info.state == "running" and info.done:
            assert info.rate is not None and info.rate > 0
        time.sleep(0.05)
    info = watcher.run(runner.name)
    assert info is not None and "running" in seen
    assert (info.state, info.progress, info.complete) == ("complete", "41.0 / 41.0", True)
    assert watcher.value_repr(info) == repr(runner.get_return_value())


def test_a_run_that_reads_complete_lists_every_failure(backend):
    # Given a job that fails for good, whose worker pauses a second after the counts
    runner = Faulty(unique("listed"), backend=backend, max_retries=0)
    runner.enqueue("fails_listed_late", 1.0)
    # When the run reads complete
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    # Then its failure is already listed
    watcher = Watcher(backend)
    info = watcher.run(runner.name)
    assert info is not None and [f["message"] for f in watcher.failures(info)] == ["listed late"]


def test_failed_and_cancelled_runs_say_so_with_the_failures(backend, tmp_path):
    # a run whose job fails for good
    failing = Flaky(unique("failing"), backend=backend, max_retries=0)
    failing.enqueue("always", "tagged")
    failing.enqueue("ok", 1)
    failing.wait(timeout=WAIT)
    watcher = Watcher(backend)
    info = watcher.run(failing.name)
    assert info is not None and (info.state, info.failed, info.progress) == ("failed", 1, "2.0 / 2.0")
    [failure] = watcher.failures(info)
    assert (failure["method"], failure["exc_type"]) == ("always", "ValueError")
    assert "tagged" in failure["args"] and "Traceback" in failure["traceback"]
    assert watcher.value_repr(info) is None  # (nothing recorded)
    # a cancelled run
    slow = Worky(unique("cancelled"), backend=backend)
    slow.enqueue_each("stamp_then_sleep", range(6), str(tmp_path / "starts"), 0.5)
    watcher.cancel(slow.name)
    info = watcher.run(slow.name)
    assert info is not None and info.state == "cancelled"


def test_forget_through_the_watcher_removes_the_run(backend):
    runner = Plain(unique("forgotten"), backend=backend)
    runner.enqueue("work", 1)
    runner.wait(timeout=WAIT)
    watcher = Watcher(backend)
    watcher.forget(runner.name)
    assert watcher.run(runner.name) is None
    assert Plain(runner.name, backend=backend).update_progress() == "0.0 / 0.0"
    assert watcher.runs(name_filter=runner.name) == []  # (not listed as a lost run)


def test_the_registry_keeps_the_last_runs_and_no_more(backend):
    # Given more run starts than the registry holds
    tag = unique("ring")
    signer = signer_for(backend)
    names = [f"{tag}-{i}" for i in range(RUN_SLOTS + 60)]
    for name in names:
        RunState(backend, signer, name, 600).start_or_join()
    # Then it lists the newest RUN_SLOTS of them, newest first
    listed = Watcher(backend).runs(limit=10 * RUN_SLOTS)
    assert [r.name for r in listed] == names[::-1][:RUN_SLOTS]
    assert [r.name for r in Watcher(backend).runs(name_filter=f"{tag}-10", limit=5)] == \
        [n for n in names[::-1][:5] if f"{tag}-10" in n]


def _serving(pids: list[int]) -> list[int]:
    """Those of these processes that run packmule's worker loop (a harness that
    cannot tell its workers gives every process under the test's)."""
    out = []
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            cmdline = " ".join(psutil.Process(pid).cmdline())
            if "packmule._worker.local_process" in cmdline or "packmule._worker.supervisor --child" in cmdline:
                out.append(pid)
    return out


def test_every_worker_beats_with_what_it_runs_and_a_silent_one_leaves_within_three_beats(harness: Harness,
                                                                                        backend, tmp_path):
    watcher = Watcher(backend)
    # every worker process beats, and only the harness's processes do
    deadline = time.monotonic() + 2 * BEAT + 1
    while not set(_serving(harness.worker_pids())) <= {w.pid for w in watcher.workers()}:
        assert time.monotonic() < deadline, (f"workers {_serving(harness.worker_pids())} do not all beat: "
                                             f"{[w.pid for w in watcher.workers()]}")
        time.sleep(0.2)
    live = watcher.workers()
    assert live and {w.pid for w in live} <= set(harness.worker_pids())
    assert all(w.concurrency >= 1 and w.rss > 0 and w.host and w.last_seen <= time.time() for w in live)
    # a job running now shows on the beat of the process that runs it, by job id
    runner = Worky(unique("shown"), backend=backend)
    pid_file = str(tmp_path / "pid")
    ref = runner.enqueue("pid_then_sleep", pid_file, 2 * BEAT + 1)
    deadline = time.monotonic() + WAIT
    while not (holders := [w for w in watcher.workers() if ref.id in w.running]):
        assert time.monotonic() < deadline, "no worker's beat showed the running job"
        time.sleep(0.2)
    assert [w.pid for w in holders] == [int(pid) for pid in lines(pid_file)]
    runner.wait(timeout=WAIT)
    # a worker that stops beating leaves the list within three beats, and comes back when it beats again
    stopped_pid = holders[0].pid
    os.kill(stopped_pid, signal.SIGSTOP)
    try:
        stopped = time.monotonic()
        while stopped_pid in {w.pid for w in watcher.workers()}:
            assert time.monotonic() - stopped < 3 * BEAT + 1.5, "a stopped worker stayed on the list past three beats"
            time.sleep(0.2)
    finally:
        os.kill(stopped_pid, signal.SIGCONT)
    deadline = time.monotonic() + 2 * BEAT + 1
    while stopped_pid not in {w.pid for w in watcher.workers()}:
        assert time.monotonic() < deadline, "a resumed worker did not beat again"
        time.sleep(0.2)


def _settled_totals(watcher: Watcher) -> tuple[int, int, int, int]:
    """The totals once no worker has anything left to publish (two beats without change)."""
    last = None
    deadline = time.monotonic() + WAIT
    while True:
        m = watcher.metrics()
        now = (m.done, m.failed, m.retried, m.duration_count)
        if now == last:
            return now
        assert time.monotonic() < deadline, "the totals kept changing with no job running"
        last = now
        time.sleep(BEAT + 0.5)


def test_the_totals_rise_by_exactly_the_jobs_of_a_run(backend, tmp_path):
    watcher = Watcher(backend)
    done, failed, retried, timed = _settled_totals(watcher)
    # a run of 30 jobs, one of which fails once and then succeeds, and one that fails for good
    runner = Flaky(unique("totals"), backend=backend, max_retries=1, retry_delay=0.1)
    runner.enqueue_each("ok", range(28))
    runner.enqueue("fail_times", str(tmp_path / "once"), 1)
    runner.enqueue("always", "x")
    runner.wait(timeout=WAIT)
    assert runner.update_progress() == "30.0 / 30.0"
    # Then, once the workers have published, the totals rose by exactly that
    deadline = time.monotonic() + 3 * BEAT + WAIT
    while watcher.metrics().done < done + 30:
        assert time.monotonic() < deadline, f"done total {watcher.metrics().done}, expected {done + 30}"
        time.sleep(0.2)
    after = _settled_totals(watcher)
    assert after[:3] == (done + 30, failed + 1, retried + 2)  # (retries: one of fail_times, one of always)
    assert after[3] >= timed + 32  # every execution is timed: 30 jobs and 2 retried attempts
    metrics = watcher.metrics()
    assert metrics.duration_buckets[-1] == (float("inf"), metrics.duration_count)
    assert metrics.workers == len(watcher.workers()) >= 1


def test_the_queue_is_counted_per_server(backend):
    runner = Plain(unique("queue"), backend=backend)
    refs = runner.enqueue_each("work", range(4))
    runner.wait(timeout=WAIT)
    per_server = Watcher(backend).queue()
    assert {ref.server for ref in refs} <= set(per_server)
    total = backend.queue.stats()
    assert sum(s.ready + s.reserved + s.delayed + s.buried for s in per_server.values()) == \
        total.ready + total.reserved + total.delayed + total.buried
