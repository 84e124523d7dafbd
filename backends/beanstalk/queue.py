"""The work queue on one or more beanstalkd servers, through greenstalk.

A job goes to the server its shard key hashes to.  Each thread keeps one
connection per server; a reservation belongs to the connection that made it
(beanstalkd's rule), so its handle carries that connection, and ack, release,
bury and touch go back on it, under the connection's own lock.  When that
connection closes (an error, ``close()``, its thread ended, the process died),
beanstalkd makes the job ready again and the handle is lapsed: acting on it is
ignored, as the interface asks.

Bulk commands are pipelined on greenstalk's socket: a window of commands is
written at once, then its answers are read (greenstalk itself waits for each).
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import time
from collections.abc import Iterator, Sequence
from typing import Any

import greenstalk

from ..base import Put, Queue, QueueStats, Reserved
from ._connection import PRIORITY, Connection, Keeper, Reservation, whole_seconds
from ._pool import Health, Servers, ThreadConnections

log = logging.getLogger("packmule.backends.beanstalk")

def shard_index(shard: str, servers: int) -> int:
    """A stable server index for a shard key: the same in every process and
    Python version (unlike ``hash()``, which is salted per process)."""
    if servers == 1:
        return 0
    digest = hashlib.blake2b(shard.encode("utf-8", "surrogatepass"), digest_size=8).digest()
    return int.from_bytes(digest, "big") % servers


class BeanstalkQueue(Queue):
    """The tube ``tube`` on every server of ``servers``."""

    def __init__(self, servers: Servers, tube: str, connect_timeout: float, pipeline: bool = True) -> None:
        self.servers, self.tube, self.pipeline = servers, tube, pipeline
        self._names = servers.names
        self._connect_timeout = connect_timeout
        self._turns = itertools.count()
        self._pool: ThreadConnections[Connection] = ThreadConnections(self._connect, lambda c: not c.closed)
        self._keeper = Keeper()
        self.health = Health(servers, "beanstalkd", b"list-tube-used\r\n", connect_timeout)

    def _connect(self, index: int) -> Connection:
        server = self._names[index]
        try:
            return Connection(server, self.servers.addresses[index], self.tube, self._connect_timeout)
        except (OSError, greenstalk.Error) as exc:
            raise self.servers.unavailable("beanstalkd", server, exc) from exc

    @contextlib.contextmanager
    def _using(self, index: int) -> Iterator[Connection]:
        """This thread's connection to server ``index``, its errors translated."""
        conn = self._pool.get(index)
        with self._held(conn):
            yield conn

    @contextlib.contextmanager
    def _held(self, conn: Connection) -> Iterator[Connection]:
        """``conn`` under its lock.  A failed connection is closed (the next call
        reconnects); a ValueError leaves it in step, so it stays open."""
        with conn.lock:
            try:
                yield conn
            except ValueError:
                raise
            except (OSError, greenstalk.Error) as exc:
                conn.close()
                raise self.servers.unavailable("beanstalkd", conn.server, exc) from exc
            except BaseException:
                conn.close()
                raise

    # --- Queue ------------------------------------------------------------------------------
    @property
    def max_body(self) -> int:  # type: ignore[override]
        """The smallest max-job-size among the servers (each is asked once per thread)."""
        return min(self._pool.get(index).max_job_size for index in range(len(self._names)))

    def server_for(self, shard: str) -> str:
        return self._names[shard_index(shard, len(self._names))]

    def put_many(self, jobs: Sequence[Put]) -> None:
        groups: dict[int, list[Put]] = {}
        for job in jobs:
            groups.setdefault(shard_index(job.shard, len(self._names)), []).append(job)
        conns = {index: self._pool.get(index) for index in groups}
        for index, group in groups.items():  # refuse before anything is queued
            for job in group:
                if len(job.body) > conns[index].max_job_size:
                    raise conns[index].too_big(job)
        for index, group in groups.items():
            with self._held(conns[index]) as conn:
                (conn.put if self.pipeline else conn.put_one_by_one)(group)

    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        """At most one job from each server (see ``Connection.reserve``): first the
        ready ones, then, if none was, a blocking wait on one server (the next
        in turn).  Some consumer must block on each server: beanstalkd 1.12 times
        reserved jobs out reliably only while a reserve waits (seen here: 5 of 12
        jobs never timed out while consumers only polled)."""
        if max_count < 1:
            return []
        got: list[Reserved] = []
        first = next(self._turns)
        order = [(first + i) % len(self._names) for i in range(len(self._names))]
        try:
            if len(order) > 1:
                for index in order:
                    with self._using(index) as conn:
                        conn.watch()
                        job = conn.reserve(0)
                    if job is not None:
                        got.append(job)
                        if len(got) >= max_count:
                            break
            if not got:
                with self._using(order[0]) as conn:
                    conn.watch()
                    job = conn.reserve(whole_seconds(timeout, 0))
                got += [job] if job is not None else []
            for job in got:
                self._keeper.watch(job.handle.connection)
        except BaseException:
            for job in got:  # hand back what this call took, then report the failure
                with contextlib.suppress(Exception):
                    self.release(job.handle, 0.0)
            raise
        return got

    def ack_many(self, handles: Sequence[Any]) -> None:
        groups: dict[int, tuple[Connection, list[int]]] = {}
        for handle in handles:
            conn = _reservation(handle).connection
            groups.setdefault(id(conn), (conn, []))[1].append(handle.job_id)
        for conn, job_ids in groups.values():
            if not conn.closed:  # closed: the job went back to the queue, lapsed
                with self._held(conn):
                    conn.delete(job_ids)

    def release(self, handle: Any, delay: float) -> None:
        self._on_reserved(handle, "release", whole_seconds(delay, 0))

    def bury(self, handle: Any) -> None:
        self._on_reserved(handle, "bury")

    def touch(self, handle: Any) -> None:
        self._on_reserved(handle, "touch")

    def _on_reserved(self, handle: Any, command: str, delay: int = 0) -> None:
        reservation = _reservation(handle)
        conn = reservation.connection
        if conn.closed:
            return  # lapsed
        job: greenstalk.Job[bytes] = greenstalk.Job(reservation.job_id, b"")
        with self._held(conn):
            held = conn.held.pop(reservation.job_id, None)
            if command == "touch" and held is not None:
                conn.held[reservation.job_id] = (time.monotonic() + held[1], held[1])
            try:
                if command == "release":
                    conn.client.release(job, PRIORITY, delay)
                elif command == "bury":
                    conn.client.bury(job, PRIORITY)
                else:
                    conn.client.touch(job)
            except greenstalk.NotFoundError:
                pass  # lapsed
            except greenstalk.BuriedError:
                log.warning("beanstalkd at %s ran out of memory and buried job %d instead of releasing it",
                            conn.server, reservation.job_id)

    def stats(self) -> QueueStats:
        """Job counts summed over the servers.  ``workers`` is the most consumers
        any one server sees: every consumer watches the tube on every server it
        has reserved from, so a sum would count each of them once per server."""
        per = self.stats_by_server().values()
        ready, reserved, delayed, buried = (sum(s[i] for s in per) for i in range(4))
        return QueueStats(ready, reserved, delayed, buried, max((s.workers for s in per), default=0))

    def stats_by_server(self) -> dict[str, QueueStats]:
        out = {}
        for index, name in enumerate(self._names):
            with self._using(index) as conn:
                try:
                    tube = conn.client.stats_tube(self.tube)
                except greenstalk.NotFoundError:
                    tube = None  # no one has used the tube yet: nothing in it
            out[name] = QueueStats(0, 0, 0, 0, 0) if tube is None else QueueStats(
                tube["current-jobs-ready"], tube["current-jobs-reserved"], tube["current-jobs-delayed"],
                tube["current-jobs-buried"], tube["current-watching"])
        return out

    def close(self) -> None:
        self._pool.close_all()


def _reservation(handle: Any) -> Reservation:
    if not isinstance(handle, Reservation):
        raise TypeError(f"expected a handle from reserve_many, got {type(handle).__name__}")
    return handle
