"""A run's state in the store as the driver reads and writes it (``RunState``):
start or join a generation, read progress, alerts and values.  The keys are
``packmule._model.keys``'s; the value records ``packmule._model.records``'s.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

from packmule._core.errors import BackendUnavailable, RunStateLost
from packmule._core.types import JobRef, Progress
from packmule._model.keys import COUNTERS, job_id, pointer, prefix, rejected_key
from packmule._model.records import records
from packmule._model.registry import note_run
from packmule._transport.codec import Signer
from packmule._transport.spill import spill_values
from packmule._transport.wire import shard
from packmule.backends.base import Backend

__all__ = ["RunExists", "RunState", "alerts_of", "counters_gone", "current_gen", "new_gen", "progress_of", "ref_for"]


def new_gen() -> str:
    return os.urandom(4).hex()


class RunExists(Exception):
    """A fresh-only start found its run name taken (``RunState.start_or_join``)."""


class RunState:
    """The driver's view of one run name on one backend."""

    def __init__(self, backend: Backend, signer: Signer, name: str, ttl: float) -> None:
        self.backend, self.signer, self.name, self.ttl = backend, signer, name, ttl
        self.store = backend.store
        self.pointer = pointer(name)
        self.created = False

    # --- generations -------------------------------------------------------
    # A run name points to its generation: in the store when the store is one
    # consistent space (one server); in the backend's registers (ZooKeeper) when
    # it is spread over servers, so that two processes that disagree about which
    # servers are up never start two generations of one run.
    def current_gen(self) -> str | None:
        return current_gen(self.backend, self.name)

    def start_or_join(self, fields: Mapping[str, bytes | int] | None = None, fresh_only: bool = False) -> str:
        """The generation an outside enqueue adds to: the current one if it is
        still running, else a fresh one (the first caller's, among racers).
        ``fields`` (prefix-relative) are written with a fresh generation's
        counters, and may set their first values (an outside enqueue's counts);
        ``created`` says afterwards whether this call made it.  ``fresh_only``:
        a generation of this call's making, or ``RunExists`` (a schedule's tick
        queued by another process: the run name is the tick's identity)."""
        self.created = False
        registers = self.backend.registers
        for _ in range(5):
            if registers is not None:
                raw, token = registers.read(self.pointer)
                gen = raw.decode() if raw is not None else None
            else:
                gen = self.current_gen()
            if gen is not None and fresh_only:
                raise RunExists(f"run {self.name!r} exists already")
            if gen is not None:
                progress = self.progress(gen, missing_ok=True)
                if progress is not None and not progress.complete:
                    return gen
            fresh = self._create_gen(fields)
            if registers is not None:
                won = fresh if registers.swap(self.pointer, token, fresh.encode(), self.ttl) else None
            else:
                won = self._swap_in_store(gen, fresh)
            if won == fresh:
                self.created = True
                note_run(self.store, self.name, fresh, prefix(self.name, fresh), self.ttl)
            if won is not None and won != fresh and fresh_only:
                raise RunExists(f"run {self.name!r} was started by another process at the same time")
            if won is not None:
                return won
        raise RunStateLost(f"run {self.name!r}: its generation keeps changing under concurrent starts")

    def _swap_in_store(self, gen: str | None, fresh: str) -> str | None:
        """Point the name from ``gen`` (None: nothing) to ``fresh`` in the store;
        the generation it now points to (None: look again).  One store server:
        ``add`` picks one winner, of the pointer or of the old generation's ``next``."""
        if gen is None:
            return fresh if self.store.add_many({self.pointer: fresh.encode()}, self.ttl) else None
        successor = prefix(self.name, gen) + "next"
        if self.store.add_many({successor: fresh.encode()}, self.ttl):
            self.store.set_many({self.pointer: fresh.encode()}, self.ttl)
            return fresh
        won: bytes | None = self.store.get_many([successor]).get(successor)
        return won.decode() if won is not None else None

    def _create_gen(self, fields: Mapping[str, bytes | int] | None = None) -> str:
        """A new generation whose keys live on a store server this process sees
        up (should that server fail now, it is set aside and another is drawn)."""
        for _ in range(3):
            for _ in range(64):  # (with half the servers down, 64 draws all miss once in 2**64)
                gen = new_gen()
                if self.store.placeable(gen):
                    break
            p = prefix(self.name, gen)
            items: dict[str, bytes | int] = {p + "total": 0, p + "done": 0, p + "failed": 0, p + "seq": 0,
                                             p + "held": 0, p + "wake": b""}  # (wake: _model/wake.py)
            items.update((p + field, value) for field, value in (fields or {}).items())
            try:
                self.store.add_many(spill_values(self.store, self.signer, items, self.ttl), self.ttl)
            except BackendUnavailable:
                if self.store.placeable(gen):
                    raise  # (not set aside: one store, or every server is away)
                continue
            return gen
        raise self_unavailable(self.name)

    def forget_pointer(self) -> None:
        """The name points nowhere now (``forget``)."""
        registers = self.backend.registers
        if registers is None:
            self.store.delete_many([self.pointer])
            return
        for _ in range(5):
            raw, token = registers.read(self.pointer)
            if raw is None and token is None or registers.swap(self.pointer, token, None, self.ttl):
                return

    # --- progress ----------------------------------------------------------
    def progress(self, gen: str, missing_ok: bool = False) -> Progress | None:
        keys = self.counter_keys(gen)
        got = progress_of(keys, self.store.get_many(keys))
        if got is None and not missing_ok:
            raise counters_gone(self.name, gen)
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
        cancel, rejected = self.alert_keys(gen)
        return alerts_of(self.store.get_many([cancel, rejected]), cancel, rejected)

    def alert_keys(self, gen: str) -> tuple[str, str]:
        """The keys ``alerts`` reads: the run's cancel flag, and this secret's refusals."""
        return prefix(self.name, gen) + "cancel", rejected_key(self.signer.key_id.hex())

    def root_path(self, gen: str) -> str | None:
        key = prefix(self.name, gen) + "root"
        raw = self.store.get_many([key]).get(key)
        return raw.decode() if raw is not None else None

    def records(self, ids: Sequence[str]) -> dict[str, tuple[Any, ...]]:
        return records(self.store, self.signer, ids)


def self_unavailable(name: str) -> BackendUnavailable:
    return BackendUnavailable(f"run {name!r}: three store servers in a row failed while its new generation "
                              "was being made; see the warnings logged for each")


def alerts_of(got: Mapping[str, bytes], cancel: str, rejected: str) -> tuple[bool, tuple[float, str] | None]:
    """What a bulk get of ``RunState.alert_keys`` says: cancelled, and the last refusal (when, their key id)."""
    note = None
    if rejected in got:
        when, _, theirs = got[rejected].decode("ascii", "replace").partition(" ")
        note = (float(when), theirs)
    return cancel in got, note


def counters_gone(name: str, gen: str) -> RunStateLost:
    """The error of a wait that finds the run's counters gone."""
    return RunStateLost(f"run {name!r} (generation {gen}): its counters are gone from the store "
                        "(restarted, evicted, or forgotten); the run cannot complete")


def current_gen(backend: Backend, name: str) -> str | None:
    """The generation the run name points to, or None."""
    key = pointer(name)
    raw = backend.registers.read(key)[0] if backend.registers is not None else backend.store.get_many([key]).get(key)
    return raw.decode() if raw is not None else None


def ref_for(backend: Backend, name: str, gen: str, path: str) -> JobRef:
    return JobRef(job_id(name, gen, path), backend.queue.server_for(shard(name, gen, path)))


def progress_of(keys: list[str], got: dict[str, bytes]) -> Progress | None:
    """The Progress that a bulk get of ``counter_keys`` found, or None if a counter is gone."""
    if not all(k in got for k in keys):
        return None
    done, total, failed = (int(got[k]) for k in keys)
    return Progress(done, total, failed)
