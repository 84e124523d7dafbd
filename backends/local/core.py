"""The local coordinator's state: an in-memory queue with time-to-run and an
in-memory store, guarded by one lock.  Lives in the process that first used the
local backend; workers reach it over a Unix socket (``server.py``)."""

from __future__ import annotations

import heapq
import itertools
import pickle
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from multiprocessing.connection import Connection
from typing import Any

from packmule.backends.base import Put, QueueStats, Reserved
from packmule.backends.local.ledger import LEDGER_OPS, Ledger

Handle = tuple[int, int]  # (job id, reservation token)


class ReadyJobs:
    """The ready jobs' ids: of a higher priority first, oldest first within one
    (a deque per priority present; one, most of the time)."""

    __slots__ = ("by", "order", "count")

    def __init__(self) -> None:
        self.by: dict[int, deque[int]] = {}
        self.order: list[int] = []  # the priorities present, highest first
        self.count = 0

    def __len__(self) -> int:
        return self.count

    def _of(self, priority: int) -> deque[int]:
        jobs = self.by.get(priority)
        if jobs is None:
            jobs = self.by[priority] = deque()
            self.order.append(priority)
            self.order.sort(reverse=True)
        return jobs

    def append(self, job: int, priority: int) -> None:
        self._of(priority).append(job)
        self.count += 1

    def appendleft(self, job: int, priority: int) -> None:
        self._of(priority).appendleft(job)
        self.count += 1

    def popleft(self) -> int:
        priority = self.order[0]
        jobs = self.by[priority]
        job = jobs.popleft()
        if not jobs:
            del self.by[priority]
            self.order.pop(0)
        self.count -= 1
        return job


class Core:
    """Queue and store.  Every method is atomic (one lock); a bulk call is
    atomic as a whole here, which is stronger than the interface asks."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.cond = threading.Condition()
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self.bodies: dict[int, tuple[bytes, float, int]] = {}  # id -> (body, ttr, priority)
        self.ready = ReadyJobs()
        self.delayed: list[tuple[float, int]] = []  # heap of (ready at, id)
        self.reserved: dict[int, tuple[int, float, object]] = {}  # id -> (token, deadline, owner)
        self.deadlines: list[tuple[float, int, int]] = []  # heap of (deadline, id, token)
        self.buried: set[int] = set()
        self.crashes: dict[int, int] = {}  # id -> times its holder died holding it (only those that did)
        # the store: values, and when each expires (keys without a ttl are not in
        # ``expires``).  Two flat dicts, not one of (value, expiry) pairs: a run
        # stores a value per job, and a pair per key is an object for the
        # garbage collector to walk, in the process of the user's driver.
        self.values: dict[str, bytes | int] = {}
        self.expires: dict[str, float] = {}
        self.workers = 0
        # listeners' channels (``Queue.listen``): channel -> woken since its last
        # wait; and whose connection registered each (dropped when it goes away)
        self.signals = threading.Condition()
        self.woken: dict[str, bool] = {}
        self.listeners: dict[object, set[str]] = {}
        # the ledger (Backend.ledger): registers kept for the backend's life (ledger.py)
        self.ledger = Ledger()

    # --- queue ---------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        """Delayed jobs whose time came, and reservations past their time-to-run,
        become ready."""
        woke = False
        while self.delayed and self.delayed[0][0] <= now:
            _, job = heapq.heappop(self.delayed)
            self.ready.append(job, self.bodies[job][2])
            woke = True
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job, token = heapq.heappop(self.deadlines)
            held = self.reserved.get(job)
            if held is not None and held[0] == token and held[1] <= now:
                del self.reserved[job]
                self.ready.append(job, self.bodies[job][2])
                woke = True
        if woke:
            self.cond.notify_all()

    def put_many(self, jobs: Sequence[Put]) -> None:
        now = time.monotonic()
        with self.cond:
            for job in jobs:
                jid = next(self._ids)
                self.bodies[jid] = (job.body, job.ttr, job.priority)
                if job.delay > 0:
                    heapq.heappush(self.delayed, (now + job.delay, jid))
                else:
                    self.ready.append(jid, job.priority)
            self.cond.notify_all()

    def reserve_many(self, owner: object, max_count: int, timeout: float) -> list[Reserved]:
        end = time.monotonic() + timeout
        with self.cond:
            while True:
                now = time.monotonic()
                self._tick(now)
                if self.ready:
                    break
                if now >= end:
                    return []
                self.cond.wait(min(end - now, 0.05))
            out = []
            for _ in range(min(max_count, len(self.ready))):
                jid = self.ready.popleft()
                token = next(self._tokens)
                body, ttr, _ = self.bodies[jid]
                self.reserved[jid] = (token, now + ttr, owner)
                heapq.heappush(self.deadlines, (now + ttr, jid, token))
                out.append(Reserved((jid, token), body, self.server, self.crashes.get(jid, 0)))
            return out

    def _held(self, handle: Handle) -> bool:
        held = self.reserved.get(handle[0])
        return held is not None and held[0] == handle[1]

    def ack_many(self, handles: Sequence[Handle]) -> None:
        with self.cond:
            for handle in handles:
                if self._held(handle):
                    del self.reserved[handle[0]]
                    del self.bodies[handle[0]]
                    if self.crashes:
                        self.crashes.pop(handle[0], None)

    def release(self, handle: Handle, delay: float) -> None:
        with self.cond:
            if self._held(handle):
                del self.reserved[handle[0]]
                if delay > 0:
                    heapq.heappush(self.delayed, (time.monotonic() + delay, handle[0]))
                else:
                    self.ready.append(handle[0], self.bodies[handle[0]][2])
                    self.cond.notify_all()

    def bury(self, handle: Handle) -> None:
        with self.cond:
            if self._held(handle):
                del self.reserved[handle[0]]
                self.buried.add(handle[0])
                self.crashes.pop(handle[0], None)

    def touch(self, handle: Handle) -> None:
        with self.cond:
            if self._held(handle):
                token, _, owner = self.reserved[handle[0]]
                deadline = time.monotonic() + self.bodies[handle[0]][1]
                self.reserved[handle[0]] = (token, deadline, owner)
                heapq.heappush(self.deadlines, (deadline, handle[0], token))

    def release_owner(self, owner: object) -> int:
        """A consumer died: its reservations are ready again at once."""
        with self.cond:
            mine = [jid for jid, held in self.reserved.items() if held[2] is owner]
            for jid in mine:
                del self.reserved[jid]
                self.ready.appendleft(jid, self.bodies[jid][2])
                self.crashes[jid] = self.crashes.get(jid, 0) + 1
            self.cond.notify_all()
            return len(mine)

    def stats(self) -> QueueStats:
        with self.cond:
            self._tick(time.monotonic())
            return QueueStats(len(self.ready), len(self.reserved), len(self.delayed), len(self.buried),
                              self.workers)

    # --- wakes ------------------------------------------------------------------------
    def listen(self, owner: object, channel: str) -> None:
        with self.signals:
            self.woken.setdefault(channel, False)
            self.listeners.setdefault(owner, set()).add(channel)

    def listen_wait(self, channel: str, timeout: float) -> bool:
        with self.signals:
            if channel not in self.woken:
                raise LookupError(f"channel {channel!r} is not listened on (listen first)")
            self.signals.wait_for(lambda: self.woken.get(channel, True), timeout)
            woken = self.woken.get(channel, False)
            if channel in self.woken:
                self.woken[channel] = False
            return woken

    def wake(self, channels: Sequence[str]) -> None:
        with self.signals:
            hit = [channel for channel in channels if channel in self.woken]
            if hit:
                self.woken.update(dict.fromkeys(hit, True))
                self.signals.notify_all()

    def unlisten(self, owner: object) -> None:
        """A listener's connection went away: its channels go."""
        with self.signals:
            for channel in self.listeners.pop(owner, ()):
                self.woken.pop(channel, None)

    # --- store -----------------------------------------------------------------------
    def _live(self, key: str, now: float) -> bytes | int | None:
        """The key's value; None if it is absent or expired (an expired key is dropped)."""
        value = self.values.get(key)
        if value is not None:
            expires = self.expires.get(key)
            if expires is not None and expires <= now:
                del self.values[key], self.expires[key]
                return None
        return value

    def _store(self, items: Mapping[str, bytes | int], ttl: float, now: float) -> None:
        self.values.update(items)
        if ttl > 0:
            self.expires.update(dict.fromkeys(items, now + ttl))
        else:
            for key in items:
                self.expires.pop(key, None)

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        return {key: value for key, value in zip(keys, self.get_list(keys), strict=True) if value is not None}

    def get_list(self, keys: Sequence[str]) -> list[bytes | None]:
        """The value of each key, None where it is absent: what a client is sent
        (not every key again).  Counters read back as their decimal bytes."""
        now = time.monotonic()
        with self.cond:
            # (lookups in C: a driver reads its values a thousand at a time)
            found: list[Any] = list(map(self.values.get, keys))
            if min(filter(None, map(self.expires.get, keys)), default=now + 1) <= now:
                found = [self._live(key, now) for key in keys]  # some have expired: drop them
        if int in map(type, found):
            found = [str(value).encode() if isinstance(value, int) else value for value in found]
        return found

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        with self.cond:
            self._store(items, ttl, time.monotonic())

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        return set(items).difference(self.add_refused(items, ttl))

    def add_refused(self, items: Mapping[str, bytes | int], ttl: float) -> list[str]:
        """``add_many``, answering with the keys it did NOT add: usually none,
        so a client is not sent back every key of a batch's values."""
        now = time.monotonic()
        with self.cond:
            # (the keys already present, found in C; an expired one may be added again)
            refused = [key for key in self.values.keys() & items.keys() if self._live(key, now) is not None]
            if refused:
                taken = set(refused)
                items = {key: value for key, value in items.items() if key not in taken}
            self._store(items, ttl, now)
        return refused

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        now = time.monotonic()
        out: dict[str, int | None] = {}
        with self.cond:
            for key, delta in deltas.items():
                value = self._live(key, now)
                if value is None:
                    out[key] = None
                    continue
                out[key] = self.values[key] = max(0, int(value) + delta)  # its expiry stays
        return out

    def delete_many(self, keys: Sequence[str]) -> None:
        with self.cond:
            for key in keys:
                self.values.pop(key, None)
                self.expires.pop(key, None)

    def sweep(self) -> None:
        """Drop expired keys (called now and then)."""
        now = time.monotonic()
        with self.cond:
            for key in [k for k, exp in self.expires.items() if exp <= now]:
                del self.values[key], self.expires[key]

    # --- ledger (ledger.py; its own lock) -------------------------------------------------
    def ledger_read(self, name: str) -> tuple[bytes | None, int | None]:
        return self.ledger.read(name)

    def ledger_swap(self, name: str, token: int | None, value: bytes | None, ttl: float) -> bool:
        return self.ledger.swap(name, token, value, ttl)

    def ledger_prune(self) -> int:
        return self.ledger.prune()


def send(conn: Connection, message: Any) -> None:
    """Send one message over a client connection, as a plain pickle:
    ``Connection.send`` builds a pickler with a copy of multiprocessing's reducer
    table for every message, three times the cost for the small ones."""
    conn.send_bytes(pickle.dumps(message, pickle.HIGHEST_PROTOCOL))


def receive(conn: Connection) -> Any:
    return pickle.loads(conn.recv_bytes())


def call(core: Core, owner: object, op: str, args: tuple[Any, ...]) -> Any:
    """Dispatch one request from a client connection."""
    if op == "reserve_many":
        return core.reserve_many(owner, *args)
    if op == "listen":
        return core.listen(owner, *args)
    if op not in OPS:
        raise ValueError(f"unknown local backend operation {op!r}")
    return getattr(core, op)(*args)


OPS = frozenset({"put_many", "ack_many", "release", "bury", "touch", "stats", "get_many", "get_list", "set_many",
                 "add_many", "add_refused", "incr_many", "delete_many", "wake", "listen_wait"})
OPS |= LEDGER_OPS
