"""memcached's text protocol, spoken by packmule itself: one connection per
server and thread (``Connection``), and the pipelined commands the store
sends in bulk (``store``, ``get``, ``delete``, ``incr``).

Why not a client library: pymemcache (which packmule used before) checks,
serializes and formats each key in Python again and reads each answer in a
call of its own (a worker paid a third of its time there, adding a value per
job), and importing it loads ``ssl`` and with it OpenSSL (about 4 MiB of each
worker process's memory: ``packmule._core.digests``).  The keys reach here as
memcached takes them (``store.memcached_key``: 1 to 250 printable ASCII bytes)
and the values as bytes, so this only formats and parses.  Any error leaves
the connection in an unknown state: the caller closes it (``store._using``).
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Iterable, Mapping

__all__ = ["RECV_BYTES", "ClientError", "Closed", "Connection", "MemcachedError", "ServerError",
           "delete", "get", "incr", "store"]

RECV_BYTES = 65536  # the most read of the answers at once


class MemcachedError(Exception):
    """An answer that is not what the command may get."""


class ServerError(MemcachedError):
    """``SERVER_ERROR <message>``: the server could not do it (out of memory, an item too large)."""


class ClientError(MemcachedError):
    """``CLIENT_ERROR <message>`` or ``ERROR``: the server refused the command as sent."""


class Closed(MemcachedError):
    """The server closed the connection before it answered."""


class Connection:
    """A connection to one memcached server, made on first use (TCP_NODELAY)."""

    __slots__ = ("address", "connect_timeout", "io_timeout", "sock")

    def __init__(self, address: tuple[str, int], connect_timeout: float, io_timeout: float) -> None:
        self.address, self.connect_timeout, self.io_timeout = address, connect_timeout, io_timeout
        self.sock: socket.socket | None = None

    def socket(self) -> socket.socket:
        if self.sock is None:
            sock = socket.create_connection(self.address, timeout=self.connect_timeout)
            sock.settimeout(self.io_timeout)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock = sock
        return self.sock

    def close(self) -> None:
        sock, self.sock = self.sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.close()


def _error(line: bytes) -> MemcachedError:
    """The error that an unexpected answer line stands for."""
    if line.startswith(b"SERVER_ERROR"):
        return ServerError(line[13:].decode("ascii", "replace"))
    if line.startswith(b"CLIENT_ERROR"):
        return ClientError(line[13:].decode("ascii", "replace"))
    if line == b"ERROR":
        return ClientError("ERROR (an unknown command)")
    return MemcachedError(f"unexpected answer {line[:40]!r}")


def _more(sock: socket.socket, size: int = 0) -> bytes:
    """The next bytes the server sent (``size``: exactly that many, in one buffer)."""
    if not size:
        chunk = sock.recv(RECV_BYTES)
        if not chunk:
            raise Closed("the server closed the connection")
        return chunk
    buf, got = bytearray(size), 0
    view = memoryview(buf)
    while got < size:
        n = sock.recv_into(view[got:])
        if not n:
            raise Closed("the server closed the connection")
        got += n
    return bytes(buf)


def _answers(conn: Connection, request: bytes, count: int, expected: tuple[bytes, ...] = ()) -> list[bytes]:
    """Send a pipelined ``request`` of ``count`` commands and read their one-line
    answers, each one of ``expected`` (none: a number or ``NOT_FOUND``)."""
    sock = conn.socket()
    sock.sendall(request)
    out: list[bytes] = []
    buf, pos = b"", 0
    while len(out) < count:
        end = buf.find(b"\r\n", pos)
        if end < 0:
            buf, pos = buf[pos:] + _more(sock), 0
            continue
        line, pos = buf[pos:end], end + 2
        if line not in expected and (expected or not (line.isdigit() or line == b"NOT_FOUND")):
            raise _error(line)
        out.append(line)
    return out


def store(conn: Connection, verb: bytes, values: Mapping[str, bytes], expire: int) -> dict[str, bool]:
    """``verb`` (``add`` or ``set``) of every value in one write, and whether each was stored."""
    tail = b" 0 %d " % expire
    request = b"".join([b"%s %s%s%d\r\n%s\r\n" % (verb, k.encode(), tail, len(v), v) for k, v in values.items()])
    answers = _answers(conn, request, len(values), (b"STORED", b"NOT_STORED"))
    return {key: answer == b"STORED" for key, answer in zip(values, answers, strict=True)}


def delete(conn: Connection, keys: Iterable[str]) -> None:
    request = b"".join([b"delete %s\r\n" % key.encode() for key in keys])
    _answers(conn, request, request.count(b"\r\n"), (b"DELETED", b"NOT_FOUND"))


def incr(conn: Connection, deltas: Mapping[str, int]) -> list[int | None]:
    """Each counter after adding its delta (a negative one: ``decr``, which stops at 0); None where there is none."""
    request = b"".join([b"%s %s %d\r\n" % (b"incr" if delta >= 0 else b"decr", key.encode(), abs(delta))
                        for key, delta in deltas.items()])
    return [None if answer == b"NOT_FOUND" else int(answer) for answer in _answers(conn, request, len(deltas))]


def get(conn: Connection, keys: Iterable[str]) -> dict[str, bytes]:
    """The values of the keys that are there, in one request (``get k1 k2 ...``):
    ``VALUE <key> <flags> <bytes>``, the value and CRLF for each found, then ``END``."""
    sock = conn.socket()
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
            raise _error(line)
        start = end + 2
        stop = start + int(head[3])
        if len(buf) < stop + 2:  # (the rest of the value, in one read of exactly its size)
            buf, start, stop = buf[start:] + _more(sock, stop + 2 - len(buf)), 0, stop - start
        if buf[stop:stop + 2] != b"\r\n":
            raise MemcachedError("a value not followed by CRLF")
        found[head[1].decode()] = buf[start:stop]
        pos = stop + 2
