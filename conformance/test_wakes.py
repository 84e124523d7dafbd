"""Wakes (``Queue.wake`` / ``Queue.listen``, ``packmule/_model/wake.py``): a
waiting driver blocks until the worker whose count reaches what it waits for
wakes it, instead of polling.  The backend's part first, then the engine's.

A backend may have no wakes (``listen()`` returns None: waits poll); these
tests then say so and pass, as the interface allows."""

from __future__ import annotations

import threading
import time

import pytest
from packmule.backends.base import Backend, Listener

from packmule._model.keys import prefix
from packmule._model.wake import wake_value

from .faulty import Faulty
from .harness import Harness
from .runners import Gated, lines

LATE = 10.0  # s within which a wake must arrive (it takes a millisecond; a loaded machine is slow)
WAIT = 30


def _listener(backend: Backend) -> Listener:
    """This thread's listener, with no wake pending: a wait of an earlier test may
    have been woken after it returned, and a wake is kept for the next wait."""
    listener = backend.queue.listen()
    if listener is None:
        pytest.skip(f"backend {backend.name!r} has no wakes (listen() is None): its waits poll")
    while listener.wait(0.05):
        pass
    return listener


def test_a_wake_reaches_the_listener_waiting_on_its_channel(bare: Harness) -> None:
    listener = _listener(bare.backend)
    woken: list[bool] = []
    waiting = threading.Thread(target=lambda: woken.append(listener.wait(LATE)))
    waiting.start()
    time.sleep(0.2)  # (it waits now)
    bare.backend.for_thread().queue.wake([listener.channel])
    waiting.join(LATE + 5)
    assert woken == [True]


def test_a_wake_sent_while_nobody_waited_is_kept_for_the_next_wait_and_used_once(bare: Harness) -> None:
    listener = _listener(bare.backend)
    bare.backend.for_thread().queue.wake([listener.channel])
    assert listener.wait(LATE) is True
    assert listener.wait(0.3) is False  # (used up)


def test_a_wake_for_an_unknown_channel_wakes_nobody_and_raises_nothing(bare: Harness) -> None:
    listener = _listener(bare.backend)
    other = bare.backend.for_thread()
    other.queue.wake(["no such channel", "127.0.0.1:1|pmw-0", listener.channel + "x", ""])
    assert listener.wait(0.3) is False


def test_each_thread_listens_on_a_channel_of_its_own_and_keeps_it(bare: Harness) -> None:
    first = _listener(bare.backend)
    assert bare.backend.queue.listen() is first
    theirs: list[Listener | None] = []
    thread = threading.Thread(target=lambda: theirs.append(bare.backend.queue.listen()))
    thread.start()
    thread.join(WAIT)
    assert theirs[0] is not None and theirs[0].channel != first.channel
    bare.backend.for_thread().queue.wake([first.channel])
    assert theirs[0].wait(0.3) is False  # (another thread's wake is not its)
    assert first.wait(LATE) is True


def test_a_wait_returns_when_its_timeout_passes_without_a_wake(bare: Harness) -> None:
    listener = _listener(bare.backend)
    started = time.monotonic()
    assert listener.wait(0.2) is False
    assert time.monotonic() - started < LATE  # (never the whole second a server may count in)
    bare.backend.for_thread().queue.wake([listener.channel])
    assert listener.wait(LATE) is True  # (a reserve left pending by the timeout does not lose the wake)


def test_the_worker_whose_commit_reaches_the_armed_count_wakes_its_channel(backend: Backend, tmp_path) -> None:
    # Given a run of 3 jobs held at a gate, and a wake armed for 3 jobs done
    listener = _listener(backend)
    gate = str(tmp_path / "gate")
    runner = Gated(backend=backend)
    name, gen, _ = runner.enqueue_each("wait_for", range(3), gate)[0].parts
    backend.store.set_many({prefix(name, gen) + "wake": wake_value(listener.channel, 3)}, 600)
    backend.store.flush()  # (applied before the gate opens: the worker reads it on another connection)
    assert listener.wait(0.3) is False  # (nothing done yet)
    # When the jobs complete
    open(gate, "w").close()
    # Then the worker whose count reached 3 woke the channel
    assert listener.wait(LATE) is True
    assert runner.update_progress() == "3.0 / 3.0"


def test_a_job_running_when_the_wake_is_armed_wakes_it_when_it_completes(backend: Backend, tmp_path) -> None:
    # Given a job that runs (held at a gate): its worker read the run's keys before any wake was armed
    listener = _listener(backend)
    gate = str(tmp_path / "gate")
    runner = Gated(backend=backend)
    name, gen, _ = runner.enqueue("wait_for", 0, gate).parts
    deadline = time.monotonic() + LATE
    while backend.queue.stats().reserved < 1:
        assert time.monotonic() < deadline, "the job did not start"
        time.sleep(0.01)
    time.sleep(0.1)  # (its batch is past the read of its keys)
    # When a wake is armed for it, and it completes
    backend.store.set_many({prefix(name, gen) + "wake": wake_value(listener.channel, 1)}, 600)
    backend.store.flush()  # (applied before the gate opens: the worker reads it on another connection)
    open(gate, "w").close()
    # Then its worker, which reads the wake key again before a commit that long, wakes the channel
    assert listener.wait(LATE) is True
    assert runner.update_progress() == "1.0 / 1.0"


def test_a_wake_armed_while_a_worker_commits_the_last_value_wakes_when_it_counts(backend: Backend, tmp_path) -> None:
    # Given a job whose worker stored its value and is held before counting it done
    # (a commit of a big batch: thousands of values signed and added take a while)
    listener = _listener(backend)
    path, go = str(tmp_path / "job"), str(tmp_path / "go")
    runner = Faulty(backend=backend)
    name, gen, _ = runner.enqueue("paused_after_add", 7, path, go).parts
    deadline = time.monotonic() + LATE
    while not lines(path + ".paused"):
        assert time.monotonic() < deadline, "the worker never reached its commit"
        time.sleep(0.01)
    # When a driver arms the wake for it then, and the commit goes on
    backend.store.set_many({prefix(name, gen) + "wake": wake_value(listener.channel, 1)}, 600)
    backend.store.flush()  # (applied before the worker goes on: it reads it on another connection)
    open(go, "w").close()
    # Then the worker, reading the wake key again just before its counts, wakes the channel
    assert listener.wait(LATE) is True
    assert runner.update_progress() == "1.0 / 1.0"


def test_a_blocking_wait_arms_the_run_s_wake_key_with_its_channel_and_count(backend: Backend, tmp_path) -> None:
    # Given a run of 2 jobs held at a gate, waited on in another thread
    _listener(backend)
    gate = str(tmp_path / "gate")
    runner = Gated(backend=backend)
    refs = runner.enqueue_each("wait_for", range(2), gate)
    name, gen, _ = refs[0].parts
    key = prefix(name, gen) + "wake"
    result: list[object] = []
    waiting = threading.Thread(target=lambda: result.append(runner.wait(timeout=WAIT)))
    waiting.start()
    # Then it arms the wake key: a channel of its thread's, and 2 jobs done
    deadline = time.monotonic() + LATE
    while not (backend.store.get_many([key]).get(key) or b"").endswith(b" 2"):
        assert time.monotonic() < deadline, f"the wait never armed {key}"
        time.sleep(0.01)
    # and returns once they are done
    open(gate, "w").close()
    waiting.join(WAIT)
    assert result == ["2.0 / 2.0"]
