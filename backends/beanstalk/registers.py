"""Registers on ZooKeeper (``backends.base.Registers``): where a run name points
to its generation when the store is spread over several memcached servers
(``/packmule/registers``), and the ledger where schedules claim their ticks
(``/packmule/ledger``, ``Backend.ledger``).

Each register is a persistent znode ``<root>/<name>`` (the name quoted as a
lock's is) holding ``<expiry> <value>``, the expiry in Unix seconds.  A write is
ZooKeeper's compare-and-set: ``create`` for a register read as absent, ``set`` or
``delete`` with the version the read saw.  So among processes that race, or
that disagree about which memcached servers are up, one write wins, and every
process reads the same value.  It uses the locks' session (one per process); a
znode outlives the session that wrote it.

An expired register reads as absent and is overwritten by the next start of its
name; ``prune`` deletes expired ones (``packmule worker`` runs it now and then).
"""

from __future__ import annotations

import logging
import math
import time
from typing import Any

from ..base import Registers
from .locks import ZooKeeperLocks, node_name

log = logging.getLogger("packmule.backends.beanstalk")

REGISTER_ROOT = "/packmule/registers"  # the run-name pointers (Backend.registers)
LEDGER_ROOT = "/packmule/ledger"  # the schedules' ticks (Backend.ledger)
LONGEST = 30 * 24 * 3600  # s a register written with ttl 0 lives


class ZooKeeperRegisters(Registers):
    def __init__(self, locks: ZooKeeperLocks, root: str = REGISTER_ROOT) -> None:
        self.locks = locks
        self.root = root

    def _path(self, name: str) -> str:
        return f"{self.root}/{node_name(name)}"

    def read(self, name: str) -> tuple[bytes | None, Any]:
        from kazoo.exceptions import KazooException, NoNodeError  # (at first use: see locks.py)

        try:
            with self.locks.session() as client:
                data, stat = client.get(self._path(name))
        except NoNodeError:
            return None, None
        except KazooException as exc:
            raise self.locks._unavailable(exc) from exc
        value = _unexpired(data)
        return value, stat.version

    def swap(self, name: str, token: Any, value: bytes | None, ttl: float) -> bool:
        from kazoo.exceptions import BadVersionError, KazooException, NodeExistsError, NoNodeError

        path = self._path(name)
        # (whole seconds, rounded up: a short ttl never expires at once)
        data = b"%d %s" % (math.ceil(time.time() + (ttl or LONGEST)), value) if value is not None else b""
        try:
            with self.locks.session() as client:
                if token is None and value is None:
                    return client.exists(path) is None  # (nothing to delete: whether there is none)
                if token is None:
                    client.create(path, data, makepath=True)
                elif value is None:
                    client.delete(path, version=token)
                else:
                    client.set(path, data, version=token)
        except (NodeExistsError, BadVersionError, NoNodeError):
            return False
        except KazooException as exc:
            raise self.locks._unavailable(exc) from exc
        return True

    def prune(self, limit: int = 10_000) -> int:
        """Delete up to ``limit`` expired registers; how many were deleted."""
        from kazoo.exceptions import BadVersionError, KazooException, NoNodeError

        deleted = 0
        try:
            with self.locks.session() as client:
                for child in client.get_children(self.root)[:limit]:
                    path = f"{self.root}/{child}"
                    try:
                        data, stat = client.get(path)
                        if _unexpired(data) is None:
                            client.delete(path, version=stat.version)
                            deleted += 1
                    except (NoNodeError, BadVersionError):
                        continue
        except NoNodeError:
            return deleted
        except KazooException as exc:
            raise self.locks._unavailable(exc) from exc
        return deleted


def _unexpired(data: bytes) -> bytes | None:
    expiry, _, value = data.partition(b" ")
    try:
        return value if float(expiry) > time.time() else None
    except ValueError:
        return None
