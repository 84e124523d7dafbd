"""The local coordinator's state: an in-memory queue with time-to-run and an
in-memory store, guarded by one lock.  Lives in the process that first used the
local backend; workers reach it over a Unix socket (``server.py``)."""

from __future__ import annotations

import heapq
import itertools
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from packmule.backends.base import Put, QueueStats, Reserved

Handle = tuple[int, int]  # (job id, reservation token)


class Core:
    """Queue and store.  Every method is atomic (one lock); a bulk call is
    atomic as a whole here, which is stronger than the interface asks."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.cond = threading.Condition()
        self._ids = itertools.count(1)
        self._tokens = itertools.count(1)
        self.bodies: dict[int, tuple[bytes, float]] = {}  # id -> (body, ttr)
        self.ready: deque[int] = deque()
        self.delayed: list[tuple[float, int]] = []  # heap of (ready at, id)
        self.reserved: dict[int, tuple[int, float, object]] = {}  # id -> (token, deadline, owner)
        self.deadlines: list[tuple[float, int, int]] = []  # heap of (deadline, id, token)
        self.buried: set[int] = set()
        self.kv: dict[str, tuple[bytes | int, float]] = {}  # key -> (value, expires at or 0)
        self.workers = 0

    # --- queue ---------------------------------------------------------------------
    def _tick(self, now: float) -> None:
        """Delayed jobs whose time came, and reservations past their time-to-run,
        become ready."""
        woke = False
        while self.delayed and self.delayed[0][0] <= now:
            _, job = heapq.heappop(self.delayed)
            self.ready.append(job)
            woke = True
        while self.deadlines and self.deadlines[0][0] <= now:
            _, job, token = heapq.heappop(self.deadlines)
            held = self.reserved.get(job)
            if held is not None and held[0] == token and held[1] <= now:
                del self.reserved[job]
                self.ready.append(job)
                woke = True
        if woke:
            self.cond.notify_all()

    def put_many(self, jobs: Sequence[Put]) -> None:
        now = time.monotonic()
        with self.cond:
            for job in jobs:
                jid = next(self._ids)
                self.bodies[jid] = (job.body, job.ttr)
                if job.delay > 0:
                    heapq.heappush(self.delayed, (now + job.delay, jid))
                else:
                    self.ready.append(jid)
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
                body, ttr = self.bodies[jid]
                self.reserved[jid] = (token, now + ttr, owner)
                heapq.heappush(self.deadlines, (now + ttr, jid, token))
                out.append(Reserved((jid, token), body, self.server))
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

    def release(self, handle: Handle, delay: float) -> None:
        with self.cond:
            if self._held(handle):
                del self.reserved[handle[0]]
                if delay > 0:
                    heapq.heappush(self.delayed, (time.monotonic() + delay, handle[0]))
                else:
                    self.ready.append(handle[0])
                    self.cond.notify_all()

    def bury(self, handle: Handle) -> None:
        with self.cond:
            if self._held(handle):
                del self.reserved[handle[0]]
                self.buried.add(handle[0])

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
                self.ready.appendleft(jid)
            self.cond.notify_all()
            return len(mine)

    def stats(self) -> QueueStats:
        with self.cond:
            self._tick(time.monotonic())
            return QueueStats(len(self.ready), len(self.reserved), len(self.delayed), len(self.buried),
                              self.workers)

    # --- store -----------------------------------------------------------------------
    def _live(self, key: str, now: float) -> tuple[bytes | int, float] | None:
        entry = self.kv.get(key)
        if entry is not None and entry[1] and entry[1] <= now:
            del self.kv[key]
            return None
        return entry

    @staticmethod
    def _expiry(ttl: float, now: float) -> float:
        return now + ttl if ttl > 0 else 0.0

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        now = time.monotonic()
        out = {}
        with self.cond:
            for key in keys:
                entry = self._live(key, now)
                if entry is not None:
                    value = entry[0]
                    out[key] = str(value).encode() if isinstance(value, int) else value
        return out

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        expires = self._expiry(ttl, time.monotonic())
        with self.cond:
            for key, value in items.items():
                self.kv[key] = (value, expires)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        now = time.monotonic()
        expires = self._expiry(ttl, now)
        added = set()
        with self.cond:
            for key, value in items.items():
                if self._live(key, now) is None:
                    self.kv[key] = (value, expires)
                    added.add(key)
        return added

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        now = time.monotonic()
        out: dict[str, int | None] = {}
        with self.cond:
            for key, delta in deltas.items():
                entry = self._live(key, now)
                if entry is None:
                    out[key] = None
                    continue
                value = int(entry[0]) + delta
                self.kv[key] = (value, entry[1])
                out[key] = value
        return out

    def delete_many(self, keys: Sequence[str]) -> None:
        with self.cond:
            for key in keys:
                self.kv.pop(key, None)

    def sweep(self) -> None:
        """Drop expired keys (called now and then)."""
        now = time.monotonic()
        with self.cond:
            for key in [k for k, (_, exp) in self.kv.items() if exp and exp <= now]:
                del self.kv[key]


def call(core: Core, owner: object, op: str, args: tuple[Any, ...]) -> Any:
    """Dispatch one request from a client connection."""
    if op == "reserve_many":
        return core.reserve_many(owner, *args)
    if op not in OPS:
        raise ValueError(f"unknown local backend operation {op!r}")
    return getattr(core, op)(*args)


OPS = frozenset({"put_many", "ack_many", "release", "bury", "touch", "stats", "get_many", "set_many",
                 "add_many", "incr_many", "delete_many"})
