"""The failover mode of ``benchmarks/soak.py`` (``--failover``, issue 17): the
cluster has 2 beanstalkd, 2 memcached and a 3-member ZooKeeper ensemble, and
one server of each kind is killed for good (SIGKILL, never started again)
partway: a memcached at a third of the soak, a beanstalkd one stagger later,
the ZooKeeper leader one more stagger later (the stagger is a twelfth of the
soak).  Which memcached and which beanstalkd die is chosen by the seed.

A run may then end in ``RunStateLost``: its state was on the dead memcached,
or its remaining jobs were on the dead beanstalkd.  Such a run counts as
*lost* (expected) only if the error names the server that holds what was
lost, and that server was killed after the run began (a run started later
must go to the live servers): the store's form names the run's server (which
must be the holder of the run's generation), the queue's form names the queue
servers that are away.  A ``RunStateLost`` that names no
server, a live one or a ZooKeeper member is not expected: the run is a hang.
"""

from __future__ import annotations

import contextlib
import random
import re
import sys
import threading
import time
from typing import Any

import packmule

STORE_LOST = re.compile(r"its state is on the store server (\S+), which has not answered")
QUEUE_LOST = re.compile(r"its remaining jobs are on (.+?), which cannot be reached")
FIRST_KILL = 1 / 3  # of the soak's time: the first server dies
STAGGER = 1 / 12  # of the soak's time between two kills


class Failover:
    """Kills one server of each kind for good on a schedule, in a thread of its
    own, and tells an expected loss from any other ``RunStateLost``."""

    def __init__(self, extras: dict[str, Any], seed: int, start: float, seconds: float) -> None:
        rng = random.Random(f"{seed}:failover")
        self.memcached = rng.choice(extras["memcacheds"])
        self.beanstalkd = rng.choice(extras["beanstalkds"])
        self.survivor = next(s for s in extras["beanstalkds"] if s is not self.beanstalkd)
        self.ensemble = extras["zookeeper"]
        first, stagger = start + seconds * FIRST_KILL, seconds * STAGGER
        self.plan = [(first, "memcached"), (first + stagger, "beanstalkd"), (first + 2 * stagger, "zookeeper")]
        self.killed: dict[str, tuple[str, float]] = {}  # address -> (its kind, when it died)
        self.problems: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="failover", daemon=True)

    def start(self) -> Failover:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)

    def _run(self) -> None:
        for at, kind in self.plan:
            if self.stop.wait(max(0.0, at - time.monotonic())):
                return
            try:
                self._kill(kind)
            except Exception as exc:  # the soak must say so, not die
                self.problems.append(f"KILL FAILED ({kind}): {type(exc).__name__}: {exc}")

    def _kill(self, kind: str) -> None:
        server = self.ensemble.leader() if kind == "zookeeper" else getattr(self, kind)
        server.kill()
        with self.lock:
            self.killed[server.address] = (kind, time.monotonic())
        print(f"[failover] killed {kind} {server.address} for good", file=sys.stderr, flush=True)
        if kind == "zookeeper":
            self.ensemble.wait_for_leader()

    def dead(self, kind: str, since: float) -> set[str]:
        """The servers of ``kind`` killed after ``since``."""
        with self.lock:
            return {address for address, (k, when) in self.killed.items() if k == kind and when > since}

    def lost(self, runner: packmule.Runner, gen: str | None, began: float, exc: BaseException) -> str | None:
        """The kind of server whose death ``exc`` reports, if it is an expected
        loss of this run, begun at ``began`` (see the module docstring); None if it is not."""
        for cause in _chain(exc):
            if not isinstance(cause, packmule.RunStateLost):
                continue
            text = str(cause)
            store = STORE_LOST.search(text)
            if store is not None:
                named = store.group(1)
                with contextlib.suppress(Exception):
                    if gen is not None and runner.backend.store.holder(gen) != named:
                        return None  # (it names a server that does not hold the run)
                return "memcached" if named in self.dead("memcached", began) else None
            queue = QUEUE_LOST.search(text)
            if queue is not None:
                named_servers = {s.strip() for s in queue.group(1).split(",")}
                return "beanstalkd" if named_servers and named_servers <= self.dead("beanstalkd", began) else None
        return None


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and the errors it was raised from."""
    out: list[BaseException] = []
    cur: BaseException | None = exc
    while cur is not None and cur not in out:
        out.append(cur)
        cur = cur.__cause__ or cur.__context__
    return out
