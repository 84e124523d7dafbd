"""DESIGN.md section 1, as tests: enqueue, deferred_result, progress, values."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys

import pytest

import packmule

from .faulty import Faulty
from .harness import Harness, environ_for
from .runners import Flaky, Plain, SleepyRunner, Tree, lines

WAIT = 15  # s: far beyond what each wait needs; a broken backend fails the test through it


def test_seed_example_runs_synchronously(backend):
    runner = SleepyRunner(None, False, backend=backend)
    total = runner.run(20)
    assert 0 <= total <= 20
    assert runner.update_progress() == "20.0 / 20.0"


def test_seed_example_runs_asynchronously_and_ends_at_exact_counts(backend):
    runner = SleepyRunner(None, False, backend=backend)
    ref = runner.run_async(100)
    assert isinstance(ref, packmule.JobRef) and ref.server
    final = runner.wait(timeout=WAIT)
    assert final == "101.0 / 101.0"
    assert runner.update_progress() == "101.0 / 101.0"
    assert runner.get_return_value() == runner.get_return_value(ref)
    assert 0 <= runner.get_return_value() <= 100


def test_sync_run_then_async_run_starts_a_fresh_run_under_the_same_name(backend):
    runner = SleepyRunner(None, False, backend=backend)
    runner.run(5)
    runner.run_async(10)
    assert runner.wait(timeout=WAIT) == "11.0 / 11.0"


def test_progress_is_a_string_that_evals_and_splits_like_the_original(backend):
    runner = SleepyRunner(None, backend=backend)
    runner.run_async(9)
    progress = runner.wait(timeout=WAIT)
    assert isinstance(progress, str)
    assert eval(progress) == 1.0
    assert progress.split(" / ") == ["10.0", "10.0"]
    assert (progress.done, progress.total, progress.failed, progress.fraction) == (10, 10, 0, 1.0)


def test_a_name_with_no_jobs_reads_zero_of_zero(backend):
    assert Plain("never-used-name-x1", backend=backend).update_progress() == "0.0 / 0.0"


def test_any_instance_with_the_same_name_sees_the_run(backend):
    first = SleepyRunner(None, backend=backend)
    first.run_async(10)
    first.wait(timeout=WAIT)
    other = SleepyRunner(first.name, backend=backend)
    assert other.update_progress() == "11.0 / 11.0"
    assert other.get_return_value() == first.get_return_value()


def test_another_process_reads_progress_and_value_by_name(harness: Harness):
    runner = SleepyRunner(None, backend=harness.backend)
    runner.run_async(5)
    runner.wait(timeout=WAIT)
    code = (f"from {SleepyRunner.__module__} import SleepyRunner as S; r = S({runner.name!r}); "
            f"print(r.update_progress(), r.get_return_value() == {runner.get_return_value()!r})")
    out = subprocess.run([sys.executable, "-c", code], env=environ_for(harness), capture_output=True, text=True,
                         timeout=WAIT, cwd=_repo_root())
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["6.0", "/", "6.0", "True"]


def test_nested_fan_out_two_levels_deep_returns_values_in_order(backend):
    runner = Tree(backend=backend)
    runner.enqueue("root", 4)
    progress = runner.wait(timeout=WAIT)
    assert progress == "21.0 / 21.0"  # root + 4 branches + 16 leaves; continuations add nothing
    assert runner.get_return_value() == [[f"{i}.{j}" for j in range(4)] for i in range(4)]


UNSORTED = random.Random(7).sample(range(1000), 60)


def test_a_continuation_inside_a_job_gets_its_values_in_the_order_of_its_list(backend):
    assert sorted(UNSORTED) != UNSORTED
    runner = Tree(backend=backend)
    ref = runner.enqueue("fan_of", UNSORTED)
    runner.wait(timeout=WAIT)
    assert runner.get_return_value(ref) == UNSORTED


def test_deferred_result_outside_a_job_gets_its_values_in_the_order_of_its_list(backend):
    runner = Tree(backend=backend)
    assert runner.deferred_result("collect", runner.enqueue_each("ident", UNSORTED)) == UNSORTED
    jobs = [runner.enqueue("ident", v) for v in UNSORTED[:10]]
    assert runner.deferred_result("collect", jobs[::-1]) == UNSORTED[:10][::-1]


def test_after_a_blocking_deferred_result_the_progress_counts_its_jobs(backend):
    # each worker stores the values, then sleeps a second before it counts them done
    runner = Faulty(backend=backend)
    jobs = runner.enqueue_each("counted_late", [1, 2, 3], 1.0)
    assert runner.deferred_result("total", jobs) == 6
    assert runner.update_progress() == "3.0 / 3.0"


def test_deferred_result_of_an_empty_list_calls_the_method_with_nothing(backend):
    runner = Tree(backend=backend)
    assert runner.deferred_result("collect", []) == []
    runner.enqueue("empty")
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    assert runner.get_return_value() == []


def test_enqueue_each_queues_one_job_per_item_in_order(backend):
    runner = Tree(backend=backend)
    items = list(range(200))
    jobs = runner.enqueue_each("leaf", items, "x")
    assert len(jobs) == 200
    assert runner.deferred_result("collect", jobs) == [f"x.{j}" for j in items]


def test_deferred_result_outside_a_job_passes_extra_arguments(backend):
    runner = SleepyRunner(backend=backend)
    jobs = [runner.enqueue("snooze", 0) for _ in range(3)]
    assert runner.deferred_result("wakeup", jobs) == 0


def test_a_job_returning_a_jobref_has_that_jobs_value(backend):
    runner = Tree(backend=backend)
    ref = runner.enqueue("return_child")
    runner.wait(timeout=WAIT)
    assert runner.get_return_value(ref) == "child value"
    assert runner.get_return_value() == "child value"


def test_a_continuation_the_job_does_not_return_still_runs_once(backend, tmp_path):
    runner = Tree(backend=backend)
    path = str(tmp_path / "marks")
    runner.enqueue("side_continuation", path)
    runner.wait(timeout=WAIT)
    assert runner.get_return_value() == "returned first"
    _eventually(lambda: lines(path) == ["mark1"])


def test_return_values_can_be_left_unrecorded(backend):
    runner = Tree(backend=backend, record_return_values=False)
    runner.enqueue("root", 2)
    runner.wait(timeout=WAIT)
    with pytest.raises(packmule.ValuesNotRecorded, match="record_return_values"):
        runner.get_return_value()


def test_unrecorded_values_still_reach_deferred_result(backend):
    runner = Tree(backend=backend, record_return_values=False)
    jobs = runner.enqueue_each("leaf", range(3), "y")
    assert runner.deferred_result("collect", jobs) == ["y.0", "y.1", "y.2"]


def test_get_return_value_before_completion_raises_not_ready(backend):
    runner = Flaky(backend=backend)
    with pytest.raises(packmule.NotReady):
        runner.get_return_value()


def test_wait_times_out_with_a_message_saying_what_it_waits_for(backend, tmp_path):
    from .runners import Worky

    runner = Worky(backend=backend)
    runner.enqueue("pid_then_sleep", str(tmp_path / "p"), 3.0)
    with pytest.raises(TimeoutError, match="waited 0.5s"):
        runner.wait(timeout=0.5)
    runner.wait(timeout=WAIT)


def test_current_progress_is_pushed_without_asking(backend):
    runner = SleepyRunner(None, True, backend=backend)
    assert runner.current_progress == "0.0 / 0.0"
    runner.run_async(5)
    _eventually(lambda: runner.current_progress == "6.0 / 6.0")


def test_current_progress_without_push_is_the_last_value_read(backend):
    runner = SleepyRunner(None, False, backend=backend)
    runner.run_async(3)
    runner.wait(timeout=WAIT)
    fresh = SleepyRunner(runner.name, False, backend=backend)
    assert fresh.current_progress == "0.0 / 0.0"  # nothing read yet
    fresh.update_progress()
    assert fresh.current_progress == "4.0 / 4.0"


def test_wait_with_progress_draws_a_bar(backend, capsys):
    runner = SleepyRunner(backend=backend)
    runner.run_async(3)
    runner.wait(timeout=WAIT, progress=True)
    assert runner.name in capsys.readouterr().err


def test_jobref_is_an_immutable_hashable_picklable_tuple(backend):
    ref = Plain(backend=backend).enqueue("work", 1)
    assert isinstance(ref, tuple) and ref == (ref.id, ref.server)
    assert pickle.loads(pickle.dumps(ref)) == ref and {ref: 1}[ref] == 1
    assert ref.server
    with pytest.raises(AttributeError):
        ref.id = "x"  # type: ignore[misc]


def test_the_same_runner_values_travel_to_workers(backend):
    runner = Flaky(backend=backend)
    runner.custom = {"k": [1, 2]}  # instance state travels with the job
    ref = runner.enqueue("ok", ("a", 1.5, None))
    runner.wait(timeout=WAIT)
    assert runner.get_return_value(ref) == ("a", 1.5, None)


def _eventually(check, timeout: float = WAIT) -> None:  # type: ignore[no-untyped-def]
    import time

    end = time.monotonic() + timeout
    while not check():
        if time.monotonic() > end:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


def _repo_root() -> str:
    import os

    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
