"""Locks, cancel, forget, bad input, forged bodies, and the store's atomicity."""

from __future__ import annotations

import os
import pickle
import time

import pytest
from packmule.backends.base import Put

import packmule

from .runners import Plain, Unpicklable, Worky, lines

WAIT = 60


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


class _Boom:
    """Unpickling this runs code: exactly what a forged body would try."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (open, (self.path, "w"))


def test_a_forged_body_is_buried_and_never_unpickled(backend, tmp_path):
    marker = tmp_path / "unpickled"
    forged = b"\0" * 32 + pickle.dumps(_Boom(str(marker)))
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
    backend.queue.put_many([Put("unsigned", pickle.dumps(_Boom(str(marker))), 10)])
    deadline = time.monotonic() + WAIT
    while backend.queue.stats().buried == before:
        assert time.monotonic() < deadline, "the unsigned body was not set aside"
        time.sleep(0.05)
    assert not marker.exists()


def test_errors_share_one_root():
    for exc in (packmule.JobFailed, packmule.NotReady, packmule.NoWorkers, packmule.RunStateLost,
                packmule.Cancelled, packmule.BackendUnavailable, packmule.ValuesNotRecorded):
        assert issubclass(exc, packmule.PackMuleError)
