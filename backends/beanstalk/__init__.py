"""The ``beanstalk`` backend: a cluster's queue, store and locks on servers.

=========  =========================  ==========================================
service    servers (variable)          module
=========  =========================  ==========================================
queue      beanstalkd (PACKMULE_BEANSTALKD, tube PACKMULE_TUBE)   ``queue.py``
store      memcached (PACKMULE_MEMCACHED)                          ``store.py``
locks      ZooKeeper (PACKMULE_ZOOKEEPER)                          ``locks.py``
registers  ZooKeeper, with several memcached servers only          ``registers.py``
ledger     ZooKeeper (``/packmule/ledger``), always                ``registers.py``
=========  =========================  ==========================================

Nothing connects until first use; then each thread of each process has its own
connections (one ZooKeeper session per process), an error closes the
connection it happened on (the next call reconnects), and every greenstalk,
memcached, kazoo or socket error leaves as ``packmule.BackendUnavailable``
naming the server and the variable that chose it.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Mapping

from ..base import Backend, ServerState
from ._pool import Servers
from .locks import ZooKeeperLocks
from .queue import BeanstalkQueue
from .registers import LEDGER_ROOT, ZooKeeperRegisters
from .store import MemcachedStore

__all__ = ["BeanstalkBackend"]

log = logging.getLogger("packmule.backends.beanstalk")

DEFAULT_BEANSTALKD = "127.0.0.1:11300"
DEFAULT_MEMCACHED = "127.0.0.1:11211"
DEFAULT_ZOOKEEPER = "127.0.0.1:2181"
DEFAULT_TUBE = "packmule"
CONNECT_TIMEOUT = 5.0  # s to connect to a server before it counts as unavailable
INSECURE_SECRET = b"packmule-insecure-well-known-key"  # PACKMULE_INSECURE=1 without a secret: public!
_TUBE_NAME = re.compile(r"[A-Za-z0-9+/;.$_()][A-Za-z0-9+/;.$_()-]{0,199}")  # beanstalkd's rule

_warned_insecure = False


class BeanstalkBackend(Backend):
    name = "beanstalk"
    queue: BeanstalkQueue
    store: MemcachedStore
    ledger: ZooKeeperRegisters

    def __init__(
        self, beanstalkd: Servers, memcached: Servers, zookeeper: Servers, *, secret: bytes,
        tube: str = DEFAULT_TUBE, connect_timeout: float = CONNECT_TIMEOUT, pipeline: bool = True,
    ) -> None:
        if not _TUBE_NAME.fullmatch(tube):
            raise ValueError(f"PACKMULE_TUBE={tube!r} is not a beanstalkd tube name (1 to 200 of letters, "
                             f"digits and + / ; . $ _ ( ) -, not starting with -)")
        if not secret:
            raise ValueError("the secret must not be empty")
        self._secret = secret
        self.tube = tube
        self.queue = BeanstalkQueue(beanstalkd, tube, connect_timeout, pipeline)
        self.store = MemcachedStore(memcached, connect_timeout)
        self.locks = ZooKeeperLocks(zookeeper, connect_timeout)
        # several memcached servers cannot agree which generation a run name is
        # on while one is down for some processes only: ZooKeeper says it
        self.registers = ZooKeeperRegisters(self.locks) if len(memcached.addresses) > 1 else None
        # schedules' ticks: durable (memcached's add evicts; a znode stays)
        self.ledger = ZooKeeperRegisters(self.locks, root=LEDGER_ROOT)

    @classmethod
    def from_env(cls, env: Mapping[str, str], connect_timeout: float = CONNECT_TIMEOUT) -> BeanstalkBackend:
        return cls(
            Servers.from_env(env, "PACKMULE_BEANSTALKD", DEFAULT_BEANSTALKD),
            Servers.from_env(env, "PACKMULE_MEMCACHED", DEFAULT_MEMCACHED),
            Servers.from_env(env, "PACKMULE_ZOOKEEPER", DEFAULT_ZOOKEEPER),
            secret=_secret_from_env(env),
            tube=env.get("PACKMULE_TUBE", "").strip() or DEFAULT_TUBE,
            connect_timeout=connect_timeout,
        )

    def secret(self) -> bytes:
        return self._secret

    @property
    def worker_hint(self) -> str:
        """What a wait that finds no worker tells the user to do."""
        return (f"start one with `packmule worker` on a machine whose PACKMULE_BEANSTALKD is "
                f"{','.join(self.queue.servers.names)} and PACKMULE_TUBE is {self.tube}")

    def server_states(self) -> list[ServerState]:
        """Each server's state as this process sees it, every server that looks
        up probed first (a connection and a command that must draw an answer)."""
        out = []
        for health in (self.queue.health, self.store.health):
            for index in health.live():
                if not health.probe(index):
                    health.set_aside(index, "it did not answer a probe")
            out += health.states()
        return out + self.locks.server_states()

    def lock(self, name: str, timeout: float | None) -> contextlib.AbstractContextManager[None]:
        return self.locks.lock(name, timeout)

    def close(self) -> None:
        self.queue.close()
        self.store.close()
        self.locks.close()

    def __repr__(self) -> str:
        servers = {"beanstalkd": self.queue.servers, "memcached": self.store.servers,
                   "zookeeper": self.locks.servers}
        listed = " ".join(f"{kind}={','.join(s.names)}" for kind, s in servers.items())
        return f"<BeanstalkBackend tube={self.tube!r} {listed}>"


def _secret_from_env(env: Mapping[str, str]) -> bytes:
    global _warned_insecure
    secret = env.get("PACKMULE_SECRET", "")
    if secret:
        return secret.encode("utf-8")
    if env.get("PACKMULE_INSECURE", "").strip().lower() not in ("1", "true", "yes"):
        raise ValueError(
            "the beanstalk backend signs every job and stored value, and needs a secret shared by "
            "every process: set PACKMULE_SECRET to the same long random string on every machine "
            "(e.g. the output of: python -c 'import secrets; print(secrets.token_hex(32))'), "
            "or set PACKMULE_INSECURE=1 if only trusted machines can reach the servers"
        )
    if not _warned_insecure:
        _warned_insecure = True
        log.warning("PACKMULE_INSECURE=1 and no PACKMULE_SECRET: jobs are signed with a well-known key, "
                    "so anyone who can reach beanstalkd or memcached can run code on the workers")
    return INSECURE_SECRET
