"""The work queue on one or more beanstalkd servers, through greenstalk.

A job goes to the first server in its shard key's rendezvous order (a hash of
the key with each server's name: the same in every process, whatever order the
servers are listed in) that this process has not set aside.  ``server_for``
names the first of all, the key's preferred server, and JobRefs carry it; a job
queued while that server was down is on the next in its order.  A server that
fails is set aside (``_pool.Health``) and probed back; until then its share of
new jobs goes to the others, evenly, and workers reserve from the others.
Nothing that must be the same in every process depends on which servers are
up: a job's effects count once by its value keys in the store, wherever it was
queued, so a job put twice (once on a server that failed during the put) runs
twice and counts once.

Each thread keeps one connection per server; a reservation belongs to the
connection that made it (beanstalkd's rule), so its handle carries that
connection, and ack, release, bury and touch go back on it, under the
connection's own lock.  When that connection closes (an error, ``close()``, its
thread ended, the process died, the server died), beanstalkd makes the job
ready again (after a restart, from its binlog) and the handle is lapsed: acting
on it is ignored, as the interface asks.

Bulk commands are pipelined on greenstalk's socket (``_connection.py``).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import greenstalk

from packmule._core.digests import blake2b
from packmule._core.errors import BackendUnavailable

from ..base import Put, Queue, QueueStats, Reserved
from ._connection import Connection, Keeper, Reservation, whole_seconds
from ._pool import Health, Servers, ThreadConnections
from .wake import Wakes

log = logging.getLogger("packmule.backends.beanstalk")


def _scores(shard: str, names: Sequence[str]) -> list[bytes]:
    key = b"\0" + shard.encode("utf-8", "surrogatepass")
    return [blake2b(name.encode() + key, digest_size=8).digest() for name in names]


def shard_index(shard: str, names: Sequence[str]) -> int:
    """The index in ``names`` of a shard key's preferred server: the highest
    rendezvous score.  Pure, and the same in every process and Python version
    (unlike ``hash()``, which is salted per process) for the same server names,
    listed in any order; a server added or removed moves only its own share."""
    scores = _scores(shard, names) if len(names) > 1 else [b""]
    return scores.index(max(scores))


def shard_order(shard: str, names: Sequence[str]) -> list[int]:
    """The indexes of ``names`` in a shard key's order of preference (the
    preferred server first): when one server is down, each of its keys goes to
    its own next, so its share spreads evenly over the others."""
    scores = _scores(shard, names) if len(names) > 1 else [b""]
    return sorted(range(len(names)), key=scores.__getitem__, reverse=True)


class BeanstalkQueue(Wakes, Queue):
    """The tube ``tube`` on every server of ``servers``."""

    def __init__(self, servers: Servers, tube: str, connect_timeout: float, pipeline: bool = True) -> None:
        self.servers, self.tube, self.pipeline = servers, tube, pipeline
        self._names = servers.names
        self._ids = servers.ids  # (what placement hashes: labels where given)
        self._index_of = {name: i for i, name in enumerate(self._names)}
        self._connect_timeout = connect_timeout
        self._turns = itertools.count()
        self._pool: ThreadConnections[Connection] = ThreadConnections(self._connect, lambda c: not c.closed)
        self._keeper = Keeper()
        self.health = Health(servers, "beanstalkd", b"list-tube-used\r\n", connect_timeout)
        self._wakes_init()

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

    # --- which servers -----------------------------------------------------------------------
    def _failed(self, index: int, exc: BackendUnavailable, failed: dict[int, str]) -> None:
        """Server ``index`` failed with ``exc``: set it aside (its prober brings it back)."""
        cause = exc.__cause__ or exc
        failed[index] = f"{type(cause).__name__}: {cause}" if str(cause) else type(cause).__name__
        self.health.set_aside(index, cause)

    def _worked(self, index: int) -> None:
        """Server ``index`` answered: if it was set aside, it is back."""
        if not self.health.up(index):
            self.health.came_back(index)

    def _in_turn(self) -> list[int]:
        """The servers not set aside (all of them, to be tried once anyway, when
        every one is), starting with the next in turn."""
        live = self.health.live() or list(range(len(self._names)))
        first = next(self._turns) % len(live)
        return live[first:] + live[:first]

    def _reachable(self, failed: dict[int, str], anyway: bool) -> dict[int, Connection]:
        """This thread's connections to the servers not set aside (connecting
        where it has none); those that fail are set aside.  ``anyway``: when
        none of those answers, each of the others too (once: the command sent
        on it then says whether it is back)."""
        out: dict[int, Connection] = {}
        for index in self.health.live():
            self._reach(index, failed, out)
        if anyway and not out:
            for index in range(len(self._names)):
                if index not in failed:
                    self._reach(index, failed, out)
        return out

    def _reach(self, index: int, failed: dict[int, str], out: dict[int, Connection]) -> None:
        """(Not proof that the server is back: the connection may be one this
        thread made before another thread found the server gone.)"""
        try:
            out[index] = self._pool.get(index)
        except BackendUnavailable as exc:
            self._failed(index, exc, failed)

    def _none_reachable(self, failed: dict[int, str]) -> BackendUnavailable:
        """The error when no server would serve: each one's problem, and the setting."""
        now, problems = time.time(), []
        for index, state in enumerate(self.health.states()):
            problem = failed.get(index) or (f"set aside {now - (state.since or now):.1f}s ago after "
                                            f"{state.problem or 'a failure'}")
            problems.append(f"{state.server}: {problem}" if len(self._names) > 1 else problem)
        exc = self.servers.unavailable("beanstalkd", ", ".join(self._names), "; ".join(problems))
        exc.server = self._names[0] if len(self._names) == 1 else None
        return exc

    # --- Queue ------------------------------------------------------------------------------
    @property
    def max_body(self) -> int:  # type: ignore[override]
        """The smallest max-job-size among the servers this thread reaches (each
        is asked once per connection), so that a body that fits goes to any of
        them; a server set aside is not waited for.  BackendUnavailable if none
        answers (each tried once)."""
        failed: dict[int, str] = {}
        conns = self._reachable(failed, anyway=True)
        if not conns:
            raise self._none_reachable(failed)
        return min(conn.max_job_size for conn in conns.values())

    def server_for(self, shard: str) -> str:
        """The shard key's preferred server (see ``shard_index``), up or not."""
        return self._names[shard_index(shard, self._ids)]

    def put_many(self, jobs: Sequence[Put], elsewhere: Callable[[Sequence[Put]], None] | None = None) -> None:
        """Queue every job on a live server: the first in its shard key's order
        (``shard_order``) that this process has not set aside.  A server that
        fails during the call is set aside, and the jobs meant for it go to the
        next server in their order (the failed one may have queued some: they
        run when it is back; a job queued twice counts once by its value keys).
        Only when every server is set aside or failed in this call is each tried
        once anyway (a success brings it back); then BackendUnavailable names
        them all.  A body larger than the smallest max-job-size of the servers
        this thread reaches is refused (ValueError) before anything is queued.
        Order is kept among the jobs that go to one server.  ``elsewhere`` is
        told of the jobs about to go to a server not their preferred one first."""
        failed: dict[int, str] = {}
        smallest = min(self._reachable(failed, anyway=False).values(), key=lambda c: c.max_job_size, default=None)
        if smallest is not None:  # refuse before anything is queued (none reached: the puts will tell)
            for job in jobs:
                if len(job.body) > smallest.max_job_size:
                    raise smallest.too_big(job)
        pending = list(jobs)
        while pending:
            groups = self._route(pending, failed)
            if not groups:
                raise self._none_reachable(failed)
            pending = []
            for index, group in groups.items():
                off = [job for job in group if shard_index(job.shard, self._ids) != index] if elsewhere else []
                if off and elsewhere is not None:
                    elsewhere(off)  # (before they are queued there; what it raises, this call raises)
                try:
                    with self._using(index) as conn:
                        (conn.put if self.pipeline else conn.put_one_by_one)(group)
                except BackendUnavailable as exc:
                    self._failed(index, exc, failed)
                    pending += group  # to the next server in each one's order
                else:
                    self._worked(index)

    def _route(self, jobs: Sequence[Put], failed: dict[int, str]) -> dict[int, list[Put]]:
        """Which server each job goes to: the first in its order that is up and
        has not failed in this call; if none is, the first that has not failed."""
        n = len(self._names)
        if n == 1:
            return {} if failed else {0: list(jobs)}
        usable = [i for i in self.health.live() if i not in failed] or [i for i in range(n) if i not in failed]
        groups: dict[int, list[Put]] = {}
        for job in jobs:
            index = shard_index(job.shard, self._ids)
            if index not in usable:
                index = next((i for i in shard_order(job.shard, self._ids) if i in usable), -1)
                if index < 0:
                    return {}
            groups.setdefault(index, []).append(job)
        return groups

    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        """At most one job from each server not set aside (see ``Connection.reserve``):
        first the ready ones, then, if none was, a blocking wait on one of them
        (the next in turn).  Some consumer must block on each server: beanstalkd
        1.12 times reserved jobs out reliably only while a reserve waits (seen
        here: 5 of 12 jobs never timed out while consumers only polled).
        A server that fails is set aside and the call goes on with the others,
        keeping what they gave; a set-aside server is asked again once its
        prober brings it back (when every server is set aside, each is tried
        once anyway).  BackendUnavailable only when no server could be asked."""
        if max_count < 1:
            return []
        got: list[Reserved] = []
        failed: dict[int, str] = {}
        order = self._in_turn()
        try:
            if len(order) > 1:
                for index in order:
                    job = self._reserve_on(index, 0, failed)
                    if job is not None:
                        got.append(job)
                        if len(got) >= max_count:
                            break
            if not got:
                for index in (i for i in order if i not in failed):
                    job = self._reserve_on(index, whole_seconds(timeout, 0), failed)
                    got += [job] if job is not None else []
                    if index not in failed:
                        break
            if len(failed) == len(order):
                raise self._none_reachable(failed)
            for job in got:
                self._keeper.watch(job.handle.connection)
        except BaseException:
            for job in got:  # hand back what this call took, then report the failure
                with contextlib.suppress(Exception):
                    self.release(job.handle, 0.0)
            raise
        return got

    def _reserve_on(self, index: int, timeout: int, failed: dict[int, str]) -> Reserved | None:
        """A job from server ``index`` (None: none, or the server failed and is set aside)."""
        try:
            with self._using(index) as conn:
                conn.watch()
                job = conn.reserve(timeout)
        except BackendUnavailable as exc:
            self._failed(index, exc, failed)
            return None
        self._worked(index)
        return job

    def ack_many(self, handles: Sequence[Any]) -> None:
        """Delete each job on the connection that reserved it.  A connection that
        fails now is a server gone away: its jobs are lapsed (beanstalkd gives them
        back, after a restart from its binlog), so they are left, and the server set
        aside; the other connections' jobs are still deleted."""
        groups: dict[int, tuple[Connection, list[int]]] = {}
        for handle in handles:
            conn = _reservation(handle).connection
            groups.setdefault(id(conn), (conn, []))[1].append(handle.job_id)
        for conn, job_ids in groups.values():
            if not conn.closed:  # closed: the job went back to the queue, lapsed
                with self._lapsing(conn), self._held(conn):
                    conn.delete(job_ids)

    def release(self, handle: Any, delay: float) -> None:
        self._on_reserved(handle, "release", whole_seconds(delay, 0))

    def bury(self, handle: Any) -> None:
        self._on_reserved(handle, "bury")

    def touch(self, handle: Any) -> None:
        self._on_reserved(handle, "touch")

    @contextlib.contextmanager
    def _lapsing(self, conn: Connection) -> Iterator[None]:
        """A failure of the connection that holds a reservation lapses it (see
        ``ack_many``): the server is set aside, and nothing is raised."""
        try:
            yield
        except BackendUnavailable as exc:
            self._failed(self._index_of[conn.server], exc, {})

    def _on_reserved(self, handle: Any, command: str, delay: int = 0) -> None:
        """``command`` on the reservation's own connection; lapsed (that connection
        closed or failing, its job given back by beanstalkd): ignored."""
        reservation = _reservation(handle)
        conn = reservation.connection
        if conn.closed:
            return  # lapsed
        job: greenstalk.Job[bytes] = greenstalk.Job(reservation.job_id, b"")
        with self._lapsing(conn), self._held(conn):
            held = conn.held.pop(reservation.job_id, None)
            if command == "touch" and held is not None:
                conn.held[reservation.job_id] = (time.monotonic() + held[1], held[1])
            try:
                if command == "release":
                    conn.client.release(job, reservation.pri, delay)
                elif command == "bury":
                    conn.client.bury(job, reservation.pri)
                else:
                    conn.client.touch(job)
            except greenstalk.NotFoundError:
                pass  # lapsed
            except greenstalk.BuriedError:
                log.warning("beanstalkd at %s ran out of memory and buried job %d instead of releasing it",
                            conn.server, reservation.job_id)

    def stats(self) -> QueueStats:
        """Job counts summed over the servers this process reaches (``uncounted``
        names the others).  ``workers`` is the most consumers any one server sees:
        every consumer watches the tube on every server it has reserved from, so a
        sum would count each of them once per server."""
        per = self.stats_by_server().values()
        ready, reserved, delayed, buried = (sum(s[i] for s in per) for i in range(4))
        return QueueStats(ready, reserved, delayed, buried, max((s.workers for s in per), default=0))

    def stats_by_server(self) -> dict[str, QueueStats]:
        """Counts per server, of the servers this process reaches: one set aside,
        or failing now (then set aside), is left out (``health.states()`` says
        which and since when).  BackendUnavailable only if none answers (each
        tried once)."""
        failed: dict[int, str] = {}
        out = self._tube_stats(self._reachable(failed, anyway=True), failed)
        if not out and len(failed) < len(self._names):  # those asked failed: the others, once
            out = self._tube_stats(self._reachable(failed, anyway=True), failed)
        if not out:
            raise self._none_reachable(failed)
        return out

    def _tube_stats(self, conns: dict[int, Connection], failed: dict[int, str]) -> dict[str, QueueStats]:
        out = {}
        for index, conn in conns.items():
            try:
                with self._held(conn):
                    try:
                        tube = conn.client.stats_tube(self.tube)
                    except greenstalk.NotFoundError:
                        tube = None  # no one has used the tube yet: nothing in it
            except BackendUnavailable as exc:
                self._failed(index, exc, failed)
                continue
            self._worked(index)
            out[self._names[index]] = QueueStats(0, 0, 0, 0, 0) if tube is None else QueueStats(
                tube["current-jobs-ready"], tube["current-jobs-reserved"], tube["current-jobs-delayed"],
                tube["current-jobs-buried"], tube["current-watching"])
        return out

    def uncounted(self) -> list[str]:
        """The servers set aside now: ``stats()`` leaves their jobs out."""
        return [self._names[i] for i in range(len(self._names)) if not self.health.up(i)]

    def close(self) -> None:
        self._pool.close_all()


def _reservation(handle: Any) -> Reservation:
    if not isinstance(handle, Reservation):
        raise TypeError(f"expected a handle from reserve_many, got {type(handle).__name__}")
    return handle
