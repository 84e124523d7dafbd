"""A client of the local coordinator: how every process but the coordinator -
the one that started it, the workers, any process a job starts, a fork child of
any of them - reaches the queue and the store, over the coordinator's Unix
socket; and the named locks, files in the coordinator's directory."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import secrets
import threading
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from multiprocessing.connection import Client, Connection
from typing import Any, ClassVar

from packmule.backends.base import Backend, Listener, Put, Queue, QueueStats, Reserved, Store
from packmule.backends.local.core import receive, send
from packmule.backends.local.ledger import LocalLedger

from packmule._core.errors import BackendUnavailable
from packmule._core.fork import forget_at_fork

ADDRESS_VAR, SECRET_VAR = "PACKMULE_LOCAL_ADDRESS", "PACKMULE_LOCAL_SECRET"
MAX_UNANSWERED = 64  # requests a client posts before it reads their answers
CONNECT_TIMEOUT = 30.0  # s a client waits for the coordinator to take its connection and check its secret


def _lock(lock_dir: str, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
    path = os.path.join(lock_dir, hashlib.sha1(name.encode()).hexdigest() + ".lock")
    return _filelock(path, name, timeout)


@contextlib.contextmanager
def _filelock(path: str, name: str, timeout: float | None) -> Iterator[None]:
    import filelock  # (here: only jobs that lock pay for its import)

    lock = filelock.FileLock(path, timeout=-1 if timeout is None else timeout, thread_local=False)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise TimeoutError(f"lock {name!r} not acquired within {timeout}s") from None
    owner = os.getpid()
    try:
        yield
    finally:
        if os.getpid() == owner:  # (a fork child leaving the block: the lock, on a shared descriptor, is its parent's)
            lock.release()

class _Answer:
    """The answer to a request that was sent without waiting for it."""

    __slots__ = ("kind", "value")

    def __init__(self) -> None:
        self.kind: str | None = None  # 'ok' | 'err' once read
        self.value: Any = None


def _connect(address: str, secret: bytes, timeout: float) -> Any:
    """``Client(address, authkey=secret)``, but within ``timeout`` seconds: its
    handshake has no time limit of its own, and a coordinator that takes the
    connection and never answers must not hang this process silently."""
    outcome: list[Any] = []

    def attempt() -> None:
        try:
            outcome.append(Client(address, family="AF_UNIX", authkey=secret))
        except BaseException as exc:  # handed to the caller
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True, name="packmule-connect")
    thread.start()
    thread.join(timeout)
    if not outcome:
        raise TimeoutError(f"it took the connection but did not answer the secret's handshake within {timeout}s "
                           "(stopped or overloaded?)")
    if isinstance(outcome[0], BaseException):
        raise outcome[0]
    return outcome[0]


class LocalClient(Backend):
    """The backend as any process but the coordinator reaches it: over the socket.

    The coordinator handles a connection's requests one at a time, in order, and
    answers each in that order; so a client need not wait for an answer before
    it sends its next request, and every later request of this process sees the
    effect of the earlier ones.  A request whose answer is only "done" (put, ack,
    release, bury, touch, set, delete) is *posted*: its answer is read with the
    answer of a later request, and a failure it reports is raised there.  A
    worker thus does not sit idle for a round trip per call, and its store
    writes, then its puts, then its acks, still apply in that order.  A
    ``get_many_soon`` read is answered while its caller works on."""

    name = "local"
    _conn: Connection | None

    def __init__(self, address: str, secret: bytes, role: str = "client") -> None:
        self.address, self._secret, self._role = address, secret, role
        self._forget_inherited()
        self._conn, server = self._open()
        self.queue = _ClientQueue(self, server)
        self.store = _ClientStore(self)
        self.ledger = LocalLedger(self)  # (in the coordinator: it outlives every worker)
        forget_at_fork(self)

    def _forget_inherited(self) -> None:
        """A connection of this process is its alone: in a fork child (also run
        there) the parent's is forgotten - this process's copy of its descriptor
        closed, nothing sent on it, its unread answers left to the parent - and
        the child's first request opens one of its own, as a plain client (a
        worker's child is no worker)."""
        conn: Connection | None = getattr(self, "_conn", None)
        if conn is not None:
            self._role = "client"
        self.pid = os.getpid()
        self._lock = threading.Lock()
        self._conn = None  # (None only in a fork child, until its first request)
        # requests sent whose answers are not read yet, oldest first; None for a posted one
        self._unanswered: deque[_Answer | None] = deque()
        self._failure: BaseException | None = None  # the first failure of a posted request, not raised yet
        if conn is not None:
            conn.close()

    def _open(self) -> tuple[Connection, str]:
        """A new connection to the coordinator, and the name it gives its queue."""
        try:
            conn = _connect(self.address, self._secret, CONNECT_TIMEOUT)
        except (OSError, EOFError) as exc:
            raise BackendUnavailable(
                f"local coordinator at {self.address} (from {ADDRESS_VAR}) is not reachable: {exc}; "
                "the process that started it has ended") from exc
        try:
            send(conn, ("hello", (self._role,)))
            kind, server = receive(conn)
        except (OSError, EOFError) as exc:
            conn.close()
            raise self._gone(exc) from exc
        if kind == "err":
            conn.close()
            raise server
        return conn, server

    def _connection(self) -> Connection:
        """(Under the lock.)  This process's connection, opened now in a fork child."""
        if self._conn is None:
            self._conn = self._open()[0]
        return self._conn

    # LocalBackend, set by the package (which imports this module): whose from_env a client's is
    owner: ClassVar[type[Backend]]

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Backend:
        return LocalClient.owner.from_env(env)

    def _call(self, op: str, *args: Any) -> Any:
        """Send a request and wait for its answer."""
        with self._lock:
            conn = self._connection()
            try:
                send(conn, (op, args))
                while self._unanswered:
                    self._read_answer()
                kind, value = receive(conn)
            except (OSError, EOFError) as exc:
                raise self._gone(exc) from exc
            self._raise_failure()
        if kind == "err":
            raise value
        return value

    def _post(self, op: str, *args: Any) -> None:
        """Send a request whose answer is only "done", without waiting for it."""
        with self._lock:
            conn = self._connection()
            try:
                send(conn, (op, args))
                self._unanswered.append(None)
                while len(self._unanswered) >= MAX_UNANSWERED:
                    self._read_answer()
            except (OSError, EOFError) as exc:
                raise self._gone(exc) from exc
            self._raise_failure()

    def _start(self, op: str, *args: Any) -> Callable[[], Any]:
        """Send a request; the returned function waits for its answer."""
        answer = _Answer()
        with self._lock:
            conn = self._connection()
            try:
                send(conn, (op, args))
            except (OSError, EOFError) as exc:
                raise self._gone(exc) from exc
            self._unanswered.append(answer)

        def result() -> Any:
            with self._lock:
                if answer.kind is None and self._conn is not conn:  # (asked before a fork: the parent's)
                    raise BackendUnavailable(f"a request to the local coordinator at {self.address} was sent "
                                             "on the connection of the process this one was forked from")
                try:
                    while answer.kind is None:
                        self._read_answer()
                except (OSError, EOFError) as exc:
                    raise self._gone(exc) from exc
            if answer.kind == "err":
                raise answer.value
            return answer.value

        return result

    def _read_answer(self) -> None:
        """(Under the lock, connected.)  Read the answer to the oldest request not waited for."""
        assert self._conn is not None
        kind, value = receive(self._conn)
        answer = self._unanswered.popleft()
        if answer is not None:
            answer.kind, answer.value = kind, value
        elif kind == "err" and self._failure is None:
            self._failure = value

    def _raise_failure(self) -> None:
        failure, self._failure = self._failure, None
        if failure is not None:
            raise failure

    def _gone(self, exc: BaseException) -> BackendUnavailable:
        return BackendUnavailable(f"local coordinator at {self.address} (from {ADDRESS_VAR}) went away: {exc!r}")

    def secret(self) -> bytes:
        return self._secret

    def for_thread(self) -> Backend:
        """A connection of its own: a thread sharing this one could wait long for its
        lock (held through each blocking reserve), and could be handed the failure
        of a request another thread posted."""
        return LocalClient(self.address, self._secret)

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return _lock(os.path.dirname(self.address), name, timeout)

    def close(self) -> None:
        with self._lock:
            if self._conn is None:  # (a fork child that never used it)
                return
            with contextlib.suppress(OSError, EOFError):
                while self._unanswered:  # (what was sent applies anyway; this only waits for it)
                    self._read_answer()
            self._conn.close()


class _Listener(Listener):
    """A channel on the coordinator, waited on over a connection of its own (a
    wait blocks its connection)."""

    def __init__(self, client: LocalClient) -> None:
        self.pid = os.getpid()
        self.channel = f"{self.pid}.{next(_channels)}.{secrets.token_hex(4)}"
        self.c = LocalClient(client.address, client._secret, "listener")
        self.c._call("listen", self.channel)

    def wait(self, timeout: float) -> bool:
        return bool(self.c._call("listen_wait", self.channel, max(0.0, timeout)))

    def close(self) -> None:
        self.c.close()  # (the coordinator drops the channel with the connection)


_channels = itertools.count(1)


class _ClientQueue(Queue):
    def __init__(self, client: LocalClient, server: str) -> None:
        self.c, self.server = client, server
        self._mine = threading.local()  # this thread's listener

    def server_for(self, shard: str) -> str:
        return self.server

    def put_many(self, jobs: Sequence[Put], elsewhere: Callable[[Sequence[Put]], None] | None = None) -> None:
        self.c._post("put_many", list(jobs))

    def reserve_many(self, max_count: int, timeout: float) -> list[Reserved]:
        return [Reserved(*r) for r in self.c._call("reserve_many", max_count, timeout)]

    def ack_many(self, handles: Sequence[Any]) -> None:
        self.c._post("ack_many", list(handles))

    def release(self, handle: Any, delay: float) -> None:
        self.c._post("release", handle, delay)

    def bury(self, handle: Any) -> None:
        self.c._post("bury", handle)

    def touch(self, handle: Any) -> None:
        self.c._post("touch", handle)

    def stats(self) -> QueueStats:
        return QueueStats(*self.c._call("stats"))

    def wake(self, channels: Sequence[str]) -> None:
        self.c._post("wake", list(channels))

    def listen(self) -> Listener:
        listener: _Listener | None = getattr(self._mine, "listener", None)
        if listener is None or listener.pid != os.getpid():  # (a fork child listens on a channel of its own)
            listener = self._mine.listener = _Listener(self.c)
        return listener


class _ClientStore(Store):
    def __init__(self, client: LocalClient) -> None:
        self.c = client

    def get_many(self, keys: Sequence[str]) -> dict[str, bytes]:
        keys = list(keys)
        return _present(keys, self.c._call("get_list", keys))

    def get_many_soon(self, keys: Sequence[str]) -> Callable[[], dict[str, bytes]]:
        keys = list(keys)
        answer = self.c._start("get_list", keys)
        return lambda: _present(keys, answer())

    def set_many(self, items: Mapping[str, bytes], ttl: float) -> None:
        self.c._post("set_many", dict(items), ttl)

    def add_many(self, items: Mapping[str, bytes | int], ttl: float) -> set[str]:
        refused = self.c._call("add_refused", dict(items), ttl)  # usually none: not every key sent back
        return set(items).difference(refused)

    def incr_many(self, deltas: Mapping[str, int]) -> dict[str, int | None]:
        return self.c._call("incr_many", dict(deltas))  # type: ignore[no-any-return]

    def delete_many(self, keys: Sequence[str]) -> None:
        self.c._post("delete_many", list(keys))

    def flush(self) -> None:
        self.c._call("get_list", [])  # (answered after every request posted before it)


def _present(keys: list[str], values: list[bytes | None]) -> dict[str, bytes]:
    """A get_many result from the coordinator's answer: a value (or None) per key."""
    return {key: value for key, value in zip(keys, values, strict=True) if value is not None}


