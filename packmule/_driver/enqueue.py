"""Queueing jobs from outside any job (a mixin of ``Runner``): store the runner's
blob once, take the jobs' paths from the run's ``seq`` counter and count them in
``total`` in one bulk ``incr`` (or make the run's generation with them), put the bundles server by server, and take back
the count of what could not be put; and, first, refuse arguments or a runner
too large for packmule to carry.  (Inside a job, ``Runner._enqueue`` buffers the
jobs in the job's context instead: they are committed when it returns.)"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from packmule._core import config as _config
from packmule._core.errors import RunStateLost
from packmule._core.types import JobRef
from packmule._driver import dashboard as _dashboard
from packmule._driver.run_state import RunState
from packmule._model.keys import BLOB_FIELD, blob_key, prefix
from packmule._model.placement import put
from packmule._model.records import VOID
from packmule._model.timing import check_priority, due_time
from packmule._transport.codec import dumps, signer_for
from packmule._transport.spill import spill_values
from packmule._transport.wire import BUNDLE, Entries, Task, count, expand, pack, shard
from packmule.backends import _choice
from packmule.backends.base import Backend, Put

__all__ = ["Enqueuer"]

_stored_blobs: set[tuple[int, str, str]] = set()  # (id(store), gen, digest) this process has stored (a fork
#                                                    child keeps it: what its parent stored is in the same store)


class Enqueuer:
    """``Runner``'s outside enqueue (``Runner`` is its only subclass)."""

    if TYPE_CHECKING:  # (what it uses of Runner)
        name: str
        priority: int
        _pm_gen: str | None
        _pm_fresh_only: bool

        @property
        def backend(self) -> Backend: ...
        def _state(self) -> RunState: ...
        def _serialize(self, what: str, obj: Any) -> bytes: ...

    def _queue_outside(self, method: str, chunks: list[Entries], entries: list[bytes], digest: str,
                       runner_blob: bytes, options: tuple[float, int, float, bool],
                       timing: tuple[int, float]) -> list[JobRef]:
        """Queue the jobs of ``chunks`` from outside any job (their pickled
        ``entries``, the runner's blob, options and (priority, due) checked already)."""
        ttr, retries, delay, record = options
        backend = self.backend
        sizes = [count(chunk) for chunk in chunks]
        jobs = sum(sizes)
        if not jobs:
            return []
        backend.ensure_workers()
        _dashboard.serve_from_driver(backend)  # PACKMULE_DASHBOARD_PORT
        state = self._state()
        # a bundle must be one block of paths (one server): a bulk call takes a
        # range wide enough to start at a multiple of BUNDLE; the gap is unused
        span = 1 if jobs == 1 else jobs + BUNDLE - 1
        held = jobs if timing[1] else 0  # (jobs that wait for their time: counted in `held` until done)
        gen = self._pm_gen or state.start_or_join(first_fields(digest, runner_blob, jobs, span, held),
                                                  fresh_only=self._pm_fresh_only)
        p = prefix(self.name, gen)
        stored = (id(backend.store), gen, digest)
        if not state.created and stored not in _stored_blobs:
            backend.store.add_many(spill_values(backend.store, state.signer, {blob_key(p, digest): runner_blob},
                                                state.ttl), state.ttl)
        if len(_stored_blobs) >= 4096:
            _stored_blobs.clear()  # (forgetting costs one add the next time)
        _stored_blobs.add(stored)
        last = span if state.created else self._take_paths(backend, p, span, jobs, held)
        self._pm_gen = gen
        _choice.note_run(self.name, gen)  # (packmule.testing's join watches the runs a test queued)
        first_free = last - span
        base = -(-first_free // BUNDLE) * BUNDLE if span > 1 else first_free
        signer = signer_for(backend)
        by_server: dict[str, tuple[list[Put], list[str]]] = {}  # server -> (its puts, the paths they carry)
        for i, (chunk, blob, size) in enumerate(zip(chunks, entries, sizes, strict=True)):
            start = base + i * BUNDLE
            first = Task(self.name, gen, str(start), method, (), {}, digest, ttr, retries, delay, record, (), *timing)
            puts, paths = by_server.setdefault(backend.queue.server_for(shard(self.name, gen, str(start))), ([], []))
            puts += pack(signer, first, blob, size, lambda chunk=chunk: expand(chunk))  # type: ignore[misc]
            paths += map(str, range(start, start + size))
        marks = {} if state.created else {p + field: value for field, value in marks_of(first_free, base, jobs, last)}
        self._put(backend, state, p, marks, by_server, bool(held))
        head = f"{self.name}/{gen}/"
        refs = []
        for i, size in enumerate(sizes):
            start = base + i * BUNDLE
            server = backend.queue.server_for(shard(self.name, gen, str(start)))
            refs += [JobRef.fast(head + str(start + j), server) for j in range(size)]
        return refs

    def _timing(self, delay: object, at: object, priority: object) -> tuple[int, float]:
        """(priority, due) of jobs queued now with these options, refused at the call if bad."""
        if priority is None:
            priority = check_priority(self.priority, f"{type(self).__name__}.priority")
        limit, whose = self.backend.queue.max_delay, "the longest delay of the queue"
        if _config.state_ttl() < limit:
            limit, whose = _config.state_ttl(), "the lifetime of a run's state (PACKMULE_STATE_TTL)"
        return check_priority(priority), due_time(delay, at, limit, whose)

    def _take_paths(self, backend: Backend, p: str, span: int, jobs: int, held: int) -> int:
        """Count ``jobs`` in the run's ``total`` (and ``held`` of them in its
        ``held``) and take ``span`` paths from its ``seq``, in one bulk incr; the
        last path taken, plus one."""
        counts = {p + "seq": span, p + "total": jobs}
        if held:
            counts[p + "held"] = held
        counters = backend.store.incr_many(counts)
        last = counters.get(p + "seq")
        if last is None or counters.get(p + "total") is None:
            self._pm_gen = None
            raise RunStateLost(f"run {self.name!r}: its state vanished from the store while jobs were "
                               "being queued (store restarted or run forgotten); nothing was queued")
        return last

    def _put(self, backend: Backend, state: RunState, p: str, marks: dict[str, bytes],
             by_server: dict[str, tuple[list[Put], list[str]]], held: bool = False) -> None:
        """Queue the puts of an outside enqueue, server by server (their preferred
        servers: ``put_many`` fails over to another that is up, and raises only
        when none would take them), its jobs counted in ``total`` already.  If a
        put fails, the jobs of that server and
        of those not reached are taken back: each gets a void value (should a
        failed put have queued some, they find their value taken and count
        nothing), and the count of those whose void this call added comes off
        ``total``.  A job whose value was there first was queued after all, and
        a worker completed it: it stays counted.  Then the error is raised."""
        servers = list(by_server)
        done = 0
        try:
            if marks:
                backend.store.add_many(marks, state.ttl)
            for server in servers:
                put(backend, state.signer, by_server[server][0], state.ttl)
                done += 1
        except BaseException as exc:
            lost = [path for server in servers[done:] for path in by_server[server][1]]
            try:
                void = state.signer.dumps(VOID)
                voided = backend.store.add_many({p + "v:" + path: void for path in lost}, state.ttl)
                if voided:
                    backend.store.incr_many({p + "total": -len(voided), **({p + "held": -len(voided)} if held else {})})
            except Exception as undo:
                exc.add_note(f"packmule could not take back the count of the {len(lost)} jobs not queued "
                             f"({undo!r}): run {self.name!r} will not complete; forget() it")
                raise
            ran = len(lost) - len(voided)
            exc.add_note(f"run {self.name!r}: none of the {len(voided)} jobs of this call that were not queued "
                         "is counted" + (f"; {ran} more were queued after all, ran and count" if ran else
                                         "; the run's progress is as it was before the call"))
            raise

    def _check_sizes(self, method: str, chunks: list[Entries], entries: list[bytes], runner_blob: bytes) -> None:
        """Refuse, before anything is counted or queued, a job whose pickled
        arguments or runner is over packmule's payload limit (the same on every
        backend: what works on one works on all)."""
        limit = _config.max_payload()
        if len(runner_blob) > limit:
            raise ValueError(f"the runner {self!r} is {len(runner_blob):,} bytes pickled, over packmule's limit "
                             f"of {limit:,} bytes (PACKMULE_MAX_PAYLOAD); keep large data out of its attributes "
                             "(pass a path or a key instead), or raise the limit")
        for chunk, blob in zip(chunks, entries, strict=True):
            if len(blob) <= limit:
                continue
            for args, kwargs, _ in expand(chunk):
                size = len(dumps((args, kwargs)))
                if size > limit:
                    raise ValueError(f"the arguments of {method} are {size:,} bytes pickled, over packmule's "
                                     f"limit of {limit:,} bytes (PACKMULE_MAX_PAYLOAD); pass a path or a key to "
                                     "the data instead, or raise the limit")

    def _entries(self, method: str, chunk: Entries) -> bytes:
        try:
            return dumps(chunk)
        except Exception:
            for args, kwargs, _ in expand(chunk):
                self._serialize(f"the arguments of {method}{args!r}"[:300], (args, kwargs))
            raise


def marks_of(first_free: int, base: int, jobs: int, last: int) -> list[tuple[str, bytes]]:
    """The fields an outside enqueue of the paths ``first_free`` to ``last`` marks:
    the generation's root if it is its first, and the paths of the range left
    unused, before and after the jobs, so that a recount knows they held no job."""
    marks = [("root", b"0")] if first_free == 0 else []
    for start, end in ((first_free, base), (base + jobs, last)):
        if end > start:
            marks.append(("gap:" + str(start), str(end - start).encode()))
    return marks


def first_fields(digest: str, runner_blob: bytes, jobs: int, span: int, held: int = 0) -> dict[str, bytes | int]:
    """What a generation that an outside enqueue makes is made with: the runner's
    blob, and that enqueue's counts and marks (its paths start at 0), so that it
    is counted from its first moment, and needs no incr or add after it."""
    return {BLOB_FIELD + digest: runner_blob, "seq": span, "total": jobs, "held": held,
            **dict(marks_of(0, 0, jobs, span))}
