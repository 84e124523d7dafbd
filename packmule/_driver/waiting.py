"""Blocking waits: the pacing of a wait (``Waiter``: backoff, timeout, cancel and
lost-state checks, no-worker detection, riding out an unreachable server, the
recount of a stalled run), and ``Runner``'s waits for values and their counts (``Waits``,
a mixin of ``Runner``)."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from packmule._core import config as _config
from packmule._core.errors import BackendUnavailable, Cancelled, NoWorkers, RunStateLost, SecretMismatch
from packmule._core.types import JobRef, Progress
from packmule._driver.reading import ValueReader
from packmule._driver.run_state import RunState
from packmule._model.census import remaining_on
from packmule._model.keys import prefix, value_keys
from packmule._model.records import GONE, records, unwrap
from packmule._model.wake import arm
from packmule.backends.base import Backend, QueueStats

__all__ = ["CHECK_EVERY", "Spawned", "Waited", "Waiter", "Waits", "in_thread"]

log = logging.getLogger("packmule")

# s: how often a blocking wait looks again, doubling from POLL_MIN (it looks 4 times in
# ARM_AFTER, then blocks): a no-op job is done about 0.5 ms after its enqueue returns, and
# a first look 1 ms on made one job's round trip 1.76 ms, 0.25 ms on 1.19 (bench_roundtrip)
POLL_MIN, POLL_MAX = 0.00025, 0.1
NO_WORKERS_WARN, NO_WORKERS_RAISE = 2.0, 6.0  # s without a worker while jobs wait
STILL_WAITING_EVERY = 30.0  # s: a long wait says what it waits for
OUTAGE_GRACE = 30.0  # s a wait rides out an unreachable server before it raises
STALLED_AFTER = 3.0  # s with an empty queue and an incomplete run before a wait gives up
REJECTED_BEFORE = 60.0  # s: a refusal this long before a wait began still concerns it (clocks differ)
RECOUNT_AFTER_MAX = 300.0  # s: the longest a wait goes without progress before it recounts again
ARM_AFTER = 0.004  # s a wait polls before it arms a wake and blocks until a worker wakes it
LOOK_EVERY = 0.25  # s: a wait that blocks still looks this often (a wake lost, another waiter's arm won)
ARM_SETTLE, SETTLE_POLL = 0.015, 0.003  # s after arming a wait still polls, and how often (3x wake.REREAD_AFTER)
CHECK_EVERY = 0.5  # s between a wait's checks (cancel, lost state, stalls, no workers)


class Spawned(Protocol):
    """A recount started in the background (``Waiter.spawn``): a thread, or a pool's future."""

    def done(self) -> bool: ...


class _Thread(threading.Thread):
    def done(self) -> bool:
        return not self.is_alive()


def in_thread(fn: Callable[[], object]) -> Spawned:
    """Run ``fn`` in a daemon thread of its own (how a blocking wait recounts while jobs run)."""
    thread = _Thread(target=fn, daemon=True, name="packmule-recount")
    thread.start()
    return thread


class Waited(Protocol):
    """What a wait uses of the runner whose run it waits for (``packmule.Runner``)."""

    name: str
    _pm_gen: str | None

    @property
    def backend(self) -> Backend: ...
    def _gen(self) -> str | None: ...
    def _state(self) -> RunState: ...
    def _recount(self, gen: str, quiet: bool = False) -> str | None: ...


class Waits:
    """``Runner``'s blocking waits for values (``Runner`` is its only subclass)."""

    if TYPE_CHECKING:  # (what it uses of Runner)
        name: str
        _pm_gen: str | None
        wait_timeout: float | None
        record_return_values: bool

        @property
        def backend(self) -> Backend: ...
        def _gen(self) -> str | None: ...
        def _state(self) -> RunState: ...
        def _recount(self, gen: str, quiet: bool = False) -> str | None: ...

    def _wait_values(self, refs: Sequence[JobRef]) -> list[Any]:
        """Block until every ref has a value; the values in order, or the first
        failure.  An unreachable store is ridden out as ``wait()`` does."""
        state = self._state()
        ids = [r[0] for r in refs]  # (r.id, without a property call per ref)
        gen = self._pm_gen
        head = f"{self.name}/{gen}/"
        if gen is not None and all(i.startswith(head) for i in ids):
            key_head, cut = prefix(self.name, gen) + "v:", len(head)  # value_key, the run's part once
            ref_keys = [key_head + i[cut:] for i in ids]
        else:
            gen = None  # inputs from another run: no counter to gate on
            ref_keys = value_keys(ids)
        waiter = Waiter(self, f"{len(ref_keys)} jobs for deferred_result", self.wait_timeout)
        reader = ValueReader(state, list(dict.fromkeys(ref_keys)), gen, waiter)  # each value read once
        while not reader.finished():
            try:
                reader.step()
            except BackendUnavailable as exc:
                reader.ahead = None  # read again from the first value missing
                waiter.unreachable(exc)
        recs, follow = reader.recs, reader.refs_to_follow
        signer, store = state.signer, state.store
        trail: list[str] = list(follow.values())
        while follow:  # values that are JobRefs: follow them to the end
            try:
                ends = records(store, signer, list(set(follow.values())), trail)
            except BackendUnavailable as exc:
                waiter.unreachable(exc)
                continue
            missing = {k: r for k, r in follow.items() if r not in ends}
            recs.update((k, ends[r]) for k, r in follow.items() if r in ends)
            follow = missing
            if missing:
                waiter.pause(f"{len(missing)} followed JobRefs not done")
        if gen is not None:
            self._wait_counted(state, gen, len(reader.keys), waiter, reader.done)
        values = []
        for ref_id, key in zip(ids, ref_keys, strict=True):
            rec = recs[key]
            # the common case inline; unwrap raises for a failure (the first, in order)
            values.append(rec[1] if rec[0] == "ok" else unwrap(rec, ref_id))
        if not self.record_return_values:
            store.set_many(dict.fromkeys([*reader.keys, *value_keys(trail)], signer.dumps(GONE)), state.ttl)
        return values

    @staticmethod
    def _wait_counted(state: RunState, gen: str, jobs: int, waiter: Waiter, first: int | None) -> None:
        """A job's value is stored a moment before its worker counts it done (the
        add decides which execution completes it, then the count follows).  With
        every value in hand, wait for the counts too, so that the progress read
        after a blocking deferred_result includes its jobs: ``done`` reaches
        their number, or the run is complete.  (A worker that died in between
        is a stall that the waiter recounts.)  ``first``: the ``done`` count read
        with the last values, if any; it usually says so already."""
        if first is not None and first >= jobs:
            return
        looks = 0
        while True:
            try:
                now = state.progress(gen, missing_ok=True)
            except BackendUnavailable as exc:
                waiter.unreachable(exc)
                continue
            if now is None or now.done >= jobs or now.complete:  # (counters gone: nothing to wait for)
                return
            looks += 1
            if looks > 2:  # (the count is usually one store call behind its value: look again at once, twice)
                waiter.pause(f"{jobs} values in hand, {now.done} jobs counted done so far", until_done=jobs)


class Waiter:
    """The pacing of a blocking wait: backoff, timeout, cancel/lost checks, no-worker
    detection, and a log line now and then saying what it waits for."""

    def __init__(self, runner: Waited, what: str, timeout: float | None) -> None:
        self.runner, self.what, self.timeout = runner, what, timeout
        self.start = self.last_check = self.last_said = time.monotonic()
        self.started_at = time.time()  # (wall clock: workers on other machines stamp their notes with it)
        self.delay = POLL_MIN
        self.poll_max = max(POLL_MIN, POLL_MAX * _config.delay_scale())  # (PACKMULE_DELAY_SCALE)
        self.idle_since: float | None = None
        self.empty_since: float | None = None
        self.outage_since: float | None = None
        self.away_since: float | None = None  # (since when queue servers are away while the run is not complete)
        self.placed_at = self.start  # (when the run's keys were last asked where its remaining jobs are)
        self.done_seen, self.moved_at = -1, self.start  # the run's done count, and when it last changed
        self.recounted_at = self.start  # (a recount that fixes nothing is no move: it only paces the next)
        self.recounting: Spawned | None = None  # (a recount while jobs run: in a thread of its own)
        self.spawn: Callable[[Callable[[], object]], Spawned] = in_thread  # (a shared waiter: in its pool)
        self.recount_after = STALLED_AFTER  # s without progress before a recount (doubles while it finds nothing)
        self.armed: tuple[str, int, str] | None = None  # (generation, done count, channel) armed in the wake key
        self.armed_at = 0.0  # (monotonic) when it was armed

    def progressed(self) -> None:
        self.delay = POLL_MIN
        self.outage_since = None

    def unreachable(self, exc: BackendUnavailable) -> None:
        """A server did not answer: wait for it (workers reconnect too), saying
        so, up to OUTAGE_GRACE seconds; then give up with its error."""
        self.outage(exc)
        time.sleep(0.5)

    def outage(self, exc: BackendUnavailable) -> None:
        """``unreachable`` without its pause (a shared waiter paces itself):
        note when the outage began, or raise once it lasted OUTAGE_GRACE s."""
        now = time.monotonic()
        if self.outage_since is None:
            self.outage_since = now
            log.warning("run %r: %s; waiting up to %.0fs for it to come back", self.runner.name, exc, OUTAGE_GRACE)
        elif now - self.outage_since > OUTAGE_GRACE:
            gen = self.runner._pm_gen
            home = self.runner.backend.store.holder(gen) if gen is not None else None
            if home is not None and exc.server == home:
                raise RunStateLost(
                    f"run {self.runner.name!r} (generation {gen}): its state is on the store server {home}, which "
                    f"has not answered for {OUTAGE_GRACE:.0f}s ({exc}); the run cannot complete. Other runs go on; "
                    "start it again (a new run goes to a server that is up)") from exc
            raise exc

    def pause(self, status: str, until_done: int | None = None) -> None:
        """Wait a while before the caller looks again: poll quickly at first,
        then, given the ``done`` count that would end this wait (``until_done``),
        block until the worker whose count reaches it wakes this process."""
        now = time.monotonic()
        name = self.runner.name
        self.check_deadline(now, status)
        if now - self.last_check >= CHECK_EVERY:
            self.last_check = now
            try:
                self._check(now, status)
                self.outage_since = None
            except BackendUnavailable as exc:
                self.unreachable(exc)
        if now - self.last_said >= STILL_WAITING_EVERY:
            self.last_said = now
            log.info("run %r: still waiting for %s (%s)", name, self.what, status)
        if until_done is not None and now - self.start >= ARM_AFTER and self._block(until_done, now):
            return
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.poll_max)

    def check_deadline(self, now: float, status: str) -> None:
        """Raise TimeoutError, saying what the wait waited for, once its timeout passed."""
        if self.timeout is not None and now - self.start >= self.timeout:
            raise TimeoutError(f"run {self.runner.name!r}: waited {self.timeout:g}s for {self.what}; {status}")

    def _block(self, until_done: int, now: float) -> bool:
        """Arm the run's wake key for ``until_done`` (then the caller looks once
        more: the count may have got there before), or block until woken or
        LOOK_EVERY passes.  False: no wake here (no listener, no generation)."""
        gen = self.runner._pm_gen
        if gen is None:
            return False
        try:
            listener = self.runner.backend.queue.listen()  # (this thread's, kept by the backend)
            if listener is None:
                return False
            if self.armed != (gen, until_done, listener.channel):
                self.armed, self.armed_at = (gen, until_done, listener.channel), now
                arm(self.runner.backend.store, prefix(self.runner.name, gen) + "wake", listener.channel, until_done,
                    _config.state_ttl())
                return True
            if now - self.armed_at < ARM_SETTLE:
                # (a batch that read the key before it was armed, too short to read it again, wakes nobody)
                time.sleep(SETTLE_POLL)
                return True
            left = LOOK_EVERY if self.timeout is None else min(LOOK_EVERY, self.start + self.timeout - now)
            listener.wait(max(0.0, left))
        except BackendUnavailable:  # (no wake now: poll; the checks say if the run's server is gone)
            return False
        return True

    def _recount(self, gen: str, quiet: bool) -> bool:
        """Recount the run (``Runner._recount``); whether it fixed anything.  The
        next recount without progress waits twice as long.  A recount while jobs
        are queued or running runs in a thread of its own (it settles for seconds,
        and the wait must still see the run end at once): False here, and what it
        fixes shows as progress."""
        if not quiet:
            if self.recounting is None or self.recounting.done():
                self.recounting = self.spawn(lambda: self._recount_now(gen, False))
            self.recount_after = min(self.recount_after * 2, RECOUNT_AFTER_MAX)
            self.recounted_at = time.monotonic()
            return False
        return self._recount_now(gen, True)

    def _recount_now(self, gen: str, quiet: bool) -> bool:
        try:
            fixed = self.runner._recount(gen, quiet) is not None
        except (TimeoutError, BackendUnavailable) as exc:  # the lock: another process recounts, or is gone
            log.warning("run %r: no recount now: %s", self.runner.name, exc)
            fixed = False
        now = time.monotonic()
        if fixed:
            self.empty_since, self.moved_at, self.recount_after = None, now, STALLED_AFTER
        else:
            self.recount_after = min(self.recount_after * 2, RECOUNT_AFTER_MAX)
        self.recounted_at = now
        return fixed

    def _check_away(self, gen: str | None, progress: Progress | None, stats: QueueStats, away: list[str],
                    now: float, status: str) -> None:
        """The run has not moved for OUTAGE_GRACE s while queue servers are away, and
        nothing is queued or running on those up, or (busy with other runs) the run's
        keys say its remaining jobs can only be on those away (``census.remaining_on``,
        asked once per OUTAGE_GRACE).  A server that stays away took them: the wait ends."""
        if gen is None or progress is None or progress.complete or not away:
            self.away_since = None
            return
        self.away_since = self.away_since or now
        if now - max(self.away_since, self.moved_at, self.placed_at) < OUTAGE_GRACE:
            return
        if stats.ready or stats.reserved or stats.delayed:
            self.placed_at = now
            away = remaining_on(self.runner.backend, self.runner.name, gen, away)
        if away:
            raise RunStateLost(
                f"run {self.runner.name!r} is at {status} and has not moved for {OUTAGE_GRACE:.0f}s: nothing of it "
                f"is queued or running on the queue servers that are up, so its remaining jobs are on "
                f"{', '.join(away)}, which cannot be reached; they run if it comes back with its binlog (wait "
                "again then), or start the run afresh")

    def _check(self, now: float, status: str) -> None:
        runner = self.runner
        gen = runner._gen()
        progress = alerts = None
        if gen is not None:
            state = runner._state()
            progress = state.progress(gen)  # raises RunStateLost
            alerts = state.alerts(gen)
        queue = runner.backend.queue
        # (uncounted: servers down now, which may hold jobs of the run, to run once they are back)
        self.judge(now, status, gen, progress, alerts, queue.stats(), queue.uncounted())

    def judge(self, now: float, status: str, gen: str | None, progress: Progress | None,
              alerts: tuple[bool, tuple[float, str] | None] | None, stats: QueueStats, uncounted: list[str]) -> None:
        """The checks of a wait, given what was read for them: the run's generation,
        progress and alerts (``RunState.alerts``; None without a generation), and the
        queue's stats and uncounted servers.  Raises Cancelled, SecretMismatch,
        RunStateLost or NoWorkers; may recount a stalled run."""
        runner = self.runner
        if progress is not None and progress.done != self.done_seen:
            self.done_seen, self.moved_at, self.recount_after = progress.done, now, STALLED_AFTER
        cancelled, rejected = alerts or (False, None)
        if cancelled:
            raise Cancelled(f"run {runner.name!r} was cancelled ({status})")
        if rejected is not None and rejected[0] >= self.started_at - REJECTED_BEFORE:
            raise SecretMismatch(
                f"run {runner.name!r} ({status}): workers refused jobs signed by this process "
                f"{time.time() - rejected[0]:.0f}s ago because their signature does not match: the workers "
                f"have another PACKMULE_SECRET (key id {rejected[1]}; this process's is "
                f"{runner._state().signer.key_id.hex()}). Every process, drivers and `packmule worker`s, must "
                "share the same PACKMULE_SECRET; the refused jobs are buried. Fix the secret, then forget() the "
                "run and queue it again")
        if gen is not None and not (stats.ready or stats.reserved or stats.delayed or uncounted):
            self.empty_since = self.empty_since or now
        else:
            self.empty_since = None
        quiet = self.empty_since is not None and now - self.empty_since >= STALLED_AFTER
        self._check_away(gen, progress, stats, uncounted, now, status)
        if gen is not None and progress is not None and progress.done < progress.total and (
                quiet or now - max(self.moved_at, self.recounted_at) >= self.recount_after):
            # no progress for a while (or nothing at all queued or running): a
            # worker may have died between two store writes; recount the run
            if self._recount(gen, quiet):
                return
            if quiet:  # nothing anywhere in the queue, nothing to recount: it will never complete
                raise RunStateLost(f"run {runner.name!r} is stalled: nothing is queued or running, yet it is "
                                   f"at {status}, and its value records say the same; its state was evicted "
                                   "or its jobs were lost (see `packmule status`)")
        if stats.workers > 0 or not (stats.ready or stats.delayed):
            self.idle_since = None
            return
        self.idle_since = self.idle_since or now
        idle = now - self.idle_since
        hint = getattr(runner.backend, "worker_hint", "start workers for this backend")
        if idle >= NO_WORKERS_RAISE:
            raise NoWorkers(f"run {runner.name!r}: no worker has served the queue for {idle:.0f}s while "
                            f"{stats.ready} jobs wait ({status}); {hint}")
        if idle >= NO_WORKERS_WARN and idle - 0.5 < NO_WORKERS_WARN:
            log.warning("run %r: no worker serves the queue (%d jobs wait); %s", runner.name, stats.ready, hint)
