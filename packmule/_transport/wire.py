"""What travels on the queue: bundles of jobs.

A queue item carries up to ``BUNDLE`` jobs that share a run, a method and
options (one signature and one pickle for all of them); its jobs' paths are
``<prefix><start + i>``.  Bundles are only transport: each job keeps its own
identity, value key and effects, and a worker splits a bundle of slow or
unknown jobs so that other workers get a share (``packmule._worker.engine``).

Payload: ``(name, gen, method, digest, ttr, max_retries, retry_delay, record,
priority, due, path_prefix, start, entries)`` with ``entries`` pickled, in one of two forms:
a list of ``(args, kwargs, watchers)``, one per job; or, from
``enqueue_each``, a tuple ``(items, args, kwargs)``: job ``i`` runs with
``(items[i], *args)`` and ``kwargs`` and has no watchers (the driver then
builds nothing per job, and the pickle is smaller).  ``method`` None is a
continuation, whose method and inputs are in the store under its spec key.
"""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from packmule._transport.codec import Signer, dumps
from packmule.backends.base import Put

__all__ = ["BUNDLE", "MAX_BYTES", "Entries", "Entry", "Task", "count", "decode", "encode", "expand", "pack", "shard",
           "split_path"]

BUNDLE = 256  # jobs per queue item, at most
MAX_BYTES = 48_000  # a bundle bigger than this is split (beanstalkd's default limit is 65,535)


# a job in a bundle: (args, kwargs, watchers)
Entry = tuple[tuple[Any, ...], dict[str, Any], tuple[tuple[str, int], ...]]
# a bundle's jobs: a list of Entry, or enqueue_each's (items, args, kwargs)
Entries = list[Entry] | tuple[Sequence[Any], tuple[Any, ...], dict[str, Any]]


def expand(entries: Entries) -> list[Entry]:
    """Each job's ``(args, kwargs, watchers)``, whatever the form of ``entries``."""
    if isinstance(entries, tuple):
        items, args, kwargs = entries
        return [((item, *args), kwargs, ()) for item in items]
    return entries


def count(entries: Entries) -> int:
    return len(entries[0]) if isinstance(entries, tuple) else len(entries)


class Task(NamedTuple):
    """One job (or continuation) as the engine sees it."""

    name: str
    gen: str
    path: str
    method: str | None
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    digest: str  # the runner blob's key
    ttr: float
    max_retries: int
    retry_delay: float
    record: bool
    watchers: tuple[tuple[str, int], ...]  # (continuation path, inputs it counts)
    priority: int = 0  # higher runs first (backends.base.PRIORITIES)
    due: float = 0.0  # Unix time before which it must not run (0: none); a bundle has one

    @property
    def header(self) -> tuple[Any, ...]:
        return (self.name, self.gen, self.method, self.digest, self.ttr, self.max_retries, self.retry_delay,
                self.record, self.priority, self.due)

    @property
    def id(self) -> str:
        return f"{self.name}/{self.gen}/{self.path}"


def split_path(path: str) -> tuple[str, int]:
    head, _, last = path.rpartition(".")
    return (head + "." if head else ""), int(last)


def shard(name: str, gen: str, path: str) -> str:
    """The shard key that picks a job's server: jobs are bundled only within
    blocks of BUNDLE consecutive siblings, so every job of a bundle (and every
    JobRef made before the bundle was) names the same server."""
    prefix, i = split_path(path)
    return f"{name}/{gen}/{prefix}{i // BUNDLE}"


def shard_gen(shard: str) -> str:
    """The run generation of a job with this shard key."""
    return shard.split("/", 2)[1]


def encode(signer: Signer, tasks: Sequence[Task]) -> list[Put]:
    """Queue items for these tasks: consecutive tasks with one header and
    consecutive paths in one block share an item."""
    puts: list[Put] = []
    run: list[Task] = []
    last: tuple[str, int] = ("", -2)
    for task in tasks:
        here = split_path(task.path)
        if run and (task.header != run[0].header or here != (last[0], last[1] + 1) or here[1] % BUNDLE == 0):
            puts += _items(signer, run)
            run = []
        run.append(task)
        last = here
    if run:
        puts += _items(signer, run)
    return puts


def _items(signer: Signer, run: Sequence[Task]) -> list[Put]:
    items = [(t.args, t.kwargs, t.watchers) for t in run]
    return pack(signer, run[0], dumps(items), len(run), lambda: items)


def pack(signer: Signer, first: Task, entries: bytes, jobs: int,
         unpacked: Callable[[], list[Entry]] | None = None) -> list[Put]:
    """Items for ``jobs`` tasks from ``first`` on, whose entries are pickled
    already; a bundle over MAX_BYTES is halved (``unpacked`` gives the entries
    back to split them)."""
    prefix, start = split_path(first.path)
    if len(entries) > MAX_BYTES and jobs > 1 and unpacked is not None:
        items = unpacked()
        half = jobs // 2
        second = first._replace(path=f"{prefix}{start + half}")
        head, tail = items[:half], items[half:]
        return (pack(signer, first, dumps(head), half, lambda: head)
                + pack(signer, second, dumps(tail), jobs - half, lambda: tail))
    payload = (*first.header, prefix, start, entries)
    delay = max(0.0, first.due - time.time()) if first.due else 0.0
    return [Put(shard(first.name, first.gen, first.path), signer.sign(pickle.dumps(payload, 5)), first.ttr, delay,
                first.priority)]


def decode(signer: Signer, body: bytes) -> list[Task]:
    """The tasks in a queue body; raises ``Forged`` before unpickling a bad one."""
    name, gen, method, digest, ttr, retries, delay, record, priority, due, prefix, start, entries = pickle.loads(
        signer.payload(body))
    entries = pickle.loads(entries)
    make = Task._make  # (a little quicker than Task(...), per job)
    if isinstance(entries, tuple):  # enqueue_each's form
        items, args, kwargs = entries
        return [make((name, gen, f"{prefix}{start + i}", method, (item, *args), kwargs, digest, ttr, retries, delay,
                      record, (), priority, due))
                for i, item in enumerate(items)]
    return [make((name, gen, f"{prefix}{start + i}", method, args, kwargs, digest, ttr, retries, delay, record,
                  tuple(watchers), priority, due))
            for i, (args, kwargs, watchers) in enumerate(entries)]
