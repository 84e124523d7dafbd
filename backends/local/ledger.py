"""The local backend's ledger (``Backend.ledger``, a ``backends.base.Registers``):
durable registers where schedules claim their ticks.

:class:`Ledger` holds them in the coordinator's memory (``core.py`` answers the
``ledger_*`` requests with it), so they live as long as the local backend does,
whichever worker or job process wrote them; :class:`LocalLedger` is how every
process reaches them, over its connection to the coordinator (``client.py``).

The token of a register is the number of the write that made its value, from
one counter for the whole ledger: a register deleted and created again never
gives a token it gave before.
"""

from __future__ import annotations

import itertools
import threading
import time
from typing import TYPE_CHECKING, Any

from packmule.backends.base import Registers

if TYPE_CHECKING:
    from packmule.backends.local.client import LocalClient

__all__ = ["LEDGER_OPS", "Ledger", "LocalLedger"]

LEDGER_OPS = frozenset({"ledger_read", "ledger_swap", "ledger_prune"})  # the coordinator's requests for it


def _checked(name: str) -> str:
    if not isinstance(name, str) or not name:
        raise ValueError(f"a ledger register needs a non-empty str name, not {name!r}")
    return name


class Ledger:
    """The registers: name -> (value, when it expires (``time.monotonic()``; inf:
    never), its token).  Every call is atomic (one lock of its own, not the
    queue's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._writes = itertools.count(1)
        self._registers: dict[str, tuple[bytes, float, int]] = {}

    def read(self, name: str) -> tuple[bytes | None, int | None]:
        with self._lock:
            found = self._registers.get(_checked(name))
        if found is None:
            return None, None
        value, expires, token = found
        return (value if expires > time.monotonic() else None), token

    def swap(self, name: str, token: int | None, value: bytes | None, ttl: float) -> bool:
        if value is not None and not isinstance(value, bytes):
            raise TypeError(f"a ledger register holds bytes, not {type(value).__name__}")
        expires = time.monotonic() + ttl if ttl > 0 else float("inf")
        with self._lock:
            found = self._registers.get(_checked(name))
            if (found[2] if found is not None else None) != token:
                return False
            if value is None:
                self._registers.pop(name, None)
            else:
                self._registers[name] = (value, expires, next(self._writes))
            return True

    def prune(self) -> int:
        now = time.monotonic()
        with self._lock:
            expired = [name for name, (_, expires, _) in self._registers.items() if expires <= now]
            for name in expired:
                del self._registers[name]
        return len(expired)


class LocalLedger(Registers):
    """The coordinator's :class:`Ledger`, reached over a client's connection:
    each call waits for its answer (none is posted)."""

    def __init__(self, client: LocalClient) -> None:
        self.c = client

    def read(self, name: str) -> tuple[bytes | None, Any]:
        value, token = self.c._call("ledger_read", name)
        return value, token

    def swap(self, name: str, token: Any, value: bytes | None, ttl: float) -> bool:
        return bool(self.c._call("ledger_swap", name, token, value, ttl))

    def prune(self) -> int:
        return int(self.c._call("ledger_prune"))
