"""Named locks on ZooKeeper, through kazoo's Lock recipe.

A lock is an ephemeral sequential node under ``/packmule/locks/<name>``: when
its holder's process dies, ZooKeeper ends the session after ``SESSION_TIMEOUT``
and deletes the node, which frees the lock.  ``PACKMULE_ZOOKEEPER`` may list the
members of an ensemble: kazoo moves a session to another member when its own
dies, and the session, and its locks, survive that (and a new leader's
election) as long as a quorum is back within the session timeout of the
ensemble's last news from this process.

Each ``lock()`` call has a kazoo client (a session) of its own while it waits or
holds; a process keeps them, idle, for its next calls (so one session in all
for a process that takes one lock at a time).  A child made by ``os.fork``
starts sessions of its own; it never touches (or releases) its parent's.

A session that holds a lock is never ended by this module while its holder is
inside its ``with`` block, however long ZooKeeper stays out of reach: ending
it would free the lock while its holder is still inside (and a session that
could not be reached may well be alive: an ensemble that lost its quorum keeps
its sessions, with a fresh timeout, once it has one again).  A session that
only waits for a lock is ended once ZooKeeper has been out of reach for the
session timeout: its ``lock()`` raises ``BackendUnavailable``.  Leaving a
``with`` block raises ``BackendUnavailable`` when the lock was lost meanwhile
(the session expired: another process may have held it too) or cannot be
released within the session timeout (the session is then ended, which frees it).

What no lock service can do without fencing: a holder that cannot reach a
quorum for longer than the session timeout may have lost its lock while it
is still inside its block; it learns so when it leaves.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import socket
import threading
import time
import urllib.parse
from collections.abc import Iterator
from typing import TYPE_CHECKING

from packmule._core.fork import forget_at_fork

from ..base import ServerState
from ._members import MemberHealth
from ._pool import Servers

if TYPE_CHECKING:
    from kazoo.client import KazooClient
    from kazoo.recipe.lock import Lock

log = logging.getLogger("packmule.backends.beanstalk")

LOCK_ROOT = "/packmule/locks"
SESSION_TIMEOUT = 4.0  # s without news from a process before ZooKeeper ends its session and frees
#                        its locks (ZooKeeper clamps it to 2..20 ticks: 4 s with the default tickTime)

# kazoo's session states (``kazoo.protocol.states.KazooState``, plain strings): kazoo itself is
# imported only when a lock or register is first used, not by every worker process that never takes one
CONNECTED, SUSPENDED, LOST = "CONNECTED", "SUSPENDED", "LOST"
IDLE, WAITING, HELD = "idle", "waiting", "held"  # what a session of this process does now
MAX_IDLE = 4  # sessions kept open for the next locks; more, needed at once by many threads, are ended

_inherited: list[KazooClient] = []  # clients a fork child got from its parent: never used, kept
#                                     referenced so that collecting them closes nothing


def node_name(name: str) -> str:
    """The lock's znode name: ``name`` percent-quoted (``/`` and ``.``/``..`` cannot be znodes)."""
    if not name:
        raise ValueError("a lock needs a non-empty name")
    node = urllib.parse.quote(name, safe="")
    return node.replace(".", "%2E") if node in (".", "..") else node


class ZooKeeperLocks:
    def __init__(
        self, servers: Servers, connect_timeout: float, session_timeout: float = SESSION_TIMEOUT,
    ) -> None:
        self.servers = servers
        self._hosts = ",".join(servers.names)
        self._connect_timeout, self._session_timeout = connect_timeout, session_timeout
        self.health = MemberHealth(servers, connect_timeout)
        self._start_afresh()
        forget_at_fork(self)

    def _start_afresh(self) -> None:
        self._sessions: dict[KazooClient, str] = {}  # this process's clients: IDLE, WAITING or HELD
        self._watchdogs: dict[KazooClient, threading.Timer] = {}
        self._client_lock = threading.Lock()
        self._pid = os.getpid()

    def _forget_inherited(self) -> None:
        """(Run in a fork child.)  Drop the parent's clients without using them."""
        for client in self._sessions:
            atexit.unregister(client.handler.stop)  # its threads are not in this process
            _inherited.append(client)
        self._start_afresh()

    def _unavailable(self, problem: BaseException | str) -> Exception:
        return self.servers.unavailable("ZooKeeper", self._hosts, problem)

    def server_states(self) -> list[ServerState]:
        """Each member's state, every member that looks up probed first."""
        return self.health.server_states()

    # --- sessions --------------------------------------------------------------------------
    def _session(self) -> KazooClient:
        """A connected client of this process's that no other ``lock()`` uses, now WAITING."""
        if self._pid != os.getpid():
            self._forget_inherited()
        with self._client_lock:
            idle = [client for client, use in self._sessions.items() if use == IDLE]
            client = next((c for c in idle if c.state == CONNECTED), idle[0] if idle else None)
            if client is not None:
                self._sessions[client] = WAITING
        if client is None:
            return self._new_session()
        deadline = time.monotonic() + self._connect_timeout
        while client.state != CONNECTED:  # it reconnects by itself after a blip
            if time.monotonic() > deadline or client not in self._sessions:
                self._done_with(client)
                raise self._unavailable(f"connection lost and not back within {self._connect_timeout:g} s")
            time.sleep(0.02)
        return client

    @contextlib.contextmanager
    def session(self) -> Iterator[KazooClient]:
        """A connected session for a few plain calls (the registers'), IDLE again after."""
        client = self._session()
        try:
            yield client
        finally:
            self._done_with(client)

    def _new_session(self) -> KazooClient:
        # (here, not at the top: kazoo's client, its handlers and recipes are about 1.7 MiB that a process which
        # never takes a lock - most worker processes, most of the time - need not load)
        from kazoo.client import KazooClient
        from kazoo.handlers.threading import KazooTimeoutError

        client = KazooClient(
            hosts=self._hosts, timeout=self._session_timeout,
            connection_retry={"max_tries": -1, "max_delay": 1.0},
            command_retry={"max_tries": -1, "max_delay": 0.5, "deadline": self._session_timeout},
        )
        client.add_listener(lambda state: self._on_state(client, state))
        with self._client_lock:
            self._sessions[client] = WAITING
        try:
            client.start(timeout=self._connect_timeout)  # on failure it stops itself
        except KazooTimeoutError:
            self._retire(client)
            raise self._unavailable(f"no connection within {self._connect_timeout:g} s") from None
        return client

    def _on_state(self, client: KazooClient, state: str) -> bool:
        """kazoo waits forever for a connection to come back, and so does any
        call made meanwhile (kazoo's Lock makes such calls): a watchdog ends a
        waiting session that stays SUSPENDED for the session timeout."""
        with self._client_lock:
            if client not in self._sessions:
                return True  # retired: unregister
            watchdog = self._watchdogs.pop(client, None)
            if state == SUSPENDED:
                self._watchdogs[client] = timer = threading.Timer(self._session_timeout, self._give_up, (client,))
                timer.daemon = True
                timer.start()
            lost_held = state == LOST and self._sessions[client] == HELD
        if watchdog is not None:
            watchdog.cancel()
        if lost_held:
            log.warning("the ZooKeeper session at %s that held a lock ended: the lock is free for others, and "
                        "its holder gets BackendUnavailable when it leaves its block", self._hosts)
        return False  # stay registered

    def _give_up(self, client: KazooClient) -> None:
        """End a session that has been out of reach for the session timeout,
        unless it holds a lock (its holder's leaving decides, see ``_release``).
        Whatever it does is decided under the lock that ``_hold`` takes, so a
        lock acquired meanwhile is never entered with an ended session."""
        with self._client_lock:
            if client.state == CONNECTED or self._sessions.get(client) in (None, HELD):
                return
            del self._sessions[client]
            self._watchdogs.pop(client, None)
        log.warning("no ZooKeeper at %s for %g s: ending a session that waits for a lock",
                    self._hosts, self._session_timeout)
        self._stop(client)

    def _hold(self, client: KazooClient) -> bool:
        """Mark ``client`` HELD (its lock acquired), unless it was given up meanwhile."""
        with self._client_lock:
            if self._sessions.get(client) != WAITING:
                return False
            self._sessions[client] = HELD
            return True

    def _done_with(self, client: KazooClient) -> None:
        """``client`` is IDLE again, or ended if MAX_IDLE others already are."""
        with self._client_lock:
            if client not in self._sessions:
                return
            if sum(use == IDLE for use in self._sessions.values()) < MAX_IDLE:
                self._sessions[client] = IDLE
                return
        self._retire(client)

    def _retire(self, client: KazooClient) -> None:
        """End ``client``'s session: ZooKeeper frees every node it has."""
        with self._client_lock:
            self._sessions.pop(client, None)
            watchdog = self._watchdogs.pop(client, None)
        if watchdog is not None:
            watchdog.cancel()
        self._stop(client)

    @staticmethod
    def _stop(client: KazooClient) -> None:
        with contextlib.suppress(Exception):
            client.stop()
            client.close()

    # --- locks -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, name: str, timeout: float | None) -> Iterator[None]:
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"lock timeout must be None or seconds >= 0, not {timeout!r}")
        from kazoo.exceptions import KazooException, LockTimeout
        from kazoo.recipe.lock import Lock

        client = self._session()
        zlock = Lock(client, f"{LOCK_ROOT}/{node_name(name)}", f"{socket.gethostname()}:{os.getpid()}")
        try:
            got = zlock.acquire(timeout=timeout)
        except LockTimeout:
            self._clean_up(client, zlock)
            raise TimeoutError(f"lock {name!r} not acquired within {timeout} s") from None
        except KazooException as exc:
            self._clean_up(client, zlock)
            raise self._unavailable(exc) from exc
        except BaseException:
            self._clean_up(client, zlock)
            raise
        if not got or not self._hold(client):  # kazoo gave up retrying, or the session was given up
            connected = got is False and client.state == CONNECTED
            self._clean_up(client, zlock)
            if connected:
                raise TimeoutError(f"lock {name!r} not acquired within {timeout} s")
            raise self._unavailable("connection lost while waiting for the lock")
        held = (os.getpid(), client.client_id)
        try:
            yield
        except BaseException:
            self._release(client, zlock, held, quiet=True)
            raise
        self._release(client, zlock, held, quiet=False)

    def _release(self, client: KazooClient, zlock: Lock, held: tuple[int, object], quiet: bool) -> None:
        """Delete the lock's node.  Gone with the session it was made in: the
        lock was lost while held (raise).  Not deleted within the session
        timeout: end the session, which frees it (raise)."""
        owner, session = held
        if os.getpid() != owner:
            return  # a fork child leaving the block: the lock is its parent's
        problem = self._delete(client, f"{zlock.path}/{zlock.node}", session)
        if problem is None or isinstance(problem, str):
            self._done_with(client)
        else:
            self._retire(client)
        if problem is not None:
            log.warning("lock %s not released cleanly: %s", zlock.path, problem)
            if not quiet:
                raise self._unavailable(problem)

    def _delete(self, client: KazooClient, path: str, session: object) -> BaseException | str | None:
        """Delete a held lock's node, retrying a lost connection (kazoo moves the
        session to another member) for up to the session timeout."""
        from kazoo.exceptions import ConnectionLoss, NoNodeError

        deadline = time.monotonic() + self._session_timeout
        while True:
            try:
                client.delete_async(path).get(timeout=max(0.0, deadline - time.monotonic()))
                return None
            except NoNodeError:
                if client.client_id == session:
                    return None  # the same session: a try cut short by a lost connection deleted it
                return ("the lock was lost while held: its session expired (ZooKeeper out of reach for the "
                        f"{self._session_timeout:g} s session timeout), so another process may have held it too")
            except Exception as exc:
                if not isinstance(exc, ConnectionLoss) or time.monotonic() >= deadline:
                    return exc
                time.sleep(0.05)

    def _clean_up(self, client: KazooClient, zlock: Lock) -> None:
        """Make sure no contender node of ours is left after a failed acquire
        (kazoo's own clean-up gives up silently when the connection drops; a
        node left behind would hold the lock for as long as this process
        lives).  If ZooKeeper cannot be asked, end the session (it holds no
        lock: a session serves one ``lock()`` at a time)."""
        from kazoo.exceptions import NoNodeError

        try:
            if client.state != CONNECTED:
                raise ConnectionError
            for child in client.retry(client.get_children, zlock.path):
                if child.startswith(zlock.prefix):
                    client.retry(client.delete, f"{zlock.path}/{child}")
        except NoNodeError:
            pass
        except Exception:
            self._retire(client)
            return
        self._done_with(client)

    def close(self) -> None:
        if self._pid != os.getpid():
            self._forget_inherited()
            return
        with self._client_lock:
            clients, self._sessions = list(self._sessions), {}
            watchdogs, self._watchdogs = list(self._watchdogs.values()), {}
        for watchdog in watchdogs:
            watchdog.cancel()
        for client in clients:
            self._stop(client)
