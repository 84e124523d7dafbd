"""A run's tree of jobs, read back from the store, for the two things that need
all of it: ``forget`` (delete every key the run has) and the recount of a
stalled run.

The tree is found from keys the engine writes anyway: outside jobs have the
paths ``0 .. seq-1`` less the gaps an outside enqueue left (``gap:<path>``);
a job that enqueued has ``cm:<path>`` = the number of positions it used
(``"<n> counted"`` once its children are counted in ``total``, see
``packmule._worker.recovery``), and its children are ``<path>.0 ..``; a position that
holds a continuation has a ``spec:<path>``.

Why a recount is needed: on a store without multi-key transactions (memcached)
a worker killed between its commit's writes leaves the run short: its value is
stored, but ``done`` (or ``total``, or a continuation's arrived-inputs counter)
was never incremented, or a continuation that became ready was never queued.
Counts are what the value records say, so a run that stalls (nothing queued or
running, ``done < total``) is recounted from them, under a lock, and the
continuations whose inputs are all there are queued.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import Any

from packmule._model.job import Spec
from packmule._model.keys import FAILED_FIELD, PATH_FIELDS, QUEUED_FIELD, RUN_FIELDS, prefix, recount_lock
from packmule._model.placement import marker_key, put
from packmule._transport.codec import Signer
from packmule._transport.spill import gather
from packmule._transport.wire import Task, encode, shard
from packmule.backends.base import Backend, Store

__all__ = ["COUNTED", "LOCK_TIMEOUT", "READ", "SETTLE", "Node", "counted", "delete", "lock_run", "positions", "read",
           "recount", "remaining_on", "run_keys", "walk"]

log = logging.getLogger("packmule")

READ = 1000  # keys a bulk read or delete carries
SETTLE = 2.0  # s between reading a run's values and its counters, in a recount
LOCK_TIMEOUT = 60.0  # s to wait while another process recounts the same run
COUNTED = b" counted"  # how a commit marker ends once its children are counted in total


def _chunks(keys: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(keys), READ):
        yield keys[start:start + READ]


def read(store: Store, keys: Sequence[str]) -> dict[str, bytes]:
    got: dict[str, bytes] = {}
    for part in _chunks(keys):
        got.update(store.get_many(part))
    return got


def positions(marker: bytes) -> int:
    """The positions a commit marker (``cm:``) says its job used."""
    return int(marker.split()[0])


def counted(marker: bytes) -> bool:
    """Whether a commit marker says its job's children are counted in ``total``."""
    return marker.endswith(COUNTED)


def lock_run(backend: Backend, name: str) -> AbstractContextManager[None]:
    """The lock under which the run ``name`` is recounted, one process at a time."""
    lock: AbstractContextManager[None] = backend.lock(recount_lock(name), LOCK_TIMEOUT)
    return lock


@dataclass
class Node:
    path: str
    value: bytes | None = None  # the signed value record, raw
    positions: int = 0  # what cm: says: children and continuations it made
    spec: bytes | None = None  # a continuation's spec, raw
    children: list[str] = field(default_factory=list)


def walk(store: Store, p: str, with_values: bool) -> dict[str, Node]:
    """Every path of the run ``p`` (its key prefix) that the store can name,
    level by level, with what each node's keys say (values only if asked)."""
    seq_raw = store.get_many([p + "seq"]).get(p + "seq")
    seq = int(seq_raw) if seq_raw is not None else 0
    tops = [str(i) for i in range(seq)]
    top_kinds = ("cm:", "gap:", "v:") if with_values else ("cm:", "gap:")
    got = read(store, [p + kind + path for path in tops for kind in top_kinds])
    nodes: dict[str, Node] = {}
    i = 0
    while i < seq:
        gap = got.get(f"{p}gap:{i}")
        if gap is not None:
            i += int(gap)
            continue
        path = str(i)
        nodes[path] = Node(path, got.get(p + "v:" + path), positions(got.get(p + "cm:" + path, b"0")))
        i += 1
    level = [n for n in nodes.values() if n.positions]
    while level:
        paths = [f"{n.path}.{k}" for n in level for k in range(n.positions)]
        kinds = ("cm:", "spec:", "v:") if with_values else ("cm:",)
        got = read(store, [p + kind + path for path in paths for kind in kinds])
        for parent in level:
            parent.children = [f"{parent.path}.{k}" for k in range(parent.positions)]
        for path in paths:
            nodes[path] = Node(path, got.get(p + "v:" + path), positions(got.get(p + "cm:" + path, b"0")),
                               got.get(p + "spec:" + path))
        level = [nodes[path] for path in paths if nodes[path].positions]
    return nodes


def run_keys(store: Store, name: str, gen: str, p: str) -> list[str]:
    """Every key of generation ``gen`` of run ``name`` that can be named.  (The
    chunks of a value too large for one key expire with the run instead.)"""
    nodes = walk(store, p, with_values=False)
    failed_raw = store.get_many([p + "failed"]).get(p + "failed")
    failures = int(failed_raw) if failed_raw is not None else 0
    keys = [p + k for k in RUN_FIELDS]
    keys += [f"{p}{FAILED_FIELD}{k}" for k in range(1, failures + 1)]
    keys += [p + kind + path for path in nodes for kind in PATH_FIELDS]
    keys += [p + QUEUED_FIELD + block for block in {shard(name, gen, path).split("/")[2] for path in nodes}]
    return keys


def delete(store: Store, keys: Sequence[str]) -> None:
    for part in _chunks(keys):
        store.delete_many(part)


def recount(backend: Backend, signer: Signer, name: str, gen: str, p: str, ttl: float, quiet: bool = False,
            settle: float = SETTLE) -> str | None:
    """Recount a stalled run from its value records (the caller holds the
    run's repair lock): fix ``total``/``done``/``failed``, apply a finished
    continuation's hand-offs, and queue each continuation whose inputs are all
    there.  ``quiet``: nothing at all is queued or running, so a continuation
    that is not complete is not queued either (its put was lost with a queue
    server, or with the worker that counted its last input): queue it too.
    Returns what it fixed, or None if there was nothing to fix."""
    store = backend.store
    nodes = walk(store, p, with_values=True)
    # The counters are read a while after the values: a live worker's commit
    # between its two writes then has its counts in, so what the counters lack
    # is what dead workers never wrote (or less, never more: only positive
    # differences are added, and a continuation is queued only by the caller
    # whose increment completes its count).
    time.sleep(settle)
    raw = {path: n.value for path, n in nodes.items() if n.value is not None}
    records: dict[str, Any] = dict(zip(raw, signer.loads_many(gather(store, signer, raw).values()), strict=True))
    specs = {path: Spec(**signer.loads(n.spec)) for path, n in nodes.items() if n.spec is not None}
    fixes: list[str] = []

    _hand_off(store, signer, name, gen, p, ttl, records, specs, fixes)

    jobs = [path for path, n in nodes.items() if n.spec is None and records.get(path) != ("void",)]
    total = len(jobs)
    done = sum(1 for path in jobs if path in records)
    failed = sum(1 for path in jobs if _failed_job(records, specs, name, gen, path))
    counters = store.get_many([p + "total", p + "done", p + "failed"])
    if len(counters) < 3:
        return None  # the state is really gone: nothing to recount into
    deltas: dict[str, int] = {}
    for key, true in (("total", total), ("done", done), ("failed", failed)):
        now = int(counters[p + key])
        if true > now:
            deltas[p + key] = true - now
            fixes.append(f"{key} {now} -> {true}")

    arrived = _arrived(store, name, gen, p, records, specs, quiet, deltas)
    results = store.incr_many(deltas) if deltas else {}
    # queued by whoever's increment completes the count; when all is quiet, any
    # whose count is complete (a polled one, counted 0, checks its inputs itself)
    ready = [Task(name, gen, path, None, (), {}, spec.digest, spec.ttr, spec.max_retries, spec.retry_delay,
                  spec.record, ())
             for key, (count, spec, path) in arrived.items()
             if (results.get(key) == spec.counted if key in deltas else quiet and count >= spec.counted)]
    if ready:
        put(backend, signer, encode(signer, ready), ttl)
        fixes.append(f"{len(ready)} continuations queued")
    if not fixes:
        return None
    log.warning("run %r (generation %s) was stalled; recounted from its value records: %s", name, gen,
                ", ".join(fixes))
    return ", ".join(fixes)


def _hand_off(store: Store, signer: Signer, name: str, gen: str, p: str, ttl: float, records: dict[str, Any],
              specs: dict[str, Spec], fixes: list[str]) -> None:
    """(``recount``) Apply the hand-offs of the continuations that have a value."""
    # a continuation that completed but died before it handed its value to the
    # jobs that returned it
    handoffs: dict[str, bytes] = {}
    for path, spec in specs.items():
        if path in records:
            for finished, _ in spec.finishes:
                if finished not in records:
                    handoffs[p + "v:" + finished] = signer.dumps(("ref", f"{name}/{gen}/{path}"))
                    records[finished] = ("ref", f"{name}/{gen}/{path}")
    if handoffs:
        store.set_many(handoffs, ttl)
        fixes.append(f"{len(handoffs)} hand-offs")


def _failed_job(records: dict[str, Any], specs: dict[str, Spec], name: str, gen: str, path: str) -> bool:
    """(``recount``) Whether the job at ``path`` failed, as the engine counts it: its
    own error, or that of the continuation it handed its value to."""
    rec = records.get(path)
    if rec is None or rec[0] not in ("err", "ref"):
        return False
    if rec[0] == "err":
        return True
    ref_name, ref_gen, target = rec[1].split("/")
    spec = specs.get(target) if (ref_name, ref_gen) == (name, gen) else None
    if spec is None or all(finished != path for finished, _ in spec.finishes):
        return False
    return (records.get(target) or ("",))[0] == "err"


def _arrived(store: Store, name: str, gen: str, p: str, records: dict[str, Any], specs: dict[str, Spec],
             quiet: bool, deltas: dict[str, int]) -> dict[str, tuple[int, Spec, str]]:
    """(``recount``) The continuations to count and maybe queue: n: key -> (inputs
    arrived, spec, path); the arrived counts their counters lack go in ``deltas``."""
    # continuations whose own inputs all arrived but that were never queued
    arrived: dict[str, tuple[int, Spec, str]] = {}  # n: key -> (inputs arrived, spec, path)
    for path, spec in specs.items():
        if path in records or (spec.counted == 0 and not quiet):
            continue
        parent = path.rpartition(".")[0]
        own = {i.rpartition("/")[2] for i in spec.inputs
               if i.startswith(f"{name}/{gen}/") and i.rpartition("/")[2].rpartition(".")[0] == parent}
        arrived[p + "n:" + path] = (sum(1 for i in own if i in records), spec, path)
    if arrived:
        now_n = store.get_many(list(arrived))
        for key, (count, _, _) in arrived.items():
            current = int(now_n.get(key, b"0"))
            if count > current:
                deltas[key] = count - current
    return arrived


def remaining_on(backend: Backend, name: str, gen: str, away: Sequence[str]) -> list[str]:
    """The queue servers of ``away`` that hold every remaining job of the run
    generation, as far as the store says (see ``_model.placement``); [] if one
    may be on a server that is up, or no job remains to be queued."""
    store, p = backend.store, prefix(name, gen)
    nodes = walk(store, p, with_values=True)
    open_ = {shard(name, gen, path) for path, node in nodes.items() if node.value is None and not node.positions}
    markers = [key for key in map(marker_key, open_) if key is not None]
    if not open_ or (markers and store.get_many(markers)):
        return []
    servers = {backend.queue.server_for(s) for s in open_}
    return sorted(servers) if servers <= set(away) else []
