"""DESIGN.md section 3, as tests: retries, failures that flow up, re-runs that
count once, workers that die."""

from __future__ import annotations

import contextlib
import os
import signal
import time

import psutil
import pytest

import packmule

from .harness import Harness
from .runners import Flaky, Worky, lines

WAIT = 15  # s: far beyond what each wait needs; a broken backend fails the test through it
RERUN = 8  # s for a job past its time_to_run (1 s) to run again elsewhere


def test_a_job_that_raises_is_retried_then_succeeds(backend, tmp_path):
    runner = Flaky(backend=backend, max_retries=3)
    path = str(tmp_path / "tries")
    ref = runner.enqueue("fail_times", path, 2)
    progress = runner.wait(timeout=WAIT)
    assert runner.get_return_value(ref) == "recovered"
    assert len(lines(path)) == 3
    assert (progress.done, progress.total, progress.failed) == (1, 1, 0)


def test_a_job_that_keeps_raising_fails_for_good_after_max_retries(backend, tmp_path):
    runner = Flaky(backend=backend, max_retries=2)
    path = str(tmp_path / "tries")
    runner.enqueue("fail_times", path, 100)
    progress = runner.wait(timeout=WAIT)
    assert len(lines(path)) == 3  # the first attempt and two retries
    assert (progress.done, progress.total, progress.failed) == (1, 1, 1)
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value()
    assert err.value.method == "fail_times" and err.value.exc_type == "RuntimeError"
    assert "planned failure 3" in err.value.message
    assert "Traceback" in err.value.traceback and "fail_times" in err.value.traceback


def test_a_failed_input_fails_the_deferred_result_naming_the_first_failed_in_order(backend):
    runner = Flaky(backend=backend, max_retries=0)
    jobs = [runner.enqueue("ok", 1), runner.enqueue("always", "second"), runner.enqueue("always", "third")]
    with pytest.raises(packmule.JobFailed) as err:
        runner.deferred_result("collect", jobs)
    assert "always fails: second" in str(err.value)
    assert err.value.job == jobs[1].id


def test_failure_flows_up_to_the_root_with_the_original_error(backend):
    runner = Flaky(backend=backend, max_retries=0)
    runner.enqueue("grandparent")
    progress = runner.wait(timeout=WAIT)
    # grandparent, parent, fine, bad-deep: all done; parent and grandparent failed by their input
    assert (progress.done, progress.total, progress.failed) == (4, 4, 3)
    with pytest.raises(packmule.JobFailed) as err:
        runner.get_return_value()
    text = str(err.value)
    assert "ValueError" in text and "always fails: bad-deep" in text and "Traceback" in text
    assert err.value.method == "always"


def test_a_job_that_runs_twice_counts_once(harness: Harness, tmp_path):
    # Given a job that outlives its time_to_run, so another worker runs it again
    runner = Worky(backend=harness.backend, time_to_run=1)
    path = str(tmp_path / "runs")
    ref = runner.enqueue("pid_then_sleep", path, 4.0, "value")
    deadline = time.monotonic() + WAIT
    while len(lines(path)) < 2:  # a second worker took it up after time_to_run
        assert time.monotonic() < deadline, "the job did not run again"
        time.sleep(0.05)
    progress = runner.wait(timeout=WAIT)
    time.sleep(4.5)  # let both executions finish and commit
    assert (progress.done, progress.total) == (1, 1)
    assert runner.update_progress() == "1.0 / 1.0"
    assert runner.get_return_value(ref) == "value"


def test_a_job_that_enqueued_and_runs_again_past_time_to_run_counts_its_children_once(harness: Harness, tmp_path):
    # Given a job that enqueues 5 children, then outlives its time_to_run the first time it runs
    runner = Worky(backend=harness.backend, time_to_run=1)
    path = str(tmp_path / "runs")
    ref = runner.enqueue("enqueue_then_slow_once", path, 5, 2.5)
    # When it runs again elsewhere, and both executions commit
    assert runner.wait(timeout=WAIT) == "6.0 / 6.0"
    deadline = time.monotonic() + WAIT
    while lines(path).count("end") < 2:
        assert time.monotonic() < deadline, f"the job did not run twice to its end: {lines(path)}"
        time.sleep(0.05)
    time.sleep(1.0)  # the slow execution's commit
    # Then the run counts the job and its children once each
    progress = runner.update_progress()
    assert (progress.done, progress.total, progress.failed) == (6, 6, 0)
    assert runner.get_return_value(ref) == sum(range(5))


def test_touch_keeps_a_long_job_from_running_again(backend, tmp_path):
    runner = Worky(backend=backend, time_to_run=1)
    path = str(tmp_path / "runs")
    runner.enqueue("touching", path, 2.5, 0.2)
    runner.wait(timeout=WAIT)
    time.sleep(1.0)
    assert lines(path) == ["run"]
    assert runner.get_return_value() == "touched"


def test_sigkill_of_a_worker_mid_run_loses_nothing_and_counts_exactly(harness: Harness, tmp_path):
    # Given a run of 8 slow jobs, started, with time_to_run far beyond the test's wait
    runner = Worky(backend=harness.backend, time_to_run=300)
    path = str(tmp_path / "pids")
    runner.enqueue("sleeper_fan", path, 8, 0.5)
    deadline = time.monotonic() + WAIT
    while not [p for p in lines(path) if int(p) in harness.worker_pids()]:
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.02)
    victim = next(int(p) for p in lines(path) if int(p) in harness.worker_pids())
    # When the process running a job is killed
    os.kill(victim, signal.SIGKILL)
    # Then the run completes, exactly, without waiting for time_to_run
    progress = runner.wait(timeout=WAIT)
    assert progress == "9.0 / 9.0" and progress.failed == 0
    assert runner.get_return_value() == sum(range(8))


def not_resumed(pid: int) -> bool:
    """Still stopped, or ended (``packmule worker`` ends a worker process that is
    stopped past its jobs' time_to_run: beanstalkd 1.12 may never time them out)."""
    try:
        return psutil.Process(pid).status() in (psutil.STATUS_STOPPED, psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


def test_a_stopped_worker_past_time_to_run_loses_its_job_to_another_and_counts_once(harness: Harness, tmp_path):
    # Given a job running in a worker process
    runner = Worky(backend=harness.backend, time_to_run=1)
    path = str(tmp_path / "pids")
    ref = runner.enqueue("pid_then_sleep", path, 3.0, "done")
    deadline = time.monotonic() + WAIT
    while not lines(path):
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.01)
    victim = int(lines(path)[0])
    assert victim in harness.worker_pids()
    # When its process is stopped past time_to_run (nothing in it can hand the job back)
    os.kill(victim, signal.SIGSTOP)
    try:
        # Then the job runs again in another process while the first is still stopped
        deadline = time.monotonic() + RERUN
        while len(lines(path)) < 2:
            assert time.monotonic() < deadline, "the job of a stopped worker did not run again elsewhere"
            time.sleep(0.05)
        assert not_resumed(victim)
        assert int(lines(path)[1]) != victim
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(victim, signal.SIGCONT)
    # and, once the first resumes and both finish, it counts once
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    time.sleep(3.5)  # both executions finish and commit
    assert runner.update_progress() == "1.0 / 1.0"
    assert runner.get_return_value(ref) == "done"
