"""The shared store on one or more memcached servers (``_memcached``: the protocol).

Where a key lives is rendezvous hashing of the servers' names with, for a
tagged key (``{tag}``, see ``backends.base.Store``), its tag, and for any other
key the key itself: every process agrees without talking, listing the servers
in any order, and removing a server moves only the keys it held.

A server that fails is set aside (``Health``), and then:
- a tagged key never moves: its server is the tag's in every process, up or
  not (moving it would let a process that cannot reach the server give
  ``add_many`` a second winner, and break exact counts).  An operation on it
  fails at once, naming the server, until a probe brings the server back.
  packmule tags a run generation's keys with it, and picks, for a new
  generation, a tag whose server is up (``placeable``): a dead server costs
  the runs whose state it held, and no other.
- an untagged key (the registry, the totals, markers: nothing counted
  exactly) goes to the first server in its rendezvous order that is up, so it
  is written afresh elsewhere while its server is away.

Keys are sent as they are when memcached can hold them (1 to 250 printable
ASCII characters, no spaces); any other key is sent as ``pm#`` plus its
BLAKE2b hex digest (so is a key that already starts with ``pm#``, so that two
keys never meet).  Bulk calls are one pipelined round trip per server.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence

from packmule._core.digests import blake2b
from packmule._core.errors import BackendUnavailable

from ..base import Store
from . import _memcached as mc
from ._pool import Health, Servers, ThreadConnections

MAX_TTL = 30 * 24 * 3600  # s: memcached reads a longer expiry as a Unix timestamp
IO_TIMEOUT = 30.0  # s a server may take to answer before it counts as unavailable
HASHED_PREFIX = "pm#"
_PLAIN_KEY = re.compile(r"[!-~]{1,250}")  # what memcached's text protocol takes as is


def memcached_key(key: str) -> str:
    """The key as sent to memcached (see the module docstring)."""
    if _PLAIN_KEY.fullmatch(key) and not key.startswith(HASHED_PREFIX):
        return key
    return HASHED_PREFIX + blake2b(key.encode("utf-8", "surrogatepass"), digest_size=32).hexdigest()


def expiry(ttl: float) -> int:
    """memcached's expiry for ``ttl`` seconds: rounded up, at most 30 days; 0 means 30 days."""
    if not ttl >= 0:
        raise ValueError(f"ttl must be 0 (the longest) or a positive number of seconds, not {ttl!r}")
    return MAX_TTL if ttl == 0 else min(MAX_TTL, math.ceil(ttl))


def tag_of(key: str) -> str | None:
    """The key's tag: the text between its first ``{`` and the next ``}`` (None if there is none, or it is empty)."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    return key[start + 1:end] if end > start + 1 else None


def _encode(key: str, value: bytes | int) -> bytes:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, int) and not isinstance(value, bool):
        if not 0 <= value < 2**64:
            raise ValueError(f"counter {key!r}: {value} is outside memcached's 0 .. 2**64-1")
        return b"%d" % value  # decimal ASCII: what memcached's incr works on
    raise TypeError(f"value of {key!r} must be bytes or an int, not {type(value).__name__}")


class MemcachedStore(Store):
    max_value = 1_000_000  # bytes: an item of a default memcached (-I 1m) holds this with its key and header
    def __init__(self, servers: Servers, connect_timeout: float) -> None:
        self.servers = servers
        self._names = servers.names
        self._hash_names = [server_id.encode() + b"\0" for server_id in servers.ids]
        self._connect_timeout = connect_timeout
        self._pool: ThreadConnections[mc.Connection] = ThreadConnections(self._client)
        self.health = Health(servers, "memcached", b"version\r\n", connect_timeout)

    def _client(self, index: int) -> mc.Connection:
        """A connection (made on first use, and again after an error)."""
        return mc.Connection(self.servers.addresses[index], self._connect_timeout, IO_TIMEOUT)

    def _rank(self, text: str) -> list[int]:
        """The servers in rendezvous order for ``text`` (a tag or a memcached key)."""
        encoded = text.encode()
        scores = [blake2b(name + encoded, digest_size=8).digest() for name in self._hash_names]
        return sorted(range(len(scores)), key=scores.__getitem__, reverse=True)

    def _index(self, key: str, mkey: str, tags: dict[str, int]) -> int:
        tag = tag_of(key)
        if tag is not None:
            index = tags.get(tag)
            if index is None:
                index = tags[tag] = self._rank(tag)[0]
            return index
        ranked = self._rank(mkey)
        return next((i for i in ranked if self.health.up(i)), ranked[0])

    def _plan(self, keys: Sequence[str] | Mapping[str, object]) -> dict[int, dict[str, str]]:
        """Server index -> {memcached key: key} for these keys."""
        if len(self._names) == 1:
            return {0: {memcached_key(key): key for key in keys}}
        plan: dict[int, dict[str, str]] = {}
        tags: dict[str, int] = {}  # (a bulk call's keys mostly share a tag: rank it once)
        for key in keys:
            mkey = memcached_key(key)
            plan.setdefault(self._index(key, mkey, tags), {})[mkey] = key
        return plan

    def _each(self, keys: Sequence[str] | Mapping[str, object],
              op: Callable[[int, dict[str, str]], None]) -> None:
        """``op(index, {memcached key: key})`` for each server's share of ``keys``.
        A share of untagged keys whose server fails goes, once, where they now
        belong (the failed server is set aside by then)."""
        for index, names in self._plan(keys).items():
            try:
                op(index, names)
            except BackendUnavailable:
                if len(self._names) == 1 or not self.health.live() or any(map(tag_of, names.values())):
                    raise
                for again, share in self._plan(list(names.values())).items():
                    op(again, share)

    def holder(self, tag: str) -> str | None:
        return self._names[self._rank(tag)[0]] if len(self._names) > 1 else None

    def placeable(self, tag: str) -> bool:
        return len(self._names) == 1 or self.health.up(self._rank(tag)[0])

    @contextlib.contextmanager
    def _using(self, index: int, values: Mapping[str, bytes] | None = None) -> Iterator[mc.Connection]:
        """This thread's connection to server ``index``, its errors translated.
        After any error the connection is closed; it is made again on its next use.
        A server set aside is not asked (while another is up): it fails at once."""
        if not self.health.up(index) and self.health.live():
            raise self.health.unavailable(index)
        client = self._pool.get(index)
        server = self._names[index]
        try:
            yield client
        except BaseException as exc:
            client.close()
            if isinstance(exc, mc.ServerError) and "too large" in str(exc) and values:
                size, mkey = max((len(v), k) for k, v in values.items())
                raise ValueError(
                    f"memcached at {server} refused a value as too large (the largest sent was "
                    f"{size} bytes, for {mkey!r}); start memcached with a larger -I (item size, "
                    f"default 1m), or store less under one key"
                ) from None
            if isinstance(exc, mc.ClientError):
                raise ValueError(f"memcached at {server} refused a command: {exc}") from exc
            if isinstance(exc, (mc.MemcachedError, OSError)):
                if len(self._names) > 1:
                    self.health.set_aside(index, exc)
                raise self.servers.unavailable("memcached", server, exc) from exc
            raise
        if not self.health.up(index):  # (every server was aside, and this one answered)
            self.health.came_back(index)

    # --- Store -------------------------------------------------------------------------------
    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        found: dict[str, bytes] = {}

        def get(index: int, names: dict[str, str]) -> None:
            if not names:
                return
            with self._using(index) as client:
                values = mc.get(client, names)
            found.update((names[mkey], value) for mkey, value in values.items())
        self._each(keys, get)
        return found

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        expire = expiry(ttl)

        def put(index: int, names: dict[str, str]) -> None:
            values = {mkey: _encode(key, items[key]) for mkey, key in names.items()}
            with self._using(index, values) as client:
                mc.store(client, b"set", values, expire)
        self._each(items, put)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        expire = expiry(ttl)
        added: set[str] = set()

        def add(index: int, names: dict[str, str]) -> None:
            values = {mkey: _encode(key, items[key]) for mkey, key in names.items()}
            with self._using(index, values) as client:
                stored = mc.store(client, b"add", values, expire)
            added.update(names[mkey] for mkey, ok in stored.items() if ok)
        self._each(items, add)
        return added

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        for key, delta in deltas.items():
            if isinstance(delta, bool) or not isinstance(delta, int) or not -2**64 < delta < 2**64:
                raise ValueError(f"incr_many: the delta of {key!r} must be an int, not {delta!r}")
        results: dict[str, int | None] = {}

        def incr(index: int, names: dict[str, str]) -> None:
            # (memcached's decr stops at 0, as the interface asks)
            with self._using(index) as client:
                answers = mc.incr(client, {mkey: deltas[key] for mkey, key in names.items()})
            results.update(zip(names.values(), answers, strict=True))
        self._each(deltas, incr)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        def delete(index: int, names: dict[str, str]) -> None:
            with self._using(index) as client:
                mc.delete(client, names)
        self._each(keys, delete)

    def close(self) -> None:
        self._pool.close_all()
