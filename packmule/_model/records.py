"""A run's state in the store: the reads and writes the driver makes (start
or join a run, read progress, read values).  The keys are ``packmule._model.keys``'s.

Value records (signed pickles): ``('ok', value)``, ``('ref', job id)``,
``('err', failure info)``, ``('gone',)`` (consumed, not recorded), ``('void',)``
(its enqueue failed: it never ran and never counts).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from packmule._core.errors import JobFailed, NotReady, RunStateLost, ValuesNotRecorded
from packmule._core.types import JobRef, Progress
from packmule._model.keys import COUNTERS, job_id, pointer, prefix, rejected_key, value_key
from packmule._model.registry import note_run
from packmule._transport.codec import Signer
from packmule._transport.spill import gather
from packmule._transport.wire import shard
from packmule.backends.base import Backend, Store

GONE = ("gone",)
VOID = ("void",)  # the value of a job whose enqueue failed: it never counts, and a stray copy never runs


def new_gen() -> str:
    return os.urandom(4).hex()


class RunState:
    """The driver's view of one run name on one backend."""

    def __init__(self, backend: Backend, signer: Signer, name: str, ttl: float) -> None:
        self.backend, self.signer, self.name, self.ttl = backend, signer, name, ttl
        self.store = backend.store
        self.pointer = pointer(name)

    # --- generations -------------------------------------------------------
    def current_gen(self) -> str | None:
        raw = self.store.get_many([self.pointer]).get(self.pointer)
        return raw.decode() if raw is not None else None

    def start_or_join(self) -> str:
        """The generation an outside enqueue adds to: the current one if it is
        still running, else a fresh one (the first caller's, among racers)."""
        for _ in range(5):
            gen = self.current_gen()
            if gen is None:
                fresh = self._create_gen()
                if self.store.add_many({self.pointer: fresh.encode()}, self.ttl):
                    note_run(self.store, self.name, fresh, prefix(self.name, fresh), self.ttl)
                    return fresh
                continue
            progress = self.progress(gen, missing_ok=True)
            if progress is None or progress.complete:
                fresh = self._create_gen()
                successor = prefix(self.name, gen) + "next"
                if self.store.add_many({successor: fresh.encode()}, self.ttl):
                    note_run(self.store, self.name, fresh, prefix(self.name, fresh), self.ttl)
                    self.store.set_many({self.pointer: fresh.encode()}, self.ttl)
                    return fresh
                won: bytes | None = self.store.get_many([successor]).get(successor)
                if won is not None:
                    return won.decode()
                continue
            return gen
        raise RunStateLost(f"run {self.name!r}: its generation keeps changing under concurrent starts")

    def _create_gen(self) -> str:
        gen = new_gen()
        p = prefix(self.name, gen)
        self.store.add_many({p + "total": 0, p + "done": 0, p + "failed": 0, p + "seq": 0}, self.ttl)
        return gen

    # --- progress ----------------------------------------------------------
    def progress(self, gen: str, missing_ok: bool = False) -> Progress | None:
        keys = self.counter_keys(gen)
        got = progress_of(keys, self.store.get_many(keys))
        if got is None and not missing_ok:
            raise RunStateLost(
                f"run {self.name!r} (generation {gen}): its counters are gone from the store "
                "(restarted, evicted, or forgotten); the run cannot complete"
            )
        return got

    def counter_keys(self, gen: str) -> list[str]:
        """The keys of the run's ``done``, ``total`` and ``failed`` counters, in
        that order (``progress_of`` reads them from a bulk get)."""
        p = prefix(self.name, gen)
        return [p + c for c in COUNTERS]

    def cancelled(self, gen: str) -> bool:
        key = prefix(self.name, gen) + "cancel"
        return key in self.store.get_many([key])

    def alerts(self, gen: str) -> tuple[bool, tuple[float, str] | None]:
        """In one read: whether the run is cancelled, and when workers last refused
        a job signed with this process's secret (with the key id of theirs)."""
        cancel, rejected = prefix(self.name, gen) + "cancel", rejected_key(self.signer.key_id.hex())
        got = self.store.get_many([cancel, rejected])
        note = None
        if rejected in got:
            when, _, theirs = got[rejected].decode("ascii", "replace").partition(" ")
            note = (float(when), theirs)
        return cancel in got, note

    def root_path(self, gen: str) -> str | None:
        key = prefix(self.name, gen) + "root"
        raw = self.store.get_many([key]).get(key)
        return raw.decode() if raw is not None else None

    def records(self, ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        return records(self.store, self.signer, ids)


def records(
    store: Store, signer: Signer, ids: Sequence[str], trail: list[str] | None = None
) -> dict[str, tuple[Any, ...]]:
    """Final value records of these job ids, following ``('ref', id)`` to the
    end; ids whose value does not exist yet are left out.  ``trail`` collects
    the ids passed through on the way (to mark them consumed)."""
    pending = {i: i for i in ids}  # asked id -> id whose record we need now
    out: dict[str, tuple[Any, ...]] = {}
    for _ in range(1000):
        if not pending:
            return out
        keys = {value_key(cur): asked for asked, cur in pending.items()}
        got = gather(store, signer, store.get_many(list(keys)))
        nxt = {}
        for key, asked in keys.items():
            raw = got.get(key)
            if raw is None:
                continue
            rec = signer.loads(raw)
            if rec[0] == "ref":
                nxt[asked] = rec[1]
                if trail is not None:
                    trail.append(rec[1])
            else:
                out[asked] = rec
        pending = nxt
    raise RunStateLost("a chain of 1000 JobRefs: does a job return a reference to itself?")


def unwrap(record: Any, ref_id: str) -> Any:
    """The value in a final record, or the error it stands for."""
    kind = record[0]
    if kind == "ok":
        return record[1]
    if kind == "err":
        raise JobFailed(record[1])
    if kind == "gone":
        raise ValuesNotRecorded(
            f"the value of {ref_id} was not recorded: the runner has record_return_values=False "
            "(set it to True to read values with get_return_value)"
        )
    raise NotReady(f"{ref_id} has no value yet")


def ref_for(backend: Backend, name: str, gen: str, path: str) -> JobRef:
    return JobRef(job_id(name, gen, path), backend.queue.server_for(shard(name, gen, path)))


def progress_of(keys: list[str], got: dict[str, bytes]) -> Progress | None:
    """The Progress that a bulk get of ``counter_keys`` found, or None if a counter is gone."""
    if not all(k in got for k in keys):
        return None
    done, total, failed = (int(got[k]) for k in keys)
    return Progress(done, total, failed)
