"""A run's state in the store as the driver reads and writes it (``RunState``):
start or join a generation, read progress, alerts and values.  The keys are
``packmule._model.keys``'s; the value records ``packmule._model.records``'s.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from packmule._core.errors import RunStateLost
from packmule._core.types import JobRef, Progress
from packmule._model.keys import COUNTERS, job_id, pointer, prefix, rejected_key
from packmule._model.records import records
from packmule._model.registry import note_run
from packmule._transport.codec import Signer
from packmule._transport.wire import shard
from packmule.backends.base import Backend

__all__ = ["RunState", "new_gen", "progress_of", "ref_for"]


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


def ref_for(backend: Backend, name: str, gen: str, path: str) -> JobRef:
    return JobRef(job_id(name, gen, path), backend.queue.server_for(shard(name, gen, path)))


def progress_of(keys: list[str], got: dict[str, bytes]) -> Progress | None:
    """The Progress that a bulk get of ``counter_keys`` found, or None if a counter is gone."""
    if not all(k in got for k in keys):
        return None
    done, total, failed = (int(got[k]) for k in keys)
    return Progress(done, total, failed)
