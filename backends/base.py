"""The backend interface: three services the engine builds every semantic from.

A backend is a work queue, a shared store and named locks, and may have
registers (``Backend.registers``, ``Backend.ledger``).  Nothing here knows
about runs, fan-in or progress: those live once, in ``packmule``.  A third
party's backend subclasses :class:`Backend`, registers it under the entry point
group ``packmule.backends``, and runs ``packmule.conformance`` against it.

Units: seconds everywhere, as floats; a backend that works in whole seconds
rounds *up* (never down to 0).  Every method may raise
``packmule.BackendUnavailable`` naming the server and the setting that chose it;
no backend-native exception crosses this boundary.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple


class Put(NamedTuple):
    """One job to queue: its body, its time-to-run, a delay before it is ready,
    its priority, and the shard key that picks its preferred server (equal keys,
    equal server; a queue of several servers may put it on another while that
    one is down).

    *Priority*: an int in ``PRIORITIES``; of the ready jobs of a server, one of
    a higher priority is reserved before any of a lower one, and those of one
    priority oldest first.  A released job keeps its priority.

    *Delay*: seconds before the job is ready, at most ``Queue.max_delay``.  A
    backend that keeps whole seconds rounds a put's delay *down* (the engine
    holds a job that comes early, by under a second, until its time: the job's
    body says when); other delays (``release``) it rounds up."""

    shard: str
    body: bytes
    ttr: float
    delay: float = 0.0
    priority: int = 0


PRIORITIES = range(-100, 101)  # the priorities every backend keeps apart


class Reserved(NamedTuple):
    """A job handed to this consumer: an opaque handle for ack/release/bury/touch,
    the body exactly as put, the server that holds it, and how many times a
    consumer died (its process or connection ended) while it held this job.
    Releases, buries and time-to-run expiries are not crashes.  A backend that
    cannot tell says 0; the engine then cannot set aside a job that keeps
    killing its workers."""

    handle: Any
    body: bytes
    server: str
    crashes: int = 0


class QueueStats(NamedTuple):
    ready: int
    reserved: int
    delayed: int
    buried: int
    workers: int  # consumers watching the queue now


class ServerState(NamedTuple):
    """What this process knows of one server: ``state`` is ``'up'`` or ``'aside'``
    (it failed, and is being probed again); ``since`` is when it was set aside,
    ``back`` when it last came back (wall-clock seconds, None if never); ``role``
    what an up server says it is, where it says (a ZooKeeper member: 'leader',
    'follower', 'standalone'), else ''."""

    service: str  # 'beanstalkd', 'memcached', 'ZooKeeper'
    server: str
    state: str
    since: float | None = None
    back: float | None = None
    problem: str = ""
    role: str = ""


class Listener(abc.ABC):
    """A channel of its own that a waiting process blocks on until a worker wakes
    it (``Queue.wake``), instead of polling: ``channel`` is what a worker is
    told to wake.  One thread uses a listener at a time."""

    channel: str

    @abc.abstractmethod
    def wait(self, timeout: float) -> bool:
        """Block until the channel is woken (True; the wake is used up) or
        ``timeout`` seconds pass (False).  A wake sent while nobody waited is
        kept for the next ``wait``."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Give the channel up."""


class Queue(abc.ABC):
    """A work queue with time-to-run.  A reserved job belongs to its consumer
    until it is acked, released, buried, or its time-to-run passes (or the
    consumer's connection/process dies): then it is ready again for anyone."""

    #: The largest body ``put_many`` accepts, in bytes (None: no limit).  The
    #: engine keeps larger bodies in the store and queues a reference to them.
    max_body: int | None = None
    #: The longest delay ``put_many`` keeps a job for, in seconds.
    max_delay: float = 2.0**32 - 1

    @abc.abstractmethod
    def server_for(self, shard: str) -> str:
        """The ``'host:port'`` (or ``'local:PID'``) that a job with this shard key
        goes to while that server is up (its preferred server).  Pure: no I/O,
        the same answer for the same key in every process, up or not."""

    @abc.abstractmethod
    def put_many(self, jobs: Sequence[Put], elsewhere: Callable[[Sequence[Put]], None] | None = None) -> None:
        """Queue every job, in order, in as few round trips as the transport allows.
        Not atomic: on error some may be queued; callers rely on idempotent jobs.
        Raises ``ValueError`` for a body the server cannot hold (too large).
        ``elsewhere`` is called with the jobs about to be queued on a server
        other than their preferred one (``server_for``), before they are (what it
        raises, the call raises); a queue of one server never calls it."""

    @abc.abstractmethod
    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        """Reserve up to ``max_count`` ready jobs.  Blocks at most ``timeout``
        seconds for the first; returns ``[]`` if none became ready.  Never
        returns more than ``max_count``.  Each job's time-to-run starts now."""

    @abc.abstractmethod
    def ack_many(self, handles: Sequence[Any]) -> None:
        """Delete these reserved jobs for good.  A handle whose reservation has
        lapsed (time-to-run passed, job given to another) is ignored: acking
        never deletes a job that another consumer holds."""

    @abc.abstractmethod
    def release(self, handle: Any, delay: float) -> None:
        """Give a reserved job back, ready after ``delay`` seconds.  Lapsed: ignored."""

    @abc.abstractmethod
    def bury(self, handle: Any) -> None:
        """Set a reserved job aside: never reserved again, counted in ``stats().buried``.
        Lapsed: ignored."""

    @abc.abstractmethod
    def touch(self, handle: Any) -> None:
        """Restart the job's time-to-run.  Lapsed: ignored."""

    @abc.abstractmethod
    def stats(self) -> QueueStats:
        """Counts across all servers of this queue."""

    def stats_by_server(self) -> dict[str, QueueStats]:
        """Counts per server (``server_for``'s names) this process reaches.
        Optional: this default reports ``stats()`` under the one name ``server_for`` gives."""
        return {self.server_for(""): self.stats()}

    def wake(self, channels: Sequence[str]) -> None:  # noqa: B027 - optional, no-op by default
        """Wake the listeners of these channels (``listen``): best effort, never
        raises for a channel whose listener is gone; a lost wake only makes a wait
        fall back to its periodic look.  Optional: this default wakes nobody."""

    def listen(self) -> Listener | None:
        """This thread's listener (made at its first call, kept for its next), or
        None: the backend cannot wake a waiting process, which then polls (the
        default)."""
        return None

    def uncounted(self) -> list[str]:
        """The servers whose jobs ``stats()`` leaves out now (down, set aside):
        jobs may wait there that no count shows, so an empty queue is not proof
        that nothing is queued.  Optional: this default says none."""
        return []


class Store(abc.ABC):
    """A shared key-value store.  Keys are ``str`` of at most 250 bytes once
    encoded (a backend may hash longer ones, consistently); values are ``bytes``
    (counters are ints).  Each single-key operation is atomic (linearizable);
    a *bulk* call is a sequence of single-key operations, not a transaction.
    ``ttl`` is seconds until the key expires (0: the backend's longest).

    *Tags.*  A key that contains ``{tag}`` (the text between its first ``{`` and
    the next ``}``) is placed by its tag alone: keys with one tag live together,
    on one server, chosen by the tag and the configured servers only (never by
    which of them are up), so every process agrees where they are.  A key
    without a tag is placed as the backend likes, and may move to another
    server while one is down (so it must be a key whose loss is survivable).
    packmule tags every key of a run generation with the generation."""

    #: The largest value one key holds, in bytes (None: no limit).  The engine
    #: stores larger values in chunks under several keys.
    max_value: int | None = None

    @abc.abstractmethod
    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        """The present keys with their values; absent keys are left out.
        Counters read back as their decimal ``bytes``."""

    def get_many_soon(self, keys: Sequence[str]) -> Callable[[], dict[str, bytes]]:
        """Start a ``get_many(keys)``; calling the returned function (once, at
        most) gives its result or raises its error, with the values as of some
        moment between the two calls.  A reader can so check one batch of values
        while the store fetches the next.  Optional: this default reads at once."""
        got = self.get_many(keys)
        return lambda: got

    @abc.abstractmethod
    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        """Store every item, overwriting."""

    def flush(self) -> None:
        """Return once every write made through this store has applied, so that
        any other connection, of this process or another, reads it.  A backend
        whose writes return only once applied need not override this no-op."""
        return None

    @abc.abstractmethod
    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        """Store each item only if its key is absent, atomically per key.
        Returns the keys this call added: among concurrent adds of one key,
        exactly one caller sees it in its result.  An int value makes a counter."""

    @abc.abstractmethod
    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        """Add each delta to its counter atomically and return the new values.  A
        negative delta subtracts, and a counter never goes below 0 (the engine
        subtracts only what it added, to take back a count).  A missing key is
        NOT created: its result is ``None`` (the engine reads that as lost
        state).  Among concurrent increments of one key each result is distinct
        and the last equals the sum."""

    @abc.abstractmethod
    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove the keys; absent ones are ignored."""

    def holder(self, tag: str) -> str | None:
        """The server that holds the keys tagged ``tag`` (None: one store, nothing to name)."""
        return None

    def placeable(self, tag: str) -> bool:
        """Whether keys tagged ``tag`` would live on a server this process sees up
        now: a new generation picks a tag that is (optional: always True)."""
        return True


class Registers(abc.ABC):
    """Small named values that every process reads alike, whichever servers it
    can reach, written by compare-and-set: a consensus service's (ZooKeeper's),
    for what a store spread over servers cannot agree on (which generation a run
    name is on now), or for what must not be lost (``Backend.ledger``).

    Names are non-empty ``str``; values ``bytes``.  ``ttl`` is seconds the value
    lives (0: the backend's longest, at least 30 days).  A value older than its
    ``ttl`` reads as absent, but its register stays until ``prune`` or a ``swap``
    with the token of that read removes it.  Each call is atomic (linearizable).
    A ``swap`` that raises (``BackendUnavailable``) may have written or not: a
    later read tells, if the value names its writer."""

    @abc.abstractmethod
    def read(self, name: str) -> tuple[bytes | None, Any]:
        """The value (None: absent or expired) and a token for ``swap``: None if
        no register of that name exists, else one that stands for its state as
        read (a register deleted and created again may give a token it gave before)."""

    @abc.abstractmethod
    def swap(self, name: str, token: Any, value: bytes | None, ttl: float) -> bool:
        """Write ``value`` (None: delete it) only if the register is as the read
        that gave ``token`` found it: compare-and-set; whether it was written.
        With ``token`` None it creates the register only if none exists (or,
        with ``value`` None, answers whether none exists): among concurrent
        creators of one name exactly one wins, and every other gets False and
        then reads the winner's value.  A failed swap changes nothing."""

    def prune(self) -> int:
        """Delete registers that have expired; how many.  (Every worker process
        calls it about hourly; optional: this default deletes none.)"""
        return 0


class Backend(abc.ABC):
    """A queue, a store and named locks, plus the secret that signs what they carry."""

    name: str  # e.g. 'local' or 'beanstalk'
    queue: Queue
    store: Store
    #: Where run names point to their generations when the store cannot agree
    #: on it (several servers, any of which may be down); None: in the store.
    registers: Registers | None = None
    #: Durable registers that outlive every worker process (create-if-absent,
    #: compare-and-set): where periodic schedules claim their ticks and keep each
    #: schedule's last one.  Not a cache: a value stays until it expires or is
    #: swapped away, never evicted.  None: this backend cannot run schedules.
    ledger: Registers | None = None

    @classmethod
    @abc.abstractmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        """Build the backend from ``PACKMULE_*`` variables (see ``packmule._core.config``).
        Connects lazily: an unreachable server fails at first use, naming it."""

    @abc.abstractmethod
    def secret(self) -> bytes:
        """The HMAC key shared by every process of this backend."""

    @abc.abstractmethod
    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        """A mutex shared by every process of the backend, held for the ``with``
        block and released when the block exits or the holder's process dies.
        Raises ``TimeoutError`` if not acquired within ``timeout`` seconds
        (``None``: wait forever) and ``BackendUnavailable`` if the lock service
        cannot be reached."""

    def for_thread(self) -> Backend:
        """The backend for another thread of this process to use while this one
        is busy in a call (a worker's beat).  Optional: this default returns the
        backend itself, for a backend whose calls are thread-safe and fair."""
        return self

    def server_states(self) -> list[ServerState]:
        """What this process knows of each server (none: the backend has no servers to watch)."""
        return []

    def ensure_workers(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Make sure something serves the queue, if this backend starts workers itself."""

    def close(self) -> None:  # noqa: B027 - optional hook, no-op by default
        """Release connections (and stop workers this backend started)."""

    def __getstate__(self) -> Any:
        raise TypeError("a backend is not serialized with a job; jobs find theirs from the environment")

