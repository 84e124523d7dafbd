"""DESIGN.md section 3, "bad input fails that job or that call, and nothing
else", as tests: values that cannot be stored, jobs that kill their worker,
big payloads, refused enqueues, a worker killed inside a commit."""

from __future__ import annotations

import time

import pytest

import packmule

from .faulty import Faulty
from .harness import Harness
from .runners import lines

WAIT = 30  # s: far beyond each wait's need (a run a kill left half-committed waits for a stall, then recounts)
CRASHES = 25  # s: a few worker deaths and respawns (a few seconds); a queue that keeps a dead worker's jobs fails here


def pool_is_whole(harness: Harness, size: int, within: float = 20.0) -> bool:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if len(harness.worker_pids()) >= size:
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("method, kind", [("returns_lock", "lock"), ("returns_generator", "generator")])
def test_a_value_that_cannot_be_pickled_fails_its_job_and_the_workers_keep_serving(backend, method, kind):
    runner = Faulty(backend=backend)
    runner.enqueue(method)
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.total, progress.failed) == (1, 1, 1)
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value()
    assert err.value.method == method and err.value.exc_type == "UnstorableValue"
    assert "cannot be pickled" in err.value.message and kind in err.value.message
    # an unrelated run on the same workers completes right after it
    other = Faulty(backend=backend)
    other.enqueue_each("fine", range(40))
    assert other.wait(timeout=WAIT) == "40.0 / 40.0"


def test_a_2_mb_return_value_works(backend):
    runner = Faulty(backend=backend)
    runner.enqueue("big_value", 2_000_000)
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    assert runner.get_return_value() == b"v" * 2_000_000


def test_a_20_mb_argument_works(backend):
    runner = Faulty(backend=backend)
    runner.enqueue("measure", b"a" * 20_000_000)
    assert runner.wait(timeout=60) == "1.0 / 1.0"
    assert runner.get_return_value() == 20_000_000


def test_a_runner_with_20_mb_of_state_works(backend):
    runner = Faulty(backend=backend)
    runner.payload = b"s" * 20_000_000
    runner.enqueue("fine", 7)
    assert runner.wait(timeout=60) == "1.0 / 1.0"
    assert runner.get_return_value() == 7


def test_an_argument_over_the_payload_limit_is_refused_and_changes_no_count(backend, monkeypatch):
    runner = Faulty(backend=backend)
    runner.enqueue("fine", 1)
    before = runner.wait(timeout=WAIT)
    monkeypatch.setenv("PACKMULE_MAX_PAYLOAD", "100000")
    with pytest.raises(ValueError) as err:
        runner.enqueue("measure", b"a" * 200_000)
    assert "200,0" in str(err.value) and "100,000" in str(err.value) and "PACKMULE_MAX_PAYLOAD" in str(err.value)
    with pytest.raises(ValueError):
        runner.enqueue_each("measure", [b"small", b"a" * 200_000])
    assert runner.update_progress() == before == "1.0 / 1.0"
    monkeypatch.delenv("PACKMULE_MAX_PAYLOAD")
    runner.enqueue("fine", 2)
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.total, progress.failed) == (2, 2, 0)


def test_a_job_that_kills_its_worker_every_time_fails_for_good_after_max_crashes(harness, tmp_path):
    size = len(harness.worker_pids())
    runner = Faulty(backend=harness.backend)
    path = str(tmp_path / "deaths")
    runner.enqueue("exits", path)
    progress = runner.wait(timeout=CRASHES)
    assert (progress.done, progress.total, progress.failed) == (1, 1, 1)
    assert len(lines(path)) == Faulty.max_crashes == 3
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value()
    assert err.value.exc_type == "WorkerCrashed" and "died 3 times" in err.value.message
    assert pool_is_whole(harness, size)
    other = Faulty(backend=harness.backend)
    other.enqueue_each("fine", range(20))
    assert other.wait(timeout=WAIT) == "20.0 / 20.0"


def test_a_killer_inside_a_bundle_fails_alone(harness, tmp_path):
    runner = Faulty(backend=harness.backend)
    path = str(tmp_path / "deaths")
    runner.enqueue_each("exits_if", range(10), 4, path)
    progress = runner.wait(timeout=CRASHES)
    assert (progress.done, progress.total, progress.failed) == (10, 10, 1)
    # three deaths alone; before, maybe one with its bundle and one with others of a batch
    assert 3 <= len(lines(path)) <= 5


def test_a_single_kill_still_runs_the_job_again(backend, tmp_path):
    runner = Faulty(backend=backend)
    path = str(tmp_path / "deaths")
    runner.enqueue("exits_first_time", path)
    assert runner.wait(timeout=CRASHES) == "1.0 / 1.0"
    assert runner.get_return_value() == "second life"
    assert len(lines(path)) == 1


@pytest.mark.parametrize("point, width", [("after_add", 5), ("after_counts", 1)])
def test_a_worker_killed_between_the_two_commit_writes_leaves_a_run_that_completes(backend, tmp_path, point,
                                                                                   width):
    # Given a fan-in whose second input's worker dies after it stored the
    # input's value but before it counted it (and told the continuation), or
    # after it counted it but before it queued the continuation it completed
    runner = Faulty(backend=backend)
    path = str(tmp_path / "killed")
    runner.enqueue("fan", width, str(path), point)
    # Then the run still completes, with exact counts and the right value
    progress = runner.wait(timeout=WAIT)
    assert len(lines(path)) == 1
    assert (progress.done, progress.total, progress.failed) == (width + 1, width + 1, 0)
    assert runner.get_return_value() == sum(range(width))


def test_a_blocking_deferred_result_whose_inputs_worker_died_before_counting_them_ends_at_exact_counts(backend,
                                                                                                      tmp_path):
    # Given jobs whose worker stored their values, then died before counting them
    runner = Faulty(backend=backend)
    runner.wait_timeout = WAIT
    path = str(tmp_path / "killed")
    jobs = runner.enqueue_each("killed_after_add", [1, 2, 3], path)
    # Then deferred_result gets the values, and the counts include its jobs once it returns
    assert runner.deferred_result("total", jobs) == 6
    assert runner.update_progress() == "3.0 / 3.0"
    assert len(lines(path)) == 1


def test_a_run_counted_complete_has_its_value_even_if_the_worker_dies_right_after(backend, tmp_path):
    # Given a job whose value is its continuation's, and a worker killed just
    # after the continuation's commit counted both done
    runner = Faulty(backend=backend)
    path = str(tmp_path / "killed")
    runner.enqueue("hands_off", 4, path)
    progress = runner.wait(timeout=WAIT)
    # Then the moment the run reads complete, the root's value is there
    assert runner.get_return_value() == 0 + 1 + 2 + 3
    assert len(lines(path)) == 1
    assert (progress.done, progress.total, progress.failed) == (5, 5, 0)
