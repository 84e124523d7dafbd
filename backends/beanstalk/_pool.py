"""What the queue, the store and the locks share: where each server list came
from (for error messages), and connections kept per thread and per process."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Mapping
from typing import Generic, NamedTuple, Protocol, TypeVar

from packmule._core.config import split_servers
from packmule._core.errors import BackendUnavailable
from packmule._core.fork import forget_at_fork


class Servers(NamedTuple):
    """A server list and the setting that chose it, so errors can name both."""

    addresses: list[tuple[str, int]]
    variable: str  # e.g. 'PACKMULE_BEANSTALKD'
    defaulted: bool  # the variable was not set: this is its default

    @classmethod
    def from_env(cls, env: Mapping[str, str], variable: str, default: str) -> Servers:
        raw = env.get(variable, "").strip()
        return cls(split_servers(raw or default, variable), variable, not raw)

    @property
    def names(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self.addresses]

    def unavailable(self, service: str, server: str, problem: BaseException | str) -> BackendUnavailable:
        """The error for ``server`` (one of ours) failing, naming it and the variable."""
        if isinstance(problem, BaseException):
            problem = f"{type(problem).__name__}: {problem}" if str(problem) else type(problem).__name__
        chosen = f"{self.variable} is not set; {server} is its default" if self.defaulted else (
            f"chosen by {self.variable}={','.join(self.names)}")
        return BackendUnavailable(f"{service} at {server} is unavailable ({problem}); {chosen}")


class Closable(Protocol):
    def close(self) -> None: ...


C = TypeVar("C", bound=Closable)


class ThreadConnections(Generic[C]):
    """One connection per server index per thread, made on first use by ``connect``.

    A connection is only ever used by the thread that made it (or under a lock
    of its own).  When a thread that used connections has ended, they are closed
    as soon as another thread makes its first.  In a child process after
    ``os.fork`` every inherited connection is closed (the child's copy of the
    socket only: nothing is sent, the parent's connection is untouched) and the
    child makes its own.
    """

    def __init__(self, connect: Callable[[int], C], usable: Callable[[C], bool] = lambda conn: True) -> None:
        self._connect, self._usable = connect, usable
        self._reset()
        forget_at_fork(self)

    def _reset(self) -> None:
        self._pid = os.getpid()
        self._lock = threading.Lock()
        self._local = threading.local()
        self._threads: dict[int, tuple[threading.Thread, dict[int, C]]] = {}

    def get(self, index: int) -> C:
        """This thread's connection to server ``index``, made now if it has none
        (or its last one became unusable)."""
        conns = self._mine()
        conn = conns.get(index)
        if conn is None or not self._usable(conn):
            conn = conns[index] = self._connect(index)
        return conn

    def drop(self, index: int, conn: C) -> None:
        """Close ``conn`` (after an error); this thread's next ``get`` reconnects."""
        conns = self._mine()
        if conns.get(index) is conn:
            del conns[index]
        conn.close()

    def close_all(self) -> None:
        with self._lock:
            everyone = [conns for _, conns in self._threads.values()]
        for conns in everyone:
            for conn in list(conns.values()):
                conn.close()
            conns.clear()

    def _mine(self) -> dict[int, C]:
        if self._pid != os.getpid():  # a fork that skipped the at-fork hook
            self._forget_inherited()
        conns: dict[int, C] | None = getattr(self._local, "conns", None)
        if conns is not None:
            return conns
        conns = self._local.conns = {}
        with self._lock:
            ended = [ident for ident, (thread, _) in self._threads.items() if not thread.is_alive()]
            leftovers = [self._threads.pop(ident)[1] for ident in ended]
            self._threads[threading.get_ident()] = (threading.current_thread(), conns)
        for old in leftovers:
            for conn in old.values():
                conn.close()
        return conns

    def _forget_inherited(self) -> None:
        inherited = [conn for _, conns in self._threads.values() for conn in conns.values()]
        self._reset()
        for conn in inherited:
            conn.close()

