"""Waking a waiting driver instead of making it poll.

A driver that waits for a run's ``done`` counter to reach a number writes, in
the run's ``wake`` key, its listener's channel and that number (``Waiter.arm``
in ``packmule._driver.waiting``).  A worker reads the key with what its batch
needs anyway (one bulk get), and again just before its commit's counts when the
batch and its value adds took long enough for a driver to have armed meanwhile
(``Wakes.reread``); the commit whose ``incr`` of ``done`` crosses the number
wakes the channel (``Queue.wake``).  ``incr``
results are distinct, so one commit crosses it.  A wake lost to a worker's
death, or to a driver that armed just after a short batch read the key, costs
only the wait's periodic look (``waiting.LOOK_EVERY``)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Mapping

from packmule._core.errors import BackendUnavailable
from packmule.backends.base import Queue, Store

__all__ = ["MAX_WAKERS", "REREAD_AFTER", "Wakes", "arm", "arm_many", "armed", "crossed", "wake_crossed",
           "wake_value"]

REREAD_AFTER = 0.005  # s: a batch longer than this reads its runs' wake keys again before its counts
MAX_WAKERS = 8  # channels one run's wake key holds: the drivers that armed it last


def wake_value(channel: str, threshold: int) -> bytes:
    return f"{channel} {threshold}".encode()


def arm(store: Store, key: str, channel: str, until_done: int, ttl: float) -> None:
    """Put a waiting driver's channel and count in the run's wake key, beside those
    of up to MAX_WAKERS - 1 other drivers (a read and a write: two drivers arming
    at once may drop one, which then only looks every ``waiting.LOOK_EVERY``)."""
    arm_many(store, {key: until_done}, channel, ttl)


def arm_many(store: Store, wants: Mapping[str, int], channel: str, ttl: float) -> None:
    """``arm`` for several runs' wake keys (key -> the count to wake at), with one
    bulk read and one bulk write (a shared waiter arms the runs of all its waits)."""
    got = store.get_many(list(wants))
    mine = channel.encode() + b" "
    out = {}
    for key, until_done in wants.items():
        others = [line for line in (got.get(key) or b"").split(b"\n") if line and not line.startswith(mine)]
        out[key] = b"\n".join([*others[-(MAX_WAKERS - 1):], wake_value(channel, until_done)])
    store.set_many(out, ttl)


def armed(got: Mapping[str, bytes], prefixes: Iterable[str]) -> dict[str, list[tuple[str, int]]]:
    """Run prefix -> its waiters' (channel, done count to wake it at), for the runs whose wake key is armed."""
    out = {}
    for p in prefixes:
        raw = got.get(p + "wake")
        if raw:
            waiters = []
            for line in raw.decode("ascii", "replace").splitlines():
                channel, _, threshold = line.partition(" ")
                if threshold.isdigit():
                    waiters.append((channel, int(threshold)))
            out[p] = waiters
    return out


def crossed(wakes: Mapping[str, list[tuple[str, int]]], results: Mapping[str, int | None],
            deltas: Mapping[str, int]) -> list[str]:
    """The channels whose number this commit's count of ``done`` reached."""
    out = []
    for p, waiters in wakes.items():
        done = results.get(p + "done")
        if done is not None:
            before = done - deltas.get(p + "done", 0)
            out += [channel for channel, threshold in waiters if before < threshold <= done]
    return out


def wake_crossed(queue: Queue, wakes: Mapping[str, list[tuple[str, int]]], results: Mapping[str, int | None],
                 deltas: Mapping[str, int]) -> None:
    """Wake the channels this commit's count crossed (best effort: a wait looks now and then anyway)."""
    channels = crossed(wakes, results, deltas)
    if channels:
        with contextlib.suppress(BackendUnavailable):
            queue.wake(channels)


class Wakes:
    """A worker batch's waiting drivers: run prefix -> (channel, done count to
    wake it at), as read from its runs' wake keys at ``read_at``."""

    __slots__ = ("read_at", "runs", "waiters")

    def __init__(self, got: Mapping[str, bytes] = {}, runs: Iterable[str] = ()) -> None:
        self.runs = set(runs)
        self.waiters = armed(got, self.runs)
        self.read_at = time.monotonic()

    def reread(self, store: Store) -> None:
        """Read the wake keys again if a driver could have armed one since they
        were read (REREAD_AFTER): called just before the counts, so that a batch
        whose jobs and value adds outlast the driver's settling polls after it
        arms (``waiting.ARM_SETTLE``) still wakes it, not its periodic look."""
        if self.runs and time.monotonic() - self.read_at > REREAD_AFTER:
            with contextlib.suppress(BackendUnavailable):  # (then its periodic look finds the run done)
                self.waiters = armed(store.get_many([p + "wake" for p in self.runs]), self.runs)
                self.read_at = time.monotonic()

    def wake_crossed(self, queue: Queue, results: Mapping[str, int | None], deltas: Mapping[str, int]) -> None:
        if self.waiters:
            wake_crossed(queue, self.waiters, results, deltas)
