"""The ``Hub``: every pending async wait (``aio.py``) of this process on one
backend, served by one daemon thread.  A wait is a ``Watch`` (its future, its
loop, and the ``Waiter`` whose checks ``wait()`` runs); the hub, round after
round,

- reads what all its watches need in bulk ``get_many`` calls (READ_KEYS keys
  each, the GIL let go between them): each run's counters
  (``progress_of``), or a window of the values a deferred result waits for,
  and, every CHECK_EVERY s, the runs' alerts, with the queue's stats read once
  for all of them (``Waiter.judge`` then runs ``wait()``'s checks: Cancelled,
  SecretMismatch, RunStateLost, NoWorkers, the recount of a stalled run);
- settles each watch whose run completed, whose values are all there, or whose
  checks raised (timeouts too), with one ``call_soon_threadsafe`` per event loop
  and round;
- paces itself as a blocking wait does (``waiting.py``): polls with a backoff,
  then arms the wake keys of all its runs with its own listener's channel (one
  bulk read and one bulk write, ``wake.arm_many``) and blocks until a worker's
  commit crosses one of them, or LOOK_EVERY passes.  A wait that arrives while
  it blocks wakes it (one ``Queue.wake``, in the executor).

A hub's thread ends once it has had nothing to wait for for IDLE_EXIT s; the
recounts its checks start run in a pool of RECOUNTERS threads, not one per wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from packmule._core import config as _config
from packmule._core.errors import BackendUnavailable, NotReady
from packmule._driver.reading import READ_CHUNK
from packmule._driver.run_state import alerts_of, counters_gone, progress_of
from packmule._driver.waiting import (
    ARM_AFTER,
    ARM_SETTLE,
    CHECK_EVERY,
    LOOK_EVERY,
    POLL_MAX,
    POLL_MIN,
    SETTLE_POLL,
    Spawned,
    Waited,
    Waiter,
)
from packmule._model.keys import COUNTERS, prefix, rejected_key
from packmule._model.wake import arm_many
from packmule._transport.codec import signer_for
from packmule.backends.base import Backend, Listener, QueueStats

__all__ = ["IDLE_EXIT", "RECOUNTERS", "SETTLE_CHUNK", "Hub", "Watch", "hub_for"]

log = logging.getLogger("packmule")

IDLE_EXIT = 5.0  # s a hub's thread stays with nothing to wait for before it ends
RECOUNTERS = 2  # threads a hub recounts stalled runs in (a recount settles for seconds)
READ_KEYS = 600  # keys a bulk read of a round asks for at most: parsing 3,000 keys' answer takes a
#                memcached client ~20 ms of Python, which an event loop in another thread would wait for
DRAIN_MAX = 64  # wakes a hub takes at once after it is woken (on beanstalkd each is a job of its tube)
YIELD_EVERY = 100  # watches the hub's thread looks at before it lets other threads run
SETTLE_CHUNK = 64  # waits a step of their loop settles: the loop's other tasks run between steps


@dataclass(eq=False)
class Watch:
    """One pending async wait: for its run to complete, or (``missing``) for values."""

    runner: Waited
    waiter: Waiter
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    missing: list[str] | None  # value keys not seen yet (None: wait for the run to complete)
    values: int = 0  # how many values it waits for
    gen: str | None = None
    looked: bool = False  # (its generation looked up)
    p: str = ""  # its generation's key prefix
    counters: list[str] = field(default_factory=list)  # its run's counter keys (progress_of's)
    until: int | None = None  # the run's done count that would end (or move) the wait
    done: int = -1  # the run's done count last read
    status: str = "not read yet"
    gone: bool = False

    def drop(self, _: object) -> None:
        self.gone = True


class Hub:
    """The pending async waits of this process on one backend, served by one
    daemon thread (the module's docstring says how)."""

    def __init__(self, backend: Backend) -> None:
        self.backend, self.pid = backend, os.getpid()
        self.lock = threading.Lock()
        self.fresh: list[Watch] = []  # handed in since the last round
        self.watches: list[Watch] = []
        self.event = threading.Event()  # (set by a new wait: a pause ends)
        self.blocking = self.poked = self.closed = False
        self.channel: str | None = None
        self.listener: Listener | None = None
        self.armed: dict[str, int] = {}  # wake key -> the done count armed there with our channel
        self.delay, self.poll_max = POLL_MIN, max(POLL_MIN, POLL_MAX * _config.delay_scale())
        self.moved_at = self.armed_at = self.checked_at = 0.0
        self.moved = False
        self.rejected = rejected_key(signer_for(backend).key_id.hex())
        self.recounters: ThreadPoolExecutor | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True, name="packmule-async-waits")

    def add(self, watch: Watch) -> bool:
        """Take a wait (False: this hub is ending; ask ``hub_for`` again)."""
        watch.waiter.spawn = self.recount
        with self.lock:
            if self.closed:
                return False
            self.fresh.append(watch)
            poke = self.blocking and not self.poked  # (one wake for all the waits that come while it blocks)
            self.poked = self.poked or poke
        self.event.set()
        if poke:
            watch.loop.run_in_executor(None, self._poke)
        return True

    def _poke(self) -> None:
        if self.channel is not None:
            with contextlib.suppress(BackendUnavailable):  # (it looks again within LOOK_EVERY anyway)
                self.backend.queue.wake([self.channel])

    def recount(self, fn: Callable[[], object]) -> Spawned:
        """``Waiter.spawn`` for the hub's waits: in its pool, not in a thread per wait."""
        if self.recounters is None:
            self.recounters = ThreadPoolExecutor(RECOUNTERS, thread_name_prefix="packmule-recount")
        future: Future[object] = self.recounters.submit(fn)
        future.add_done_callback(_log_failure)
        return future

    def _serve(self) -> None:
        idle_since = time.monotonic()
        try:
            while True:
                self.event.clear()
                with self.lock:
                    if self.fresh:
                        self.watches += self.fresh
                        self.fresh.clear()
                        self.moved = True
                    self.watches = [w for w in self.watches if not w.gone]
                    now = time.monotonic()
                    if not self.watches and now - idle_since >= IDLE_EXIT:
                        self.closed = True
                        return
                if not self.watches:
                    self.event.wait(IDLE_EXIT / 4)
                    continue
                idle_since = now
                self._round(now)
                if self.watches and not self.event.is_set():
                    self._pause()
        except BaseException as exc:  # (a bug here must not leave waits hanging: fail them all)
            with self.lock:
                self.closed = True
                self._settle([(w, None, exc) for w in [*self.watches, *self.fresh]])
            raise
        finally:
            self._close()

    def _close(self) -> None:
        with _hubs_lock:
            if _hubs.get(id(self.backend)) is self:
                del _hubs[id(self.backend)]
        if self.recounters is not None:
            self.recounters.shutdown(wait=False)
        if self.listener is not None:
            self.listener.close()  # (its channel goes with its connection)

    def _round(self, now: float) -> None:
        """Read what every watch needs in one bulk get; settle those it ends."""
        check = now - self.checked_at >= CHECK_EVERY
        stats: QueueStats | None = None
        uncounted: list[str] = []
        self._settle(_outcomes([w for w in self.watches if not w.looked], self._look_up))
        try:
            keys, got = self._keys(check), {}
            for i in range(0, len(keys), READ_KEYS):  # (the GIL let go between bulk reads: see READ_KEYS)
                got.update(self.backend.store.get_many(keys[i:i + READ_KEYS]))
                time.sleep(0)
            if check:
                stats, uncounted = self.backend.queue.stats(), self.backend.queue.uncounted()
                self.checked_at = now
        except BackendUnavailable as exc:
            outage = exc
            self._settle(_outcomes(self.watches, lambda w: w.waiter.outage(outage)))
            self.event.wait(0.5)  # (the pause of Waiter.unreachable)
            return
        self._settle(_outcomes(self.watches, lambda w: self._look(w, got, now, stats, uncounted)))

    @staticmethod
    def _look_up(w: Watch) -> None:
        """Find the generation a new watch's run is at (None: no run; an outage: next round)."""
        try:
            w.gen = w.runner._gen()
        except BackendUnavailable as exc:
            w.waiter.outage(exc)
            return
        w.looked = True
        w.p = prefix(w.runner.name, w.gen) if w.gen is not None else ""
        w.counters = [w.p + c for c in COUNTERS] if w.gen is not None else []

    def _keys(self, check: bool) -> list[str]:
        keys: dict[str, None] = {}
        for w in self.watches:
            if w.gen is not None:
                keys.update(dict.fromkeys(w.counters))
                if check:
                    keys[w.p + "cancel"] = None
            if w.missing is not None:
                keys.update(dict.fromkeys(w.missing[:READ_CHUNK]))
        if check:
            keys[self.rejected] = None
        return list(keys)

    def _look(self, w: Watch, got: dict[str, bytes], now: float, stats: QueueStats | None,
              uncounted: list[str]) -> Any:
        """What this round's read says of a watch: its answer, or None (it waits on); raises what ends it."""
        name, progress = w.runner.name, None
        if not w.looked:
            return None
        if w.gen is not None:
            progress = progress_of(w.counters, got)
            if progress is None:
                raise counters_gone(name, w.gen)
            if progress.done != w.done:
                w.done, self.moved = progress.done, True
        if w.missing is None:
            if progress is None or progress.total == 0:
                raise NotReady(f"run {name!r} has no jobs to wait for")
            if progress.complete:
                return progress
            w.status, w.until = str(progress), progress.total
        else:
            window = w.missing[:READ_CHUNK]
            w.missing = [k for k in window if k not in got] + w.missing[READ_CHUNK:]
            if not w.missing:
                return True
            w.status = f"{len(w.missing)} of {w.values} jobs not done"
            w.until = None if progress is None else progress.done + 1
        w.waiter.check_deadline(now, w.status)
        if stats is not None:
            alerts = None if w.gen is None else alerts_of(got, w.p + "cancel", self.rejected)
            try:
                w.waiter.judge(now, w.status, w.gen, progress, alerts, stats, uncounted)
            except BackendUnavailable as exc:  # (a check's own read: ridden out as wait() does)
                w.waiter.outage(exc)
        return None

    def _settle(self, outcomes: list[tuple[Watch, Any, BaseException | None]]) -> None:
        """Resolve the futures of the watches these outcomes end, one call per loop."""
        if not outcomes:
            return
        ended = {id(w) for w, _, _ in outcomes}
        self.watches = [w for w in self.watches if id(w) not in ended]
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for w, value, exc in outcomes:
            by_loop.setdefault(w.loop, []).append((w.future, value, exc))
        for loop, batch in by_loop.items():
            with contextlib.suppress(RuntimeError):  # (its loop is closed: nobody awaits these any more)
                loop.call_soon_threadsafe(_resolve, batch)

    def _pause(self) -> None:
        """Wait before the next round: poll quickly while things move, then arm the
        runs' wake keys and block until a worker wakes the hub."""
        now = time.monotonic()
        if self.moved:
            self.delay, self.moved_at, self.moved = POLL_MIN, now, False
        if now - self.moved_at >= ARM_AFTER and self._block(now):
            return
        self.event.wait(self.delay)
        self.delay = min(self.delay * 2, self.poll_max)

    def _block(self, now: float) -> bool:
        """Arm the wake keys of the runs waited on (then the hub looks once more),
        or block until woken, LOOK_EVERY passes, or a new wait comes.  False: no
        wake here (no listener, no run to arm)."""
        wants: dict[str, int] = {}
        for w in self.watches:
            if w.gen is not None and w.until is not None:
                key = w.p + "wake"
                wants[key] = min(w.until, wants.get(key, w.until))
        if not wants:
            return False
        try:
            listener = self.listener = self.backend.queue.listen()  # (this thread's, kept by the backend)
            if listener is None:
                return False
            if listener.channel != self.channel:
                self.channel, self.armed = listener.channel, {}
            fresh = {key: n for key, n in wants.items() if self.armed.get(key) != n}
            self.armed = {key: self.armed[key] for key in wants if key in self.armed}
            if fresh:
                arm_many(self.backend.store, fresh, listener.channel, _config.state_ttl())
                self.armed.update(fresh)
                self.armed_at = now
                return True
            if now - self.armed_at < ARM_SETTLE:
                self.event.wait(SETTLE_POLL)
                return True
            ends = [w.waiter.start + w.waiter.timeout for w in self.watches if w.waiter.timeout is not None]
            left = min([LOOK_EVERY, *(end - now for end in ends)])
            with self.lock:
                if self.fresh:
                    return True
                self.blocking, self.poked = True, False
            try:
                if listener.wait(max(0.0, left)):
                    for _ in range(DRAIN_MAX):  # (wakes that came meanwhile: this one round serves them all)
                        if not listener.wait(0.0):
                            break
            finally:
                with self.lock:
                    self.blocking = False
        except BackendUnavailable:  # (no wake now: poll; the checks say if a run's server is gone)
            return False
        return True


def _outcomes(watches: list[Watch], look: Callable[[Watch], Any]) -> list[tuple[Watch, Any, BaseException | None]]:
    """(watch, answer, error) for each watch that ``look`` ends (an answer, not None, or an error)."""
    out: list[tuple[Watch, Any, BaseException | None]] = []
    for i, w in enumerate(watches):
        if i % YIELD_EVERY == YIELD_EVERY - 1:
            time.sleep(0)  # (let the event loops' threads have the GIL: they wait for no more than this)
        try:
            answer = look(w)
        except Exception as exc:
            out.append((w, None, exc))
            continue
        if answer is not None:
            out.append((w, answer, None))
    return out


def _resolve(batch: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    """Settle the futures of a batch, SETTLE_CHUNK in a step of the loop (the rest
    in its next steps: a thousand waits ending at once do not stall its other tasks)."""
    for future, value, exc in batch[:SETTLE_CHUNK]:
        if not future.done():  # (its caller may have given up: a cancelled future)
            if exc is not None:
                future.set_exception(exc)
            else:
                future.set_result(value)
    if len(batch) > SETTLE_CHUNK:
        asyncio.get_running_loop().call_soon(_resolve, batch[SETTLE_CHUNK:])


def _log_failure(future: Future[object]) -> None:
    exc = future.exception()
    if exc is not None:
        log.warning("a recount for an async wait failed: %r", exc)


_hubs: dict[int, Hub] = {}  # id(backend) -> its hub
_hubs_lock = threading.Lock()


def hub_for(backend: Backend) -> Hub:
    """The backend's hub in this process, started if there is none (or it is ending)."""
    with _hubs_lock:
        hub = _hubs.get(id(backend))
        if hub is None or hub.closed or hub.backend is not backend or hub.pid != os.getpid():
            hub = _hubs[id(backend)] = Hub(backend)
            hub.thread.start()
        return hub


def _forget_hubs() -> None:
    """In a fork child: the parent's hubs' threads are not there."""
    global _hubs_lock
    _hubs_lock = threading.Lock()
    _hubs.clear()


os.register_at_fork(after_in_child=_forget_hubs)
