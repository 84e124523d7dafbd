"""Wakes on beanstalkd (``Queue.wake`` / ``Queue.listen``): a waiting driver
blocks in ``reserve-with-timeout`` on a tube of its own, and the worker whose
count reaches what it waits for puts an empty job there.

A listener's channel is ``<server id>|pmw-<random>``: the server it watches
(the first one up when it was made) and its tube.  Its connection watches only
that tube.  ``wait(timeout)`` sends one ``reserve-with-timeout`` (beanstalkd
counts whole seconds) and waits on the socket for the time asked, to the
millisecond; a reserve still unanswered then is read by the next ``wait``.  A
wake is deleted once read.

A wake put for a listener that is gone stays in its tube, which nobody watches
any more: each new listener deletes the jobs of such tubes (``pmw-`` tubes no
connection watches), so they never pile up.  One wake is two commands (``use``
and ``put``, pipelined) on a connection this thread keeps per server.
"""

from __future__ import annotations

import os
import select
import socket
import threading
from collections.abc import Sequence

from packmule._core.errors import BackendUnavailable

from ..base import Listener
from ._pool import Health, Servers

PREFIX = "pmw-"
SWEEP_MAX = 64  # tubes of gone listeners a new listener empties at most


class _Line:
    """A raw beanstalkd connection: commands out, answer lines in."""

    def __init__(self, address: tuple[str, int], timeout: float) -> None:
        self.sock = socket.create_connection(address, timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def line(self) -> bytes:
        while b"\r\n" not in self.buf:
            chunk = self.sock.recv(4096)
            if not chunk:
                raise ConnectionError("beanstalkd closed the connection")
            self.buf += chunk
        out, _, self.buf = self.buf.partition(b"\r\n")
        return out

    def body(self, size: int) -> bytes:
        while len(self.buf) < size + 2:
            chunk = self.sock.recv(max(4096, size + 2 - len(self.buf)))
            if not chunk:
                raise ConnectionError("beanstalkd closed the connection")
            self.buf += chunk
        out, self.buf = self.buf[:size], self.buf[size + 2:]
        return out

    def ask(self, command: bytes) -> bytes:
        self.send(command)
        return self.line()

    def close(self) -> None:
        self.sock.close()

    def __del__(self) -> None:  # (a listener or waker of a thread that ended)
        sock = getattr(self, "sock", None)
        if sock is not None:
            sock.close()


class BeanstalkListener(Listener):
    def __init__(self, servers: Servers, index: int, timeout: float) -> None:
        self.pid = os.getpid()
        self.tube = f"{PREFIX}{os.urandom(8).hex()}"
        self.channel = f"{servers.ids[index]}|{self.tube}"
        self.conn = _Line(servers.addresses[index], timeout)
        self.pending = False  # a reserve sent whose answer is not read yet
        self.broken = False
        for command in (b"watch %s\r\n" % self.tube.encode(), b"ignore default\r\n"):
            answer = self.conn.ask(command)
            if not answer.startswith(b"WATCHING"):
                raise ConnectionError(f"beanstalkd answered {answer!r} to {command!r}")
        _sweep(self.conn)

    def wait(self, timeout: float) -> bool:
        if self.broken:
            raise BackendUnavailable(f"the wake listener's connection to beanstalkd {self.channel} failed")
        try:
            return self._wait(timeout)
        except (OSError, ValueError, IndexError) as exc:
            self.broken = True
            self.conn.close()
            raise BackendUnavailable(f"the wake listener's connection to beanstalkd failed: {exc!r}") from exc

    def _wait(self, timeout: float) -> bool:
        conn = self.conn
        if not self.pending:
            conn.send(b"reserve-with-timeout %d\r\n" % max(1, int(timeout + 0.999)))
            self.pending = True
        if not conn.buf and not select.select([conn.sock], [], [], max(0.0, timeout))[0]:
            return False  # (the reserve stays pending: the next wait reads its answer)
        self.pending = False
        answer = conn.line().split()
        if answer[0] != b"RESERVED":
            return False  # TIMED_OUT (DEADLINE_SOON is for holders of jobs: none here)
        conn.body(int(answer[2]))
        conn.ask(b"delete %s\r\n" % answer[1])
        return True

    def close(self) -> None:
        self.conn.close()


def _sweep(conn: _Line) -> None:
    """Empty the tubes of listeners that are gone (no connection watches them)."""
    conn.send(b"list-tubes\r\n")
    head = conn.line().split()
    tubes = [line[2:].strip() for line in conn.body(int(head[1])).splitlines() if line.startswith(b"- ")]
    gone = 0
    for tube in [t for t in tubes if t.startswith(PREFIX.encode())][:SWEEP_MAX * 4]:  # (bounded work per listener)
        if gone >= SWEEP_MAX:
            break
        head = conn.ask(b"stats-tube %s\r\n" % tube).split()
        if head[0] != b"OK":
            continue
        stats = dict(line.split(b": ", 1) for line in conn.body(int(head[1])).splitlines() if b": " in line)
        if int(stats.get(b"current-watching", b"1")) or not int(stats.get(b"current-jobs-ready", b"0")):
            continue
        gone += 1
        conn.ask(b"use %s\r\n" % tube)
        while True:
            head = conn.ask(b"peek-ready\r\n").split()
            if head[0] != b"FOUND":
                break
            conn.body(int(head[2]))
            conn.ask(b"delete %s\r\n" % head[1])


class Wakes:
    """``BeanstalkQueue``'s ``wake`` and ``listen``: wakes are put on a connection
    per server that each thread keeps; each thread has a listener of its own."""

    servers: Servers
    health: Health
    _connect_timeout: float

    def _wakes_init(self) -> None:
        self.index_of = {server_id: i for i, server_id in enumerate(self.servers.ids)}
        self._mine = threading.local()

    def listen(self) -> Listener:
        listener: BeanstalkListener | None = getattr(self._mine, "listener", None)
        if listener is None or listener.broken or listener.pid != os.getpid():
            self._mine.listener = None
            live = self.health.live() or list(range(len(self.servers.addresses)))
            try:
                listener = BeanstalkListener(self.servers, live[0], self._connect_timeout)
            except (OSError, ValueError, IndexError) as exc:
                raise self.servers.unavailable("beanstalkd", self.servers.names[live[0]], exc) from exc
            self._mine.listener = listener
        return listener

    def wake(self, channels: Sequence[str]) -> None:
        for channel in channels:
            server_id, _, tube = channel.rpartition("|")
            index = self.index_of.get(server_id)
            if index is None or not tube.startswith(PREFIX):
                continue  # (not one of ours: another configuration's driver)
            try:
                conn = self._wake_conn(index)
                conn.send(b"use %s\r\nput 0 0 10 0\r\n\r\n" % tube.encode())
                conn.line()
                conn.line()
            except OSError:
                self._drop(index)  # (best effort: the waiter looks again on its own)

    def _wake_conn(self, index: int) -> _Line:
        conns: dict[int, _Line] = getattr(self._mine, "conns", None) or {}
        if getattr(self._mine, "pid", None) != os.getpid():  # (a fork child: its parent's are not its own)
            conns = {}
            self._mine.pid = os.getpid()
        self._mine.conns = conns
        if index not in conns:
            conns[index] = _Line(self.servers.addresses[index], self._connect_timeout)
        return conns[index]

    def _drop(self, index: int) -> None:
        conn = self._mine.conns.pop(index, None)
        if conn is not None:
            conn.close()
