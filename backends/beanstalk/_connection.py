"""One thread's connection to one beanstalkd (``Connection``), with its bulk
commands pipelined on greenstalk's socket (a window of commands written at
once, then its answers read), and the ``Keeper`` that makes beanstalkd time out
the jobs a silent connection holds.  ``packmule.backends.beanstalk.queue`` is
the queue built on them."""

from __future__ import annotations

import logging
import math
import socket
import threading
import time
from collections.abc import Sequence
from typing import Any

import greenstalk

from packmule._core.fork import forget_at_fork

from ..base import Put, Reserved

__all__ = ["IO_TIMEOUT", "MAX_SECONDS", "PIPELINE_WINDOW", "POKE_LATE", "PRIORITY", "Connection", "Keeper",
           "Reservation", "whole_seconds"]

log = logging.getLogger("packmule.backends.beanstalk")

PRIORITY = 2**16  # beanstalkd's priority of a job of priority 0 (lower is sooner); of priority p: PRIORITY - p
IO_TIMEOUT = 30.0  # s a server may take to answer a command before it counts as unavailable
PIPELINE_WINDOW = 1000  # commands written before their answers are read; the answers to two
#                         windows (about 20 bytes each) must fit in the socket buffers, or both
#                         ends would wait for the other to read
POKE_LATE = 0.2  # s after a held job's deadline that its silent connection is sent a command (see Keeper)
MAX_SECONDS = 2**32 - 1  # beanstalkd keeps delays and TTRs as 32-bit whole seconds


def whole_seconds(seconds: float, minimum: int) -> int:
    """Seconds as beanstalkd takes them: rounded up, never below ``minimum``."""
    return max(minimum, min(MAX_SECONDS, math.ceil(seconds)))


def put_delay(seconds: float) -> int:
    """A put's delay as beanstalkd takes it: rounded *down*, the engine holding a
    job that comes early by the fraction (``backends.base.Put``)."""
    return max(0, min(MAX_SECONDS, int(seconds)))



class Connection:
    """One thread's connection to one beanstalkd, using the tube for puts and,
    once this thread reserves, watching it (and only it)."""

    def __init__(self, server: str, address: tuple[str, int], tube: str, connect_timeout: float) -> None:
        self.server, self.tube = server, tube
        self.lock = threading.Lock()
        self.closed = False
        self.watching = False
        # jobs this connection holds: id -> (deadline, time-to-run), monotonic s (see Keeper)
        self.held: dict[int, tuple[float, float]] = {}
        sock = socket.create_connection(address, timeout=connect_timeout)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(IO_TIMEOUT)
            self.client: greenstalk.Client[bytes] = greenstalk.Client(sock, encoding=None)
        except BaseException:
            sock.close()
            raise
        try:
            # greenstalk reads through a buffered file over its socket; pipelined
            # commands must write to that socket and read from that same file.
            self._sock: socket.socket = self.client._sock
            self._reader: Any = self.client._reader
            self.client.use(tube)
            self.max_job_size = int(self.client.stats()["max-job-size"])
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self.client.close()

    # --- the protocol, pipelined ----------------------------------------------------------
    def _answer(self) -> list[bytes]:
        line: bytes = self._reader.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError("beanstalkd closed the connection")
        return line[:-2].split()

    def put(self, jobs: Sequence[Put]) -> None:
        """Queue every job; the caller has checked their sizes.  Each window is
        written before the answers to the one before are read, so the server
        works while the next window is being built."""
        windows = [jobs[start:start + PIPELINE_WINDOW] for start in range(0, len(jobs), PIPELINE_WINDOW)]
        too_big = None
        for n, window in enumerate(windows):
            parts: list[bytes] = []
            for job in window:
                parts.append(b"put %d %d %d %d\r\n" % (
                    PRIORITY - job.priority, put_delay(job.delay), whole_seconds(job.ttr, 1), len(job.body)))
                parts += (job.body, b"\r\n")
            self._sock.sendall(b"".join(parts))
            if n:
                found = self._inserted(windows[n - 1])
                too_big = too_big or found
        if windows:
            found = self._inserted(windows[-1])
            too_big = too_big or found
        if too_big is not None:
            raise self.too_big(too_big)

    def _inserted(self, window: Sequence[Put]) -> Put | None:
        """Read the answers to a window of puts (all of them, to stay in step);
        the first job that was too big, if any."""
        too_big = None
        for job in window:
            status, *values = self._answer()
            if status == b"JOB_TOO_BIG":
                too_big = too_big or job
            elif status != b"INSERTED":
                raise unexpected(status, values, "put")
        return too_big

    def put_one_by_one(self, jobs: Sequence[Put]) -> None:
        """greenstalk's own put: one round trip per job (kept to measure pipelining)."""
        for job in jobs:
            try:
                self.client.put(job.body, PRIORITY - job.priority, put_delay(job.delay), whole_seconds(job.ttr, 1))
            except greenstalk.JobTooBigError:
                raise self.too_big(job) from None

    def too_big(self, job: Put) -> ValueError:
        return ValueError(
            f"a job body of {len(job.body)} bytes is larger than the {self.max_job_size} bytes that "
            f"beanstalkd at {self.server} accepts (its max-job-size); start beanstalkd with "
            f"-z {max(len(job.body), 2 * self.max_job_size)} or more, or make the job smaller "
            f"(pass large data through the store or a file, not as an argument)"
        )

    def watch(self) -> None:
        if not self.watching:
            self.client.watch(self.tube)
            self.client.ignore(greenstalk.DEFAULT_TUBE)
            self.watching = True

    def _reserved(self) -> Reserved | None:
        """Read one answer to a reserve: the job, or None (none ready, or this
        connection holds a job whose time-to-run ends within a second)."""
        status, *values = self._answer()
        if status == b"RESERVED":
            job_id, size = int(values[0]), int(values[1])
            data = self._reader.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("beanstalkd closed the connection in the middle of a job")
            crashes, ttr, pri = self._job_stats(job_id)
            self.held[job_id] = (time.monotonic() + ttr, ttr)
            return Reserved(Reservation(self, job_id, pri), data[:-2], self.server, crashes)
        if status in (b"TIMED_OUT", b"DEADLINE_SOON"):
            return None
        raise unexpected(status, values, "reserve")

    def _job_stats(self, job_id: int) -> tuple[int, float, int]:
        """Of a job just reserved: how many times a holder went away with it (its
        connection closed), its time-to-run, and its priority (kept when released).
        beanstalkd counts reserves, releases, time-outs and kicks, but not deaths:
        they are what is left of the reserves (less this one)."""
        try:
            stats: Any = self.client.stats_job(job_id)
        except greenstalk.NotFoundError:
            return 0, 0.0, PRIORITY  # already timed out and taken by another: its handle is lapsed anyway
        ended = sum(int(stats[kind]) for kind in ("releases", "timeouts", "kicks"))
        return max(0, int(stats["reserves"]) - 1 - ended), float(stats["ttr"]), int(stats["pri"])

    def poke(self) -> None:
        """A command that changes nothing, so that beanstalkd schedules this
        connection's time-outs again (see ``Keeper``)."""
        self._sock.sendall(b"list-tube-used\r\n")
        status, *values = self._answer()
        if status != b"USING":
            raise unexpected(status, values, "list-tube-used")

    def reserve(self, timeout: int) -> Reserved | None:
        """One job, waiting up to ``timeout`` whole seconds (0: only a ready one).

        One at a time, on purpose: a connection that asks to reserve again while
        it holds a job can leave beanstalkd 1.12 never timing that job out (seen
        here: 1 run in 12 when the holder sent one more ``reserve-with-timeout 0``;
        beanstalkd issue #174 describes the same pending-timeout bug).  Bundles
        carry up to 256 jobs an item, so one item a reserve costs little."""
        self._sock.settimeout(timeout + IO_TIMEOUT)
        try:
            self._sock.sendall(b"reserve-with-timeout %d\r\n" % timeout)
            return self._reserved()
        finally:
            self._sock.settimeout(IO_TIMEOUT)

    def delete(self, job_ids: Sequence[int]) -> None:
        for start in range(0, len(job_ids), PIPELINE_WINDOW):
            window = job_ids[start:start + PIPELINE_WINDOW]
            self._sock.sendall(b"".join(b"delete %d\r\n" % job_id for job_id in window))
            for _ in window:
                status, *values = self._answer()
                if status not in (b"DELETED", b"NOT_FOUND"):  # NOT_FOUND: lapsed
                    raise unexpected(status, values, "delete")
        for job_id in job_ids:
            self.held.pop(job_id, None)


class Keeper:
    """Makes beanstalkd time out the jobs a silent connection holds.

    beanstalkd (1.12, 1.13 too) keeps a ``reserve-with-timeout``'s timeout on
    the connection after it hands it a job.  When that stale timeout comes due
    before the job's deadline, the server's timer drops the connection
    (prot.c's ``conn_timeout`` reschedules it only when a job timed out), and
    the job never times out while the connection stays silent: measured here,
    7 in 8 jobs held by a silent consumer stayed reserved past their deadline.
    A command after the deadline makes it time the job out at once (one
    before it is not always enough).  So a thread of each process sends a
    command that changes nothing (``list-tube-used``) on each connection that
    holds a job, just after the job's deadline, and once more a second later.
    (A process that is stopped sends nothing: ``packmule worker`` ends a worker
    process stopped past its deadline.)  A fork child has a keeper of its own:
    its parent's connections and thread are not the child's."""

    def __init__(self) -> None:
        self._forget_inherited()
        forget_at_fork(self)

    def _forget_inherited(self) -> None:
        """(Also run in a fork child: the parent's thread is gone, and its lock may be held.)"""
        self._lock = threading.Lock()
        self._conns: dict[int, Connection] = {}
        self._thread: threading.Thread | None = None

    def watch(self, conn: Connection) -> None:
        with self._lock:
            self._conns[id(conn)] = conn
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, daemon=True, name="packmule-beanstalk-keeper")
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(POKE_LATE / 2)
            now = time.monotonic()
            with self._lock:
                conns = list(self._conns.values())
            for conn in conns:
                if conn.closed or not conn.held:
                    with self._lock:
                        self._conns.pop(id(conn), None)
                    continue
                due = [job_id for job_id, (deadline, _) in list(conn.held.items()) if deadline + POKE_LATE <= now]
                if not due or not conn.lock.acquire(blocking=False):
                    continue  # (a connection in use is rescheduled by its own commands)
                try:
                    if not conn.closed:
                        conn.poke()
                    for job_id in due:  # poked once after its deadline; once more a second later
                        held = conn.held.get(job_id)
                        if held is not None and held[1] > 0:
                            conn.held[job_id] = (now + 1.0 - POKE_LATE, 0.0)
                        else:
                            conn.held.pop(job_id, None)
                except Exception:  # its owner will find the connection broken, and reconnect
                    conn.close()
                finally:
                    conn.lock.release()


class Reservation:
    """The handle of a reserved job: its id and the connection that holds it."""

    __slots__ = ("connection", "job_id", "pri")

    def __init__(self, connection: Connection, job_id: int, pri: int = PRIORITY) -> None:
        self.connection, self.job_id, self.pri = connection, job_id, pri

    @property
    def server(self) -> str:
        return self.connection.server

    def __str__(self) -> str:
        return str(self.job_id)

    def __repr__(self) -> str:
        return f"<Reservation of job {self.job_id} on {self.server}>"

    def __reduce__(self) -> Any:
        raise TypeError("a reservation belongs to the connection that made it; it cannot be pickled")


def unexpected(status: bytes, values: list[bytes], command: str) -> greenstalk.Error:
    answer = b" ".join([status, *values]).decode("ascii", "replace")
    return greenstalk.Error(f"beanstalkd answered {answer!r} to {command}")
