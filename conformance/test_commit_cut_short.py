"""A commit cut short, and the job run again (``packmule._worker.recovery``): at no
moment is ``done`` over ``total``, and the run completes with exact counts,
also while other runs keep the queue busy (a recount queues a lost
continuation only when nothing at all is queued or running).  And an outside
enqueue whose put failed takes back only the jobs that did not run."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

import packmule
from packmule._model.keys import prefix

from .faulty import Faulty
from .harness import Harness
from .runners import lines

WAIT = 30  # s: far beyond each run's need (a killed worker is replaced in a few seconds)


def read_until_complete(runner: packmule.Runner, timeout: float = WAIT) -> tuple[packmule.Progress, list[str]]:
    """Read the run's progress every 10 ms until it is complete; the last read,
    and every read that had ``done`` over ``total``."""
    deadline = time.monotonic() + timeout
    over: list[str] = []
    while True:
        progress = runner.update_progress()
        if progress.done > progress.total:
            over.append(str(progress))
        if progress.complete or time.monotonic() > deadline:
            return progress, over
        time.sleep(0.01)


@pytest.fixture
def busy(harness: Harness, tmp_path) -> Iterator[None]:  # type: ignore[no-untyped-def]
    """Another run whose job runs throughout the test, so that the queue is never quiet."""
    holder = Faulty(backend=harness.backend)
    started, release = str(tmp_path / "held"), tmp_path / "release"
    holder.enqueue("holds", started, str(release), 2 * WAIT)
    deadline = time.monotonic() + WAIT
    while not lines(started):
        assert time.monotonic() < deadline, "the holding job did not start"
        time.sleep(0.02)
    try:
        yield
    finally:
        release.touch()
        holder.wait(timeout=WAIT)


def test_a_job_run_again_after_its_first_worker_stored_its_enqueues_and_died_counts_them_before_they_run(
        backend, tmp_path):
    # Given a job whose worker is killed after it stored its value and commit
    # marker, before it counted itself and its 20 children
    runner = Faulty(backend=backend)
    path = str(tmp_path / "killed")
    runner.enqueue("enqueues_then_dies", 20, path)
    # Then its second run counts the children in total before it queues them:
    # no read has done over total, and the run completes exactly
    progress, over = read_until_complete(runner)
    assert over == []
    assert (progress.done, progress.total, progress.failed) == (21, 21, 0)
    assert runner.get_return_value() == 20
    assert len(lines(path)) == 1


@pytest.mark.parametrize("enqueues", [False, True], ids=["delivered-again", "run-again"])
def test_a_continuation_whose_notifier_died_before_queueing_it_runs_while_the_queue_is_busy(
        backend, tmp_path, busy, enqueues):
    # Given a continuation whose only input's worker is killed after its count
    # completed the continuation's and before it queued it, while another run
    # keeps the queue busy
    runner = Faulty(backend=backend)
    path = str(tmp_path / "killed")
    runner.enqueue("fan_busy", path, enqueues)
    # Then the input, delivered again (or run again), queues the continuation
    progress, over = read_until_complete(runner)
    assert over == []
    assert (progress.done, progress.total, progress.failed) == ((3, 3, 0) if enqueues else (2, 2, 0))
    assert runner.get_return_value() == 5
    assert len(lines(path)) == 1


def _failing_put(backend: packmule.backends.base.Backend, monkeypatch: pytest.MonkeyPatch,
                 until: object) -> None:
    """Make the queue's next put queue its jobs, wait for ``until()``, then raise
    BackendUnavailable, as a server that failed after it took them would."""
    real = backend.queue.put_many

    def put_then_fail(jobs, elsewhere=None):  # type: ignore[no-untyped-def]
        real(jobs, elsewhere)
        deadline = time.monotonic() + WAIT
        while not until():  # type: ignore[operator]
            assert time.monotonic() < deadline, "the queued job did not get that far"
            time.sleep(0.01)
        raise packmule.BackendUnavailable("the server failed after it queued the jobs (a test)")

    monkeypatch.setattr(backend.queue, "put_many", put_then_fail)


def test_an_enqueue_whose_put_failed_after_its_job_ran_keeps_counting_that_job(backend, monkeypatch):
    # Given an outside enqueue whose put queued the job, which a worker ran,
    # and then raised
    runner = Faulty(backend=backend)
    _failing_put(backend, monkeypatch, lambda: runner.update_progress().done >= 1)
    with pytest.raises(packmule.BackendUnavailable):
        runner.enqueue("fine", 1)
    monkeypatch.undo()
    # Then the take-back leaves that job counted: it ran and is done
    progress = runner.update_progress()
    assert (progress.done, progress.total, progress.failed) == (1, 1, 0)


def test_a_taken_back_job_that_was_running_and_returned_a_continuation_is_not_counted_done(
        backend, monkeypatch, tmp_path):
    # Given an outside enqueue whose put queued the job and then raised while
    # the job ran: it is taken back (void) while it runs, and then it returns a
    # continuation of 3 jobs
    runner = Faulty(backend=backend)
    started, go = str(tmp_path / "started"), tmp_path / "go"
    _failing_put(backend, monkeypatch, lambda: bool(lines(started)))
    with pytest.raises(packmule.BackendUnavailable):
        runner.enqueue("waits_then_hands_off", 3, started, str(go))
    monkeypatch.undo()
    go.touch()
    # Then its children count, and it does not when its continuation completes:
    # it was taken back from total
    progress, over = read_until_complete(runner)
    assert over == [] and progress.complete
    continuation = prefix(runner.name, runner._gen() or "") + "v:0.3"  # (its 3 children are 0.0 .. 0.2)
    deadline = time.monotonic() + WAIT
    while continuation not in backend.store.get_many([continuation]):
        assert time.monotonic() < deadline, "the continuation did not complete"
        time.sleep(0.01)
    progress = runner.update_progress()
    assert (progress.done, progress.total, progress.failed) == (3, 3, 0)
