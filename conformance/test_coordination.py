"""Locks, cancel, forget, bad input, forged bodies, and the store's atomicity."""

from __future__ import annotations

import os
import pickle
import time

import pytest
from packmule.backends.base import Put

import packmule
from packmule._model.keys import FAILED_FIELD, PATH_FIELDS, RUN_FIELDS, pointer, prefix

from .hostile import Boom
from .runners import Flaky, Plain, Unpicklable, Worky, lines

WAIT = 15  # s: far beyond what each wait needs; a broken backend fails the test through it


def test_lock_gives_mutual_exclusion_across_workers(backend, tmp_path):
    runner = Worky(backend=backend)
    path = str(tmp_path / "counter")
    jobs = runner.enqueue_each("locked_increment", range(40), path)
    runner.deferred_result("total", jobs)
    assert lines(path) == ["40"]


def test_lock_times_out_while_another_holds_it(backend):
    runner = Plain(backend=backend)
    with runner.lock("held-by-test"), pytest.raises(TimeoutError), runner.lock("held-by-test", timeout=0.2):
        pass


def test_concurrent_increments_from_workers_return_exactly_one_to_n(backend):
    runner = Worky(backend=backend)
    key = f"conformance:incr:{os.urandom(4).hex()}"
    backend.store.add_many({key: 0}, 600)
    values = runner.deferred_result("collect", runner.enqueue_each("incr", range(60), key))
    assert sorted(values) == list(range(1, 61))


def test_one_add_wins_among_concurrent_workers(backend):
    runner = Worky(backend=backend)
    key = f"conformance:add:{os.urandom(4).hex()}"
    values = runner.deferred_result("collect", runner.enqueue_each("add", range(40), key))
    assert values.count(True) == 1


def test_incr_of_a_missing_counter_is_none_not_a_new_counter(backend):
    key = f"conformance:missing:{os.urandom(4).hex()}"
    assert backend.store.incr_many({key: 1}) == {key: None}
    assert backend.store.get_many([key]) == {}


def test_cancel_drops_unstarted_jobs_and_waiting_raises_cancelled(backend, tmp_path):
    runner = Worky(backend=backend)
    path = str(tmp_path / "pids")
    runner.enqueue_each("pid_then_sleep_item", range(30), path, 0.2)
    time.sleep(0.3)
    runner.cancel()
    with pytest.raises(packmule.Cancelled):
        runner.wait(timeout=WAIT)
    time.sleep(1.0)
    assert len(lines(path)) < 30


def test_forget_lets_the_name_start_afresh(backend):
    runner = Plain(backend=backend)
    runner.enqueue("work", 1)
    runner.wait(timeout=WAIT)
    runner.forget()
    assert runner.update_progress() == "0.0 / 0.0"
    again = Plain(runner.name, backend=backend)
    again.enqueue("work", 2)
    assert again.wait(timeout=WAIT) == "1.0 / 1.0"


def test_forget_through_one_connection_is_seen_by_another_once_it_returns(backend):
    # (a dashboard's Watcher acts through a connection of its own; a write it left
    # posted was once overtaken by the driver's next read: 38 times in 300)
    other = backend.for_thread()
    try:
        for i in range(150):
            runner = Plain(backend=backend)
            runner.enqueue("work", i)
            runner.wait(timeout=WAIT)  # (nothing left queued: the queue is shared with later tests)
            Plain(runner.name, backend=other).forget()
            assert Plain(runner.name, backend=backend).update_progress() == "0.0 / 0.0", f"forget {i}"
    finally:
        if other is not backend:  # (a backend whose calls are thread-safe gives itself: Backend.for_thread)
            other.close()


def test_no_job_of_a_run_starts_after_cancel_returns(backend, tmp_path):
    # Given a run of 12 jobs of 0.25 s, started
    runner = Worky(backend=backend)
    path = str(tmp_path / "starts")
    count, seconds = 12, 0.25
    runner.enqueue_each("stamp_then_sleep", range(count), path, seconds)
    deadline = time.monotonic() + WAIT
    while not lines(path):
        assert time.monotonic() < deadline, "no job started"
        time.sleep(0.01)
    # When it is cancelled
    runner.cancel()
    cancelled = time.monotonic()
    # Then, once the whole run would have ended, no job had started after cancel() returned
    time.sleep(count * seconds + 0.5)
    late = [float(t) - cancelled for t in lines(path) if float(t) > cancelled]
    assert not late, f"{len(late)} of {count} jobs started after cancel() returned (after {late} s)"
    with pytest.raises(packmule.Cancelled):
        runner.wait(timeout=WAIT)


RUN_COUNTERS = tuple(f for f in RUN_FIELDS if f != "next")  # (a run that never completed has no successor)
JOB_KEYS = tuple(f for f in PATH_FIELDS if f != "gap:")  # per job path


def _generation_keys(name: str, gen: str, width: int = 6, depth: int = 3) -> list[str]:
    """Every key of run ``name``'s generation ``gen`` that the engine's key
    layout (packmule/_model/records.py) can name, for root jobs 0..width-1 and jobs up
    to ``depth`` levels below them, each with up to ``width`` children."""
    p = prefix(name, gen)
    keys = [pointer(name), *(p + k for k in RUN_FIELDS)]
    level = [str(i) for i in range(width)]
    paths = list(level)
    for _ in range(depth):
        level = [f"{up}.{i}" for up in level for i in range(width)]
        paths += level
    keys += [f"{p}{kind}{path}" for path in paths for kind in PATH_FIELDS]
    keys += [f"{p}{FAILED_FIELD}{k}" for k in range(50)]
    return keys


def _kind(key: str, name: str, gen: str) -> str:
    return key[len(prefix(name, gen)):].split(":")[0] + ":" if key.startswith(prefix(name, gen)) else key


def _run_with_every_kind_of_key(backend) -> tuple[packmule.Runner, str, str]:  # type: ignore[no-untyped-def]
    """A finished run with values, commits, continuations, a retry, failures and a cancel flag."""
    runner = Flaky(backend=backend, max_retries=1)
    ref = runner.enqueue("grandparent")
    runner.wait(timeout=WAIT)
    runner.cancel()
    name, gen, _ = ref.parts
    return runner, name, gen


def test_forget_removes_the_runs_pointer_and_counters(backend):
    runner, name, gen = _run_with_every_kind_of_key(backend)
    keys = [pointer(name), *(prefix(name, gen) + k for k in RUN_COUNTERS)]
    assert set(backend.store.get_many(keys)) == set(keys)
    runner.forget()
    assert sorted(backend.store.get_many(keys)) == []


def test_forget_leaves_no_key_of_the_old_generation(backend):
    runner, name, gen = _run_with_every_kind_of_key(backend)
    keys = _generation_keys(name, gen)
    kinds = {_kind(k, name, gen) for k in backend.store.get_many(keys)}
    expected = {*(k + ":" for k in RUN_COUNTERS), *JOB_KEYS, FAILED_FIELD, pointer(name)}
    assert expected <= kinds, "the keys named here miss some the engine made"
    runner.forget()
    assert sorted(backend.store.get_many(keys)) == []


@pytest.mark.parametrize("name", ["", "has space", "slash/not", "x" * 201, "ünicode", "new\nline"])
def test_a_bad_run_name_is_refused_at_construction(backend, name):
    with pytest.raises(ValueError, match="letters, digits"):
        Plain(name, backend=backend)


def test_a_name_of_200_allowed_characters_is_accepted(backend):
    assert Plain("a-b_c.d:" + "x" * 192, backend=backend).name


@pytest.mark.parametrize("kwargs", [{"time_to_run": 0}, {"time_to_run": "1"}, {"max_retries": -1},
                                    {"max_retries": 1.5}])
def test_bad_options_are_refused_at_construction(backend, kwargs):
    with pytest.raises(ValueError):
        Plain(backend=backend, **kwargs)


def _nothing_queued(runner: packmule.Runner) -> None:
    assert runner.update_progress() == "0.0 / 0.0"


def test_an_unknown_method_is_refused_with_nothing_queued(backend):
    runner = Plain(backend=backend)
    with pytest.raises(ValueError, match="no method 'nope'"):
        runner.enqueue("nope")
    _nothing_queued(runner)


def test_unserializable_arguments_are_refused_with_nothing_queued(backend):
    runner = Plain(backend=backend)
    with pytest.raises(TypeError, match="cannot serialize"):
        runner.enqueue("work", Unpicklable())
    _nothing_queued(runner)


def test_one_bad_item_refuses_the_whole_enqueue_each(backend):
    runner = Plain(backend=backend)
    with pytest.raises(TypeError, match="cannot serialize"):
        runner.enqueue_each("work", [1, 2, Unpicklable(), 4])
    _nothing_queued(runner)


def test_an_unserializable_runner_is_refused_with_nothing_queued(backend):
    runner = Plain(backend=backend)
    runner.handle = Unpicklable()
    with pytest.raises(TypeError, match="cannot serialize the runner"):
        runner.enqueue("work")
    _nothing_queued(runner)


def test_deferred_result_refuses_what_is_not_a_jobref(backend):
    with pytest.raises(TypeError, match="JobRef"):
        Plain(backend=backend).deferred_result("work", [("1", "x")])


def test_bad_input_loses_nothing_already_queued(backend):
    runner = Plain(backend=backend, record_return_values=True)
    ref = runner.enqueue("work", "kept")
    with pytest.raises(TypeError):
        runner.enqueue("work", Unpicklable())
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    assert runner.get_return_value(ref) == "kept"


def test_a_forged_body_is_buried_and_never_unpickled(backend, tmp_path):
    marker = tmp_path / "unpickled"
    forged = b"\0" * 32 + pickle.dumps(Boom(str(marker)))
    before = backend.queue.stats().buried
    backend.queue.put_many([Put("forged", forged, 10)])
    deadline = time.monotonic() + WAIT
    while backend.queue.stats().buried == before:
        assert time.monotonic() < deadline, "the forged body was not set aside"
        time.sleep(0.05)
    assert not marker.exists()


def test_an_unsigned_body_is_buried_and_never_unpickled(backend, tmp_path):
    marker = tmp_path / "unpickled"
    before = backend.queue.stats().buried
    backend.queue.put_many([Put("unsigned", pickle.dumps(Boom(str(marker))), 10)])
    deadline = time.monotonic() + WAIT
    while backend.queue.stats().buried == before:
        assert time.monotonic() < deadline, "the unsigned body was not set aside"
        time.sleep(0.05)
    assert not marker.exists()


def test_errors_share_one_root():
    for exc in (packmule.JobFailed, packmule.NotReady, packmule.NoWorkers, packmule.RunStateLost,
                packmule.Cancelled, packmule.BackendUnavailable, packmule.ValuesNotRecorded):
        assert issubclass(exc, packmule.PackMuleError)
