"""Where a run's remaining jobs can be when a queue server is away (issue 17).

A job goes to its shard key's preferred queue server (``Queue.server_for``)
unless the process that queues it finds that server set aside or failing;
then it goes to another.  Before a job is queued on a server other than its
preferred one, a marker is written for its shard (``q:<block>``, the path of
the block's first job, in the run's keys): so a job of a shard without a
marker can only be on its preferred server.  Every put of a job's queue item
goes through ``put`` (a release, a time-out or a bury keeps the item where it
is).

That is what lets a wait tell, while the live queue servers stay busy with
other runs, that its own run's remaining jobs are all on a server that died
(``census.remaining_on``): each job that has not completed (no value) and has not
committed (no commit marker) is of a shard without a marker whose preferred
server is away.  Jobs put on a server just before it died for good are lost
with it, and nothing else in the queue would say so.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from packmule._model.keys import QUEUED_FIELD, prefix
from packmule._transport.codec import Signer
from packmule._transport.spill import spill_bodies
from packmule.backends.base import Backend, Put, Store

__all__ = ["marker_key", "put"]

_marked: set[str] = set()  # marker keys this process wrote (they stay until the run is forgotten)


def marker_key(shard_key: str) -> str | None:
    """The marker of a shard key (``<name>/<gen>/<block>``; None if it is not a job's)."""
    parts = shard_key.split("/")
    return prefix(parts[0], parts[1]) + QUEUED_FIELD + parts[2] if len(parts) == 3 else None


def _mark(store: Store, ttl: float, off: Iterable[Put]) -> None:
    """(``put``'s ``elsewhere``) Mark the shards of jobs about to go to a server not their preferred one."""
    keys = {key for key in map(marker_key, (job.shard for job in off)) if key is not None and key not in _marked}
    if keys:
        store.set_many(dict.fromkeys(keys, b"1"), ttl)
        if len(_marked) > 65536:
            _marked.clear()
        _marked.update(keys)


def put(backend: Backend, signer: Signer, puts: Sequence[Put], ttl: float) -> None:
    """Queue these jobs (large bodies spilled to the store), marking first the
    shards of those that go to a server other than their preferred one."""
    store = backend.store
    backend.queue.put_many(spill_bodies(backend, signer, puts, ttl), elsewhere=lambda off: _mark(store, ttl, off))
