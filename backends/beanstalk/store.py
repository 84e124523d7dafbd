"""The shared store on one or more memcached servers, through pymemcache.

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
import hashlib
import math
import re
import socket
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence

from pymemcache.client.base import Client
from pymemcache.exceptions import (
    MemcacheClientError,
    MemcacheError,
    MemcacheServerError,
    MemcacheUnexpectedCloseError,
    MemcacheUnknownError,
)

from packmule._core.errors import BackendUnavailable

from ..base import Store
from ._pool import Health, Servers, ThreadConnections

MAX_TTL = 30 * 24 * 3600  # s: memcached reads a longer expiry as a Unix timestamp
IO_TIMEOUT = 30.0  # s a server may take to answer before it counts as unavailable
RECV_BYTES = 65536  # the most ``_store`` reads of the answers at once
HASHED_PREFIX = "pm#"
_PLAIN_KEY = re.compile(r"[!-~]{1,250}")  # what memcached's text protocol takes as is


def memcached_key(key: str) -> str:
    """The key as sent to memcached (see the module docstring)."""
    if _PLAIN_KEY.fullmatch(key) and not key.startswith(HASHED_PREFIX):
        return key
    return HASHED_PREFIX + hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=32).hexdigest()


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


def _connected(client: Client) -> socket.socket:
    if client.sock is None:
        client._connect()
    assert client.sock is not None
    return client.sock  # type: ignore[no-any-return]


def _more(sock: socket.socket, size: int = 0) -> bytes:
    """The next bytes the server sent (``size``: exactly that many, in one buffer)."""
    if not size:
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise MemcacheUnexpectedCloseError()
        return chunk
    buf, got = bytearray(size), 0
    view = memoryview(buf)
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise MemcacheUnexpectedCloseError()
        got += n
    return bytes(buf)


def _answers(client: Client, request: bytes, count: int, verb: bytes, expected: tuple[bytes, ...]) -> list[bytes]:
    """Send a pipelined ``request`` of ``count`` commands and read their one-line
    answers, each one of ``expected`` (SERVER_ERROR and CLIENT_ERROR raise theirs).

    pymemcache's own pipelines check, serialize and format each key in Python
    and read each answer in a call of its own: a worker paid about a third of
    its time there, adding a value per job.  The keys are already memcached's
    (``memcached_key``: printable, at most 250 bytes) and the values bytes, so
    this only formats and parses.  Any error leaves the connection in an
    unknown state: the caller (``_using``) closes it."""
    sock = _connected(client)
    sock.sendall(request)
    out: list[bytes] = []
    buf, pos = b"", 0
    while len(out) < count:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            buf, pos = buf[pos:] + _more(sock), 0
            continue
        line, pos = buf[pos:end], end + 2
        if line not in expected:
            client._raise_errors(line, verb)
            raise MemcacheUnknownError(line[:32])
        out.append(line)
    return out


def _store(client: Client, verb: bytes, values: Mapping[str, bytes], expire: int) -> dict[str, bool]:
    """``verb`` (``add`` or ``set``) of every value in one write, and whether each was stored."""
    tail = b" 0 %d " % expire
    request = b"".join([b"%s %s%s%d\r\n%s\r\n" % (verb, k.encode(), tail, len(v), v) for k, v in values.items()])
    answers = _answers(client, request, len(values), verb, (b"STORED", b"NOT_STORED"))
    return {key: answer == b"STORED" for key, answer in zip(values, answers, strict=True)}


def _delete(client: Client, keys: Iterable[str]) -> None:
    request = b"".join([b"delete %s\r\n" % key.encode() for key in keys])
    _answers(client, request, request.count(b"\r\n"), b"delete", (b"DELETED", b"NOT_FOUND"))


def _get(client: Client, keys: Iterable[str]) -> dict[str, bytes]:
    """The values of the keys that are there, in one request (``get k1 k2 ...``):
    ``VALUE <key> <flags> <bytes>``, the value and CRLF for each found, then ``END``."""
    sock = _connected(client)
    sock.sendall(b"get %s\r\n" % " ".join(keys).encode())
    found: dict[str, bytes] = {}
    buf, pos = b"", 0
    while True:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            buf, pos = buf[pos:] + _more(sock), 0
            continue
        line = buf[pos:end]
        if line == b"END":
            return found
        head = line.split(b" ")
        if len(head) != 4 or head[0] != b"VALUE" or not head[3].isdigit():
            client._raise_errors(line, b"get")
            raise MemcacheUnknownError(line[:32])
        start = end + 2
        stop = start + int(head[3])
        if len(buf) < stop + 2:  # (the rest of the value, in one read of exactly its size)
            buf, start, stop = buf[start:] + _more(sock, stop + 2 - len(buf)), 0, stop - start
        if buf[stop:stop + 2] != b"\r\n":
            raise MemcacheUnknownError(b"a value not followed by CRLF")
        found[head[1].decode()] = buf[start:stop]
        pos = stop + 2


class MemcachedStore(Store):
    max_value = 1_000_000  # bytes: an item of a default memcached (-I 1m) holds this with its key and header
    def __init__(self, servers: Servers, connect_timeout: float) -> None:
        self.servers = servers
        self._names = servers.names
        self._hash_names = [server_id.encode() + b"\0" for server_id in servers.ids]
        self._connect_timeout = connect_timeout
        self._pool: ThreadConnections[Client] = ThreadConnections(self._client)
        self.health = Health(servers, "memcached", b"version\r\n", connect_timeout)

    def _client(self, index: int) -> Client:
        """A pymemcache client (it connects on first use, and again after an error)."""
        return Client(self.servers.addresses[index], connect_timeout=self._connect_timeout,
                      timeout=IO_TIMEOUT, no_delay=True, default_noreply=False)

    def _rank(self, text: str) -> list[int]:
        """The servers in rendezvous order for ``text`` (a tag or a memcached key)."""
        encoded = text.encode()
        scores = [hashlib.blake2b(name + encoded, digest_size=8).digest() for name in self._hash_names]
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
    def _using(self, index: int, values: Mapping[str, bytes] | None = None) -> Iterator[Client]:
        """This thread's client for server ``index``, its errors translated.
        After any error the client is closed; it reconnects on its next use.
        A server set aside is not asked (while another is up): it fails at once."""
        if not self.health.up(index) and self.health.live():
            raise self.health.unavailable(index)
        client = self._pool.get(index)
        server = self._names[index]
        try:
            yield client
        except BaseException as exc:
            client.close()
            if isinstance(exc, MemcacheServerError) and "too large" in str(exc) and values:
                size, mkey = max((len(v), k) for k, v in values.items())
                raise ValueError(
                    f"memcached at {server} refused a value as too large (the largest sent was "
                    f"{size} bytes, for {mkey!r}); start memcached with a larger -I (item size, "
                    f"default 1m), or store less under one key"
                ) from None
            if isinstance(exc, MemcacheClientError):
                raise ValueError(f"memcached at {server} refused a command: {exc}") from exc
            if isinstance(exc, (MemcacheError, OSError)):
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
                values = _get(client, names)
            found.update((names[mkey], value) for mkey, value in values.items())
        self._each(keys, get)
        return found

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        expire = expiry(ttl)

        def put(index: int, names: dict[str, str]) -> None:
            values = {mkey: _encode(key, items[key]) for mkey, key in names.items()}
            with self._using(index, values) as client:
                _store(client, b"set", values, expire)
        self._each(items, put)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        expire = expiry(ttl)
        added: set[str] = set()

        def add(index: int, names: dict[str, str]) -> None:
            values = {mkey: _encode(key, items[key]) for mkey, key in names.items()}
            with self._using(index, values) as client:
                stored = _store(client, b"add", values, expire)
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
            commands = [b"%s %s %d\r\n" % (b"incr" if deltas[key] >= 0 else b"decr", mkey.encode(),
                                            abs(deltas[key])) for mkey, key in names.items()]
            with self._using(index) as client:
                # pymemcache's incr() is one round trip per key; _misc_cmd pipelines them.
                answers = client._misc_cmd(commands, b"incr", False)
            for key, answer in zip(names.values(), answers, strict=True):
                results[key] = None if answer == b"NOT_FOUND" else int(answer)
        self._each(deltas, incr)
        return results

    def delete_many(self, keys: Sequence[str]) -> None:
        def delete(index: int, names: dict[str, str]) -> None:
            with self._using(index) as client:
                _delete(client, names)
        self._each(keys, delete)

    def close(self) -> None:
        self._pool.close_all()
