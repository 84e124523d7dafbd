"""Large payloads, the same on every backend: a queue body or a stored value
larger than the backend holds (``Queue.max_body``, ``Store.max_value``; a
beanstalkd job is 65,535 bytes by default, a memcached item 1 MB) is kept in
the store in chunks, and a small signed *pointer* travels in its place.

A pointer is a signed blob whose payload is ``MARK`` followed by
``<chunk key prefix> <chunks> <bytes>``; a pickle never starts with ``MARK``.
The chunks hold the original signed blob, so it is checked whole once it is
joined again.  Chunk keys carry a digest of the blob: two executions of one job
that return different values never mix their chunks.

Chunks expire with the run's state (``PACKMULE_STATE_TTL``).  A chunk that is
gone (memcached evicted it or restarted) is reported as ``RunStateLost``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from packmule._core import config as _config
from packmule._core.digests import blake2b
from packmule._core.errors import RunStateLost
from packmule._transport.codec import HEAD, Signer
from packmule._transport.wire import shard_gen
from packmule.backends.base import Backend, Put, Store

__all__ = ["CHUNK", "MARK", "gather", "gather_one", "is_pointer", "spill_bodies", "spill_values"]

MARK = b"pm-spill:"
CHUNK = 500_000  # bytes a chunk holds at most: well inside a default memcached item (1 MB)


def _digest(blob: bytes) -> str:
    return blake2b(blob, digest_size=12).hexdigest()


def _limit(own: int | None) -> int | None:
    """The size over which a payload is chunked: the backend's own limit, or
    ``PACKMULE_SPILL_ABOVE`` where that is smaller."""
    above = _config.spill_above()
    return own if above is None else above if own is None else min(own, above)


def _store_chunks(store: Store, signer: Signer, head: str, blob: bytes, ttl: float) -> bytes:
    """Write ``blob`` in chunks under ``head:<i>``; the signed pointer to them."""
    size = min(CHUNK, _limit(store.max_value) or CHUNK)
    parts = {f"{head}:{i}": blob[start:start + size] for i, start in enumerate(range(0, len(blob), size))}
    store.set_many(parts, ttl)
    return signer.sign(MARK + f"{head} {len(parts)} {len(blob)}".encode())


def spill_values(store: Store, signer: Signer, items: Mapping[str, bytes | int], ttl: float
                 ) -> Mapping[str, bytes | int]:
    """``items`` as the store can hold them: a value over ``store.max_value`` is
    written in chunks now and replaced by its pointer."""
    limit = _limit(store.max_value)
    if limit is None or not any(isinstance(v, bytes) and len(v) > limit for v in items.values()):
        return items
    out = dict(items)
    for key, value in items.items():
        if isinstance(value, bytes) and len(value) > limit:
            out[key] = _store_chunks(store, signer, f"{key}#{_digest(value)}", value, ttl)
    return out


def spill_bodies(backend: Backend, signer: Signer, puts: Sequence[Put], ttl: float) -> Sequence[Put]:
    """``puts`` as the queue can hold them: a body over ``queue.max_body`` goes
    to the store in chunks (named by its digest, tagged with its run generation
    so that they live with the run's state) and its pointer is queued."""
    limit = _limit(backend.queue.max_body)
    if limit is None or all(len(put.body) <= limit for put in puts):
        return puts
    return [put if len(put.body) <= limit else put._replace(body=_store_chunks(
        backend.store, signer, f"pm-body:{{{shard_gen(put.shard)}}}:{_digest(put.body)}", put.body, ttl))
        for put in puts]


def is_pointer(blob: bytes) -> bool:
    return blob[HEAD:HEAD + len(MARK)] == MARK


def gather(store: Store, signer: Signer, blobs: dict[str, bytes]) -> dict[str, bytes]:
    """``blobs`` (key -> signed blob, as read) with every pointer replaced by the
    blob it points to, read in one bulk call.  Raises ``Forged`` for a pointer
    not signed with this secret, ``RunStateLost`` if a chunk is gone."""
    pointers = [key for key, blob in blobs.items() if is_pointer(blob)]
    if not pointers:
        return blobs
    plans: dict[str, tuple[list[str], int]] = {}
    for key in pointers:
        head, count, size = signer.payload(blobs[key])[len(MARK):].decode().split(" ")
        plans[key] = ([f"{head}:{i}" for i in range(int(count))], int(size))
    got = store.get_many([chunk for chunks, _ in plans.values() for chunk in chunks])
    out = dict(blobs)
    for key, (chunks, expected) in plans.items():
        missing = [chunk for chunk in chunks if chunk not in got]
        if missing:
            raise RunStateLost(f"{len(missing)} of the {len(chunks)} chunks of the large payload under {key!r} "
                               "are gone from the store (evicted, or the store restarted): give memcached "
                               "more memory (-m), or keep large data out of jobs")
        out[key] = b"".join(got[chunk] for chunk in chunks)
        if len(out[key]) != expected:
            raise RunStateLost(f"the large payload under {key!r} came back as {len(out[key])} of {expected} bytes")
    return out


def gather_one(store: Store, signer: Signer, blob: bytes) -> bytes:
    """``gather`` for one blob (a queue body)."""
    return gather(store, signer, {"body": blob})["body"] if is_pointer(blob) else blob
