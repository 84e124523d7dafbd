"""What the queue, the store and the locks share: where each server list came
from (for error messages), which of its servers this process has set aside
(``Health``), and connections kept per thread and per process."""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Generic, NamedTuple, Protocol, TypeVar

from packmule._core.config import split_servers
from packmule._core.errors import BackendUnavailable
from packmule._core.fork import forget_at_fork

from ..base import ServerState

log = logging.getLogger("packmule.backends.beanstalk")

FIRST_PROBE = 0.25  # s after a server is set aside that it is probed again; doubled after each failed probe
LAST_PROBE = 5.0  # s between probes at most


_LABEL = re.compile(r"[A-Za-z0-9_.-]{1,64}\Z")


class Servers(NamedTuple):
    """A server list and the setting that chose it, so errors can name both.

    Each entry is ``host:port`` or ``label=host:port``.  Where keys and jobs go
    is decided by each server's *id*, its label or else its ``host:port``: every
    process must list the same ids (in any order).  A label is for processes
    that reach one server at different addresses (NAT, containers, a proxy)."""

    addresses: list[tuple[str, int]]
    variable: str  # e.g. 'PACKMULE_BEANSTALKD'
    defaulted: bool  # the variable was not set: this is its default
    labels: tuple[str, ...] = ()  # per address: its label, or ''

    @classmethod
    def from_env(cls, env: Mapping[str, str], variable: str, default: str) -> Servers:
        raw = env.get(variable, "").strip()
        entries = [part.strip() for part in (raw or default).split(",") if part.strip()]
        labels = tuple(entry.partition("=")[0].strip() if "=" in entry else "" for entry in entries)
        for label in labels:
            if label and not _LABEL.match(label):
                raise ValueError(f"{variable}={raw!r}: the label {label!r} is not 1 to 64 of letters, digits "
                                 "and _ . - (write label=host:port)")
        addresses = split_servers(",".join(entry.rpartition("=")[2] for entry in entries), variable)
        servers = cls(addresses, variable, not raw, labels)
        if len(set(servers.ids)) != len(addresses):
            raise ValueError(f"{variable}={raw!r} lists one server twice; list each once")
        return servers

    @property
    def names(self) -> list[str]:
        return [f"{host}:{port}" for host, port in self.addresses]

    @property
    def ids(self) -> list[str]:
        """What placement hashes: each server's label, or its ``host:port``."""
        labels = self.labels or ("",) * len(self.addresses)
        return [label or name for label, name in zip(labels, self.names, strict=True)]

    def unavailable(self, service: str, server: str, problem: BaseException | str) -> BackendUnavailable:
        """The error for ``server`` (one of ours) failing, naming it and the variable."""
        if isinstance(problem, BaseException):
            problem = f"{type(problem).__name__}: {problem}" if str(problem) else type(problem).__name__
        chosen = f"{self.variable} is not set; {server} is its default" if self.defaulted else (
            f"chosen by {self.variable}={','.join(self.names)}")
        return BackendUnavailable(f"{service} at {server} is unavailable ({problem}); {chosen}", server=server)


class Health:
    """Which servers of a list this process has set aside, and when each came back.

    A caller that cannot reach a server (refused, timed out, cut off) reports it
    with ``set_aside``; from then on ``up`` says no, and the callers route
    around it where they can.  A thread of this process probes each server set
    aside (a connection and ``ping``, which must draw an answer) after
    FIRST_PROBE seconds, then at doubling intervals up to LAST_PROBE; the first
    probe answered brings the server back.  Each process has its own view:
    nothing that must be the same in every process may depend on it (the
    store places a run's state by a rule that does not, see ``store.py``).
    A fork child starts with its parent's view, and a prober of its own.
    """

    def __init__(self, servers: Servers, service: str, ping: bytes, connect_timeout: float) -> None:
        self.servers, self.service, self.ping = servers, service, ping
        self._connect_timeout = connect_timeout
        # index -> (wall time it was set aside, problem, next probe (monotonic), interval)
        self._aside: dict[int, tuple[float, str, float, float]] = {}
        self._back: dict[int, float] = {}  # index -> wall time it last came back
        self._forget_inherited()
        forget_at_fork(self)

    def _forget_inherited(self) -> None:
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._prober: threading.Thread | None = None

    def up(self, index: int) -> bool:
        return index not in self._aside

    def live(self) -> list[int]:
        """The indexes of the servers not set aside, in list order."""
        return [i for i in range(len(self.servers.addresses)) if i not in self._aside]

    def set_aside(self, index: int, problem: BaseException | str) -> None:
        if isinstance(problem, BaseException):
            problem = f"{type(problem).__name__}: {problem}" if str(problem) else type(problem).__name__
        with self._lock:
            if index in self._aside:
                return
            self._aside[index] = (time.time(), problem, time.monotonic() + FIRST_PROBE, FIRST_PROBE)
            if self._prober is None or not self._prober.is_alive():
                self._prober = threading.Thread(target=self._probe_loop, daemon=True,
                                                name=f"packmule-{self.service}-prober")
                self._prober.start()
        log.warning("%s at %s set aside (%s); probing it again from %.2fs on", self.service,
                    self.servers.names[index], problem, FIRST_PROBE)
        self._wake.set()

    def came_back(self, index: int) -> None:
        with self._lock:
            aside = self._aside.pop(index, None)
            if aside is None:
                return
            self._back[index] = time.time()
        log.warning("%s at %s is back (set aside %.1fs ago)", self.service, self.servers.names[index],
                    time.time() - aside[0])

    def unavailable(self, index: int) -> BackendUnavailable:
        """The error for an operation that needs server ``index``, which is set aside."""
        since, problem = self._aside.get(index, (time.time(), "set aside", 0.0, 0.0))[:2]
        return self.servers.unavailable(
            self.service, self.servers.names[index],
            f"set aside {time.time() - since:.1f}s ago after {problem}; probed again every {LAST_PROBE:g}s at most")

    def states(self) -> list[ServerState]:
        """What this process knows of each server now."""
        out = []
        with self._lock:
            for i, name in enumerate(self.servers.names):
                aside = self._aside.get(i)
                out.append(ServerState(self.service, name, "up" if aside is None else "aside",
                                       None if aside is None else aside[0], self._back.get(i),
                                       "" if aside is None else aside[1]))
        return out

    def probe(self, index: int) -> bool:
        """Whether server ``index`` accepts a connection and answers ``ping``."""
        try:
            with socket.create_connection(self.servers.addresses[index], timeout=self._connect_timeout) as sock:
                sock.settimeout(self._connect_timeout)
                sock.sendall(self.ping)
                return bool(sock.recv(64))
        except OSError:
            return False

    def _probe_loop(self) -> None:
        while True:
            with self._lock:
                if not self._aside:
                    self._prober = None
                    return
                now = time.monotonic()
                due = [i for i, (_, _, at, _) in self._aside.items() if at <= now]
                wait = min(at for _, _, at, _ in self._aside.values()) - now
            if not due:
                self._wake.wait(max(0.01, wait))
                self._wake.clear()
                continue
            for index in due:
                if self.probe(index):
                    self.came_back(index)
                    continue
                with self._lock:
                    if index in self._aside:
                        since, problem, _, interval = self._aside[index]
                        interval = min(interval * 2, LAST_PROBE)
                        self._aside[index] = (since, problem, time.monotonic() + interval, interval)


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

