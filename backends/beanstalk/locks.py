"""Named locks on ZooKeeper, through kazoo's Lock recipe.

One kazoo client (one ZooKeeper session) per process, started on first use.
A lock is an ephemeral sequential node under ``/packmule/locks/<name>``: when
its holder's process dies, ZooKeeper ends the session after ``SESSION_TIMEOUT``
and deletes the node, which frees the lock.  A child made by ``os.fork`` starts
a session of its own; it never touches (or releases) its parent's.

A connection blip shorter than the session timeout goes unnoticed: the session,
and the locks held, survive it.  When ZooKeeper stays out of reach that long,
the session has ended on the server side: the client is then stopped, every
waiting ``lock()`` raises ``BackendUnavailable``, and so does leaving a ``with``
block whose lock was lost.  The next ``lock()`` starts a new session.
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

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, LockTimeout, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState
from kazoo.recipe.lock import Lock

from packmule._core.fork import forget_at_fork

from ._pool import Servers

log = logging.getLogger("packmule.backends.beanstalk")

LOCK_ROOT = "/packmule/locks"
SESSION_TIMEOUT = 4.0  # s without news from a process before ZooKeeper ends its session and frees
#                        its locks (ZooKeeper clamps it to 2..20 ticks: 4 s with the default tickTime)

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
        self._forget_inherited(keep=False)
        forget_at_fork(self)

    def _forget_inherited(self, keep: bool = True) -> None:
        """(Also run in a fork child.)  Drop the parent's client without using it."""
        client = getattr(self, "_client", None) if keep else None
        if client is not None:
            atexit.unregister(client.handler.stop)  # its threads are not in this process
            _inherited.append(client)
        self._client: KazooClient | None = None
        self._watchdog: threading.Timer | None = None
        self._client_lock = threading.Lock()
        self._pid = os.getpid()

    def _unavailable(self, problem: BaseException | str) -> Exception:
        return self.servers.unavailable("ZooKeeper", self._hosts, problem)

    def _connected(self) -> KazooClient:
        """This process's client, started now if need be, once it is connected."""
        if self._pid != os.getpid():
            self._forget_inherited()
        with self._client_lock:
            if self._client is None:
                client = KazooClient(
                    hosts=self._hosts, timeout=self._session_timeout,
                    connection_retry={"max_tries": -1, "max_delay": 1.0},
                    command_retry={"max_tries": -1, "max_delay": 0.5, "deadline": self._session_timeout},
                )
                client.add_listener(lambda state: self._on_state(client, state))
                try:
                    client.start(timeout=self._connect_timeout)  # on failure it stops itself
                except KazooTimeoutError:
                    raise self._unavailable(f"no connection within {self._connect_timeout:g} s") from None
                self._client = client
            client = self._client
        deadline = time.monotonic() + self._connect_timeout
        while client.state != KazooState.CONNECTED:  # it reconnects by itself after a blip
            if time.monotonic() > deadline:
                raise self._unavailable(f"connection lost and not back within {self._connect_timeout:g} s")
            time.sleep(0.02)
        return client

    def _on_state(self, client: KazooClient, state: str) -> bool:
        """kazoo waits forever for a connection to come back, and so does any
        call made meanwhile (kazoo's Lock makes such calls).  Once the session
        timeout has passed without one, ZooKeeper has ended the session anyway:
        then stop the client, which fails every waiting call."""
        if client is not self._client:
            return False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        if state == KazooState.SUSPENDED:
            self._watchdog = threading.Timer(self._session_timeout, self._give_up, (client,))
            self._watchdog.daemon = True
            self._watchdog.start()
        elif state == KazooState.LOST:
            log.warning("the ZooKeeper session at %s ended: locks this process held are free for others",
                        self._hosts)
        return False  # stay registered

    def _give_up(self, client: KazooClient) -> None:
        if client.state != KazooState.CONNECTED:
            log.warning("no ZooKeeper at %s for %g s: ending this process's session (its locks are lost)",
                        self._hosts, self._session_timeout)
            self._end_session(client)

    def _end_session(self, client: KazooClient) -> None:
        """Stop ``client``: its session ends, so ZooKeeper frees every lock it held."""
        with self._client_lock:
            if self._client is client:
                self._client = None
        with contextlib.suppress(Exception):
            client.stop()
            client.close()

    @contextlib.contextmanager
    def lock(self, name: str, timeout: float | None) -> Iterator[None]:
        if timeout is not None and not timeout >= 0:
            raise ValueError(f"lock timeout must be None or seconds >= 0, not {timeout!r}")
        client = self._connected()
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
        if not got:  # kazoo gave up retrying a lost connection before the timeout
            self._clean_up(client, zlock)
            if client.state != KazooState.CONNECTED:
                raise self._unavailable("connection lost while waiting for the lock")
            raise TimeoutError(f"lock {name!r} not acquired within {timeout} s")
        owner = os.getpid()
        try:
            yield
        except BaseException:
            self._release(client, zlock, owner, quiet=True)
            raise
        self._release(client, zlock, owner, quiet=False)

    def _release(self, client: KazooClient, zlock: Lock, owner: int, quiet: bool) -> None:
        if os.getpid() != owner:
            return  # a fork child leaving the block: the lock is its parent's
        try:
            zlock.release()
        except Exception as exc:
            self._end_session(client)  # so that ZooKeeper frees the node by itself
            if not quiet:
                raise self._unavailable(exc) from exc

    def _clean_up(self, client: KazooClient, zlock: Lock) -> None:
        """Make sure no contender node of ours is left after a failed acquire
        (kazoo's own clean-up gives up silently when the connection drops; a
        node left behind would hold the lock for as long as this process
        lives).  If ZooKeeper cannot be asked, end the session instead."""
        try:
            if client.state != KazooState.CONNECTED:
                raise ConnectionError
            for child in client.get_children(zlock.path):
                if child.startswith(zlock.prefix):
                    client.delete(f"{zlock.path}/{child}")
        except NoNodeError:
            pass
        except Exception:
            self._end_session(client)

    def close(self) -> None:
        if self._pid != os.getpid():
            self._forget_inherited()
            return
        with self._client_lock:
            client, self._client = self._client, None
            watchdog, self._watchdog = self._watchdog, None
        if watchdog is not None:
            watchdog.cancel()
        if client is not None:
            client.stop()
            client.close()
