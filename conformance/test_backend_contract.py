"""The promises of ``backends/base.py``, tested on a backend's Queue, Store and
locks directly, with nothing of packmule's engine in between: one test per promise.

Each test gets ``bare`` (conftest.py): a backend of the harness's kind that no
worker serves, so the test's jobs are its own, and the ``env`` another process
needs to reach it.  "Another consumer" is another process, started here with
multiprocessing (spawn) and driven over a pipe.  Concurrency is proven, not
hoped for: processes start together at a barrier and stamp every call with
``time.monotonic()`` (one clock for all the processes of a machine), and each
test asserts that calls of different processes were under way at once.

Times: a time-to-run of 1 s (beanstalkd counts whole seconds, rounded up);
every wait has a deadline of a few seconds.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

import pytest
from packmule.backends.base import Backend, Put, Queue, Reserved

from .harness import Harness

SPAWN = multiprocessing.get_context("spawn")
TTR = 1.0  # s: the shortest time-to-run every backend keeps
EARLY = 0.8  # a job held back for T seconds must not be handed out before EARLY * T
LATE = 5.0  # s within which a job due now must be handed out
START = 30.0  # s a spawned process may take to start and connect, on a loaded machine
SHARD = "contract"
POLL = 1.0  # s: the longest single reserve a consumer here makes

Span = tuple[float, float]  # (monotonic time a call started, time it returned)


def connect(env: Mapping[str, str]) -> Backend:
    """The backend ``env`` names, built as any process of it builds it."""
    from packmule.backends._choice import backend_class

    return backend_class(env.get("PACKMULE_BACKEND") or "local").from_env(env)


def new_body() -> bytes:
    return b"job-" + os.urandom(8).hex().encode()


def counts(queue: Queue) -> tuple[int, int, int, int]:
    """(ready, reserved, delayed, buried)."""
    stats = queue.stats()
    return stats.ready, stats.reserved, stats.delayed, stats.buried


def bodies(got: Sequence[Any]) -> list[bytes]:
    return [r.body for r in got]


def reserve_within(queue: Queue, seconds: float) -> list[Reserved]:
    """One job, if one is handed out within ``seconds``: reserved the way
    workers do, in turns of at most POLL seconds (beanstalkd 1.12 does not
    wake a consumer already waiting when a job times out: it gets it with its
    next reserve)."""
    deadline = time.monotonic() + seconds
    while True:
        left = deadline - time.monotonic()
        got = queue.reserve_many(1, max(0.0, min(POLL, left)))
        if got or left <= POLL:
            return got


# --- other processes ---------------------------------------------------------------------
def _consumer(env: dict[str, str], conn: Connection) -> None:
    """Another consumer of the queue, doing what the parent sends: ``reserve``
    (holding what it gets), ``hold`` (touch what it holds every 0.25 s), ``ack``."""
    queue = connect(env).queue
    held: list[Any] = []
    stop = threading.Event()
    toucher: threading.Thread | None = None

    def keep() -> None:
        while not stop.wait(0.25):
            for handle in held:
                queue.touch(handle)

    conn.send(counts(queue))  # connected
    while True:
        op, arg = conn.recv()
        if op == "reserve":
            got = reserve_within(queue, arg)
            held += [r.handle for r in got]
            conn.send([(r.body, time.monotonic()) for r in got])
        elif op == "hold":
            toucher = threading.Thread(target=keep, daemon=True)
            toucher.start()
            conn.send("holding")
        elif op == "ack":
            stop.set()
            if toucher is not None:
                toucher.join()
            queue.ack_many(held)
            counts(queue)  # (a backend may post the ack: a call that answers comes after it)
            conn.send(len(held))
            held.clear()


def _lock_holder(env: dict[str, str], name: str, conn: Connection) -> None:
    """Take the lock, say so, hold it until told to let go (or killed)."""
    with connect(env).lock(name, timeout=START):
        conn.send(("held", time.monotonic()))
        conn.poll(START)
    conn.send(("released", time.monotonic()))


def _locked_sections(env: dict[str, str], name: str, rounds: int, start: Any, out: Any) -> None:
    """Enter the lock ``rounds`` times, 20 ms inside each time; report
    (asked, entered, left) of each section."""
    backend = connect(env)
    with backend.lock(name + "-warmup", timeout=START):
        pass  # connected
    start.wait(START)
    sections = []
    for _ in range(rounds):
        asked = time.monotonic()
        with backend.lock(name, timeout=LATE * 2):
            entered = time.monotonic()
            time.sleep(0.02)
            left = time.monotonic()
        sections.append((asked, entered, left))
    out.put(sections)


def _adder(env: dict[str, str], batches: list[list[str]], tag: bytes, start: Any, out: Any) -> None:
    store = connect(env).store
    store.get_many(["warmup"])  # connected
    start.wait(START)
    won: list[str] = []
    spans = []
    for batch in batches:
        t0 = time.monotonic()
        won += store.add_many(dict.fromkeys(batch, tag), 600)
        spans.append((t0, time.monotonic()))
    out.put((tag, won, spans))


def _incrementer(env: dict[str, str], deltas: dict[str, int], calls: int, start: Any, out: Any) -> None:
    store = connect(env).store
    store.get_many(["warmup"])  # connected
    start.wait(START)
    results: dict[str, list[int | None]] = {key: [] for key in deltas}
    spans = []
    for _ in range(calls):
        t0 = time.monotonic()
        got = store.incr_many(deltas)
        spans.append((t0, time.monotonic()))
        for key, value in got.items():
            results[key].append(value)
    out.put((results, spans))


class Consumer:
    """A ``_consumer`` process, driven from the test."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.conn, child = SPAWN.Pipe()
        self.proc = SPAWN.Process(target=_consumer, args=(dict(env), child), daemon=True)
        self.proc.start()
        child.close()
        self.answer(START, "start and connect")

    def send(self, op: str, arg: Any = None) -> None:
        self.conn.send((op, arg))

    def answer(self, timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        while not self.conn.poll(0.05):
            assert self.proc.is_alive(), f"the consumer process died (exit {self.proc.exitcode}) before: {what}"
            assert time.monotonic() < deadline, f"the consumer process did not {what} within {timeout}s"
        return self.conn.recv()

    def call(self, op: str, arg: Any = None, timeout: float = LATE) -> Any:
        self.send(op, arg)
        return self.answer(timeout, op)

    def reserve(self, timeout: float) -> list[tuple[bytes, float]]:
        """What the consumer reserved within ``timeout``: (body, when) pairs."""
        got: list[tuple[bytes, float]] = self.call("reserve", timeout, timeout + LATE)
        return got

    def kill(self) -> None:
        self.proc.kill()
        self.proc.join(LATE)

    def close(self) -> None:
        if self.proc.is_alive():
            self.kill()
        self.conn.close()


@pytest.fixture
def consumer(bare: Harness) -> Iterator[Callable[[], Consumer]]:
    """Starts consumer processes of the bare backend; kills them after the test."""
    started: list[Consumer] = []

    def start() -> Consumer:
        started.append(Consumer(bare.env))
        return started[-1]

    yield start
    for c in started:
        c.close()


def run_together(target: Callable[..., None], args: Sequence[tuple[Any, ...]]) -> list[Any]:
    """Run ``target(*a, start, out)`` in one process per ``a``, released
    together by a barrier once all are connected; what each puts on ``out``."""
    start, out = SPAWN.Barrier(len(args)), SPAWN.Queue()
    procs = [SPAWN.Process(target=target, args=(*a, start, out), daemon=True) for a in args]
    for proc in procs:
        proc.start()
    results: list[Any] = []
    deadline = time.monotonic() + START
    try:
        while len(results) < len(procs):
            try:
                results.append(out.get(timeout=0.1))
            except Exception:  # queue.Empty
                dead = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
                assert not dead, f"a process of the test died with exit code {dead[0]}"
                assert time.monotonic() < deadline, f"{len(procs) - len(results)} processes did not report"
    finally:
        for proc in procs:
            proc.join(LATE)
            if proc.is_alive():
                proc.kill()
                proc.join()
    return results


def overlapping(spans_by_process: Sequence[Sequence[Span]]) -> int:
    """How many pairs of calls, made by different processes, were under way at
    the same moment: the proof that the test really ran them concurrently."""
    spans = sorted((t0, t1, who) for who, spans in enumerate(spans_by_process) for t0, t1 in spans)
    pairs = 0
    for i, (_, end, who) in enumerate(spans):
        for t0, _, other in spans[i + 1:]:
            if t0 >= end:
                break
            pairs += other != who
    return pairs


# --- the queue ---------------------------------------------------------------------------
def test_put_jobs_are_reserved_once_each_exactly_as_put(bare: Harness):
    queue = bare.backend.queue
    sent = [new_body() for _ in range(5)]
    queue.put_many([Put(SHARD, b, TTR * 30) for b in sent])
    got: list[bytes] = []
    deadline = time.monotonic() + LATE
    while len(got) < len(sent):
        assert time.monotonic() < deadline, f"only {len(got)} of {len(sent)} jobs were handed out"
        batch = queue.reserve_many(3, 1.0)
        assert len(batch) <= 3
        got += bodies(batch)
        queue.ack_many([r.handle for r in batch])
    assert sorted(got) == sorted(sent)


def test_an_acked_job_never_comes_back_even_long_after_its_time_to_run(bare: Harness):
    queue = bare.backend.queue
    body = new_body()
    queue.put_many([Put(SHARD, body, TTR)])
    got = reserve_within(queue, LATE)
    assert bodies(got) == [body]
    queue.ack_many([got[0].handle])
    assert reserve_within(queue, 3 * TTR) == []
    assert counts(queue) == (0, 0, 0, 0)


def test_the_queue_itself_gives_a_job_not_acked_within_its_time_to_run_to_another(bare: Harness, consumer):
    queue, other = bare.backend.queue, consumer()
    body = new_body()
    queue.put_many([Put(SHARD, body, TTR)])
    assert bodies(reserve_within(queue, LATE)) == [body]  # held by this process, never acked
    reserved = time.monotonic()
    got = other.reserve(LATE)
    assert [b for b, _ in got] == [body], "the job was not handed to another consumer after its time-to-run"
    assert got[0][1] - reserved >= EARLY * TTR, "the job was handed out again before its time-to-run"


def test_a_released_job_is_ready_again_at_once(bare: Harness):
    queue = bare.backend.queue
    body = new_body()
    queue.put_many([Put(SHARD, body, TTR * 30)])
    got = reserve_within(queue, LATE)
    queue.release(got[0].handle, 0)
    assert counts(queue) == (1, 0, 0, 0)
    assert bodies(reserve_within(queue, LATE)) == [body]


def test_a_job_released_with_a_delay_is_ready_only_after_the_delay(bare: Harness):
    queue = bare.backend.queue
    body, delay = new_body(), 1.0
    queue.put_many([Put(SHARD, body, TTR * 30)])
    got = reserve_within(queue, LATE)
    released = time.monotonic()
    queue.release(got[0].handle, delay)
    assert counts(queue) == (0, 0, 1, 0)
    again = reserve_within(queue, LATE)
    assert bodies(again) == [body]
    assert time.monotonic() - released >= EARLY * delay


def test_a_buried_job_is_counted_and_never_reserved_again(bare: Harness):
    queue = bare.backend.queue
    body = new_body()
    queue.put_many([Put(SHARD, body, TTR)])
    got = reserve_within(queue, LATE)
    queue.bury(got[0].handle)
    assert counts(queue) == (0, 0, 0, 1)
    assert reserve_within(queue, 3 * TTR) == []  # not even after its time-to-run
    assert counts(queue) == (0, 0, 0, 1)


def test_touch_restarts_the_time_to_run(bare: Harness, consumer):
    queue, other = bare.backend.queue, consumer()
    body, watch = new_body(), 3 * TTR
    queue.put_many([Put(SHARD, body, TTR)])
    got = reserve_within(queue, LATE)
    reserved = time.monotonic()
    other.send("reserve", watch)  # the other waits for a job while this one touches its own
    while not other.conn.poll(0.25 * TTR):
        assert time.monotonic() - reserved < watch + LATE, "the other consumer's reserve did not return"
        queue.touch(got[0].handle)
    assert other.answer(0, "reserve") == [], "a job touched within its time-to-run was handed out again"
    assert time.monotonic() - reserved >= 2 * TTR
    queue.ack_many([got[0].handle])
    assert counts(queue) == (0, 0, 0, 0)


@pytest.mark.parametrize("op", ["ack", "release", "bury", "touch"])
def test_a_lapsed_handle_changes_nothing_for_the_consumer_that_holds_the_job_now(bare: Harness, consumer, op):
    # Given a job whose reservation here lapsed, and that another consumer holds now
    # (lapsed by a release: a lapse by time-to-run is the test of the queue's own
    # time-to-run above; the handle is as stale either way)
    queue, other = bare.backend.queue, consumer()
    body = new_body()
    queue.put_many([Put(SHARD, body, TTR)])
    lapsed = reserve_within(queue, LATE)[0].handle
    queue.release(lapsed, 0)
    assert [b for b, _ in other.reserve(LATE)] == [body]
    other.call("hold")  # it touches the job from now on
    # When this consumer acts on its lapsed handle
    {"ack": lambda: queue.ack_many([lapsed]), "release": lambda: queue.release(lapsed, 0),
     "bury": lambda: queue.bury(lapsed), "touch": lambda: queue.touch(lapsed)}[op]()
    # Then the job is still the other's: not deleted, not ready, not buried
    assert counts(queue) == (0, 1, 0, 0)
    assert reserve_within(queue, TTR) == []
    # and the other's ack deletes it for good
    assert other.call("ack") == 1
    assert counts(queue) == (0, 0, 0, 0)
    assert reserve_within(queue, 2 * TTR) == []


def test_a_consumer_process_that_dies_frees_its_jobs_at_once(bare: Harness, consumer):
    queue, other = bare.backend.queue, consumer()
    body = new_body()
    queue.put_many([Put(SHARD, body, 60 * TTR)])
    assert [b for b, _ in other.reserve(LATE)] == [body]
    other.kill()
    assert bodies(reserve_within(queue, LATE)) == [body], "a dead consumer's job was not ready again"


# --- the store ---------------------------------------------------------------------------
def test_get_many_of_hundreds_of_keys_returns_every_present_one(bare: Harness):
    store = bare.backend.store
    head = f"contract:get:{os.urandom(4).hex()}:"
    values = {f"{head}v{i}": f"value {i}".encode() * (1 + i % 7) for i in range(500)}
    counters = {f"{head}c{i}": i for i in range(100)}
    store.set_many(values, 600)
    assert store.add_many(counters, 600) == set(counters)
    present = {**values, **{k: str(v).encode() for k, v in counters.items()}}
    keys = list(present)
    assert store.get_many(keys[1::2] + keys[::2]) == present  # every one, whatever the order
    absent = [f"{head}absent{i}" for i in range(50)]
    mixed = [key for pair in zip(absent, keys, strict=False) for key in pair]
    assert store.get_many(mixed) == {key: present[key] for key in keys[:50]}  # the absent ones left out


def test_add_many_has_one_winner_per_key_among_processes(bare: Harness):
    store = bare.backend.store
    head = f"contract:add:{os.urandom(4).hex()}:"
    batches = [[f"{head}{b}.{i}" for i in range(20)] for b in range(15)]
    tags = [f"process {n}".encode() for n in range(4)]
    reports = run_together(_adder, [(bare.env, batches, tag) for tag in tags])
    assert overlapping([spans for _, _, spans in reports]) > 0, "the adds never overlapped: nothing was proven"
    keys = [key for batch in batches for key in batch]
    winners: dict[str, list[bytes]] = {key: [] for key in keys}
    for tag, won, _ in reports:
        for key in won:
            winners[key].append(tag)
    assert {key: len(w) for key, w in winners.items()} == dict.fromkeys(keys, 1)
    assert store.get_many(keys) == {key: w[0] for key, w in winners.items()}


def test_incr_many_from_processes_at_once_returns_distinct_values_ending_at_the_sum(bare: Harness):
    store = bare.backend.store
    head = f"contract:incr:{os.urandom(4).hex()}:"
    deltas = {head + "one": 1, head + "three": 3}
    store.add_many(dict.fromkeys(deltas, 0), 600)
    processes, calls = 4, 60
    reports = run_together(_incrementer, [(bare.env, deltas, calls)] * processes)
    assert overlapping([spans for _, spans in reports]) > 0, "the increments never overlapped: nothing was proven"
    for key, delta in deltas.items():
        seen = sorted(v for results, _ in reports for v in results[key])  # type: ignore[type-var]
        assert seen == [delta * n for n in range(1, processes * calls + 1)], f"{key}: values repeated or lost"
    assert store.get_many(list(deltas)) == {k: str(d * processes * calls).encode() for k, d in deltas.items()}


# --- locks -------------------------------------------------------------------------------
def _hold_lock(env: Mapping[str, str], name: str) -> tuple[Any, Connection]:
    conn, child = SPAWN.Pipe()
    proc = SPAWN.Process(target=_lock_holder, args=(dict(env), name, child), daemon=True)
    proc.start()
    child.close()
    deadline = time.monotonic() + START
    while not conn.poll(0.05):
        assert proc.is_alive(), f"the lock holder died (exit {proc.exitcode})"
        assert time.monotonic() < deadline, "the lock holder did not take the lock"
    assert conn.recv()[0] == "held"
    return proc, conn


def test_a_lock_held_in_one_process_times_out_a_contender_in_another(bare: Harness):
    name = f"contract-lock-{os.urandom(4).hex()}"
    holder, conn = _hold_lock(bare.env, name)
    try:
        asked = time.monotonic()
        with pytest.raises(TimeoutError), bare.backend.lock(name, timeout=0.5):
            pass
        assert time.monotonic() - asked >= 0.4
        conn.send("let go")
        assert conn.poll(LATE) and conn.recv()[0] == "released"
        with bare.backend.lock(name, timeout=LATE):
            pass  # free again: the same lock
    finally:
        holder.kill()
        holder.join(LATE)


def test_locked_sections_of_several_processes_never_overlap(bare: Harness):
    name = f"contract-lock-{os.urandom(4).hex()}"
    reports = run_together(_locked_sections, [(bare.env, name, 10)] * 3)
    sections = sorted((entered, left, who) for who, mine in enumerate(reports) for _, entered, left in mine)
    for (_, left, _), (entered, _, _) in zip(sections, sections[1:], strict=False):
        assert entered >= left, "two processes were inside the lock at once"
    # some process asked while another was inside, and entered after that one left
    waits = [(asked, entered, who) for who, mine in enumerate(reports) for asked, entered, _ in mine]
    assert any(asked < left and entered >= left and who != other for asked, entered, who in waits
               for _, left, other in sections), "no process ever waited for another: nothing was proven"


def test_the_lock_of_a_holder_that_died_is_freed(bare: Harness):
    name = f"contract-lock-{os.urandom(4).hex()}"
    holder, _ = _hold_lock(bare.env, name)
    holder.kill()
    holder.join(LATE)
    with bare.backend.lock(name, timeout=2 * LATE):
        pass
