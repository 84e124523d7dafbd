"""The local coordinator process: ``python -m packmule.backends.local.coordinator``,
started by :class:`LocalBackend` with the socket's address and the secret in its
environment.

It holds the queue and the store (``core.py``) and serves every client - the
workers, the process that started it, any process a job starts - over the Unix
socket, one thread per connection.  It has a process of its own so that serving
the workers never waits for the Python of the user's process (its GIL): a
worker's round trip is answered while the driver checks and unpickles values.

It prints ``ready`` once it listens, and ends when its stdin ends: when the
process that started it closes it, or ends in any way.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import threading
import time
from multiprocessing.connection import Connection, Listener, answer_challenge, deliver_challenge
from typing import Any

from packmule.backends.local.client import ADDRESS_VAR, SECRET_VAR
from packmule.backends.local.core import Core, call, receive, send

log = logging.getLogger("packmule")

SWEEP_EVERY = 60.0  # s between sweeps of expired keys (and ledger registers)


class Coordinator:
    def __init__(self, address: str, secret: bytes) -> None:
        self.core = Core(f"local:{os.getpid()}")
        self.secret = secret
        # Each connection proves the secret in its own thread (``serve``), not in the
        # accept loop: a client that dies or stops halfway through the handshake (a
        # worker killed as it starts) must not end or block the accepting of others.
        self.listener = Listener(address, family="AF_UNIX")
        self.closing = False

    def accept(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError as exc:
                if self.closing:
                    return
                log.warning("local coordinator: accepting a connection failed: %r", exc)
                time.sleep(0.05)  # (out of file descriptors, say: not a busy loop)
                continue
            threading.Thread(target=self.serve, args=(conn,), daemon=True, name="packmule-conn").start()

    def serve(self, conn: Connection) -> None:
        """Check the client knows the secret, then answer its requests, in order,
        until it goes away."""
        try:
            deliver_challenge(conn, self.secret)
            answer_challenge(conn, self.secret)
        except Exception as exc:  # a wrong key, or a client gone halfway: refuse it, keep serving
            log.warning("local coordinator refused a connection: %r", exc)
            conn.close()
            return
        core = self.core
        owner = object()  # what this client reserves is given back when it goes away
        worker = False
        answering = True
        try:
            while True:
                op, args = receive(conn)
                if op == "hello":
                    worker = args[0] == "worker"
                    if worker:
                        with core.cond:
                            core.workers += 1
                    result: tuple[str, Any] = ("ok", core.server)
                else:
                    try:
                        result = ("ok", call(core, owner, op, args))
                    except Exception as exc:
                        result = ("err", exc)
                if answering:
                    try:
                        send(conn, result)
                    except OSError:
                        # the client is gone, but what it sent before it went still
                        # applies, in order (it may have posted puts, then acks)
                        answering = False
        except (EOFError, OSError):
            pass  # the client's process ended (or closed): its reservations go back now
        finally:
            core.unlisten(owner)
            back = core.release_owner(owner)
            if back:
                log.warning("a local worker went away holding %d jobs; they are ready again", back)
            if worker:
                with core.cond:
                    core.workers -= 1
            conn.close()

    def sweep(self) -> None:
        while True:
            time.sleep(SWEEP_EVERY)
            self.core.sweep()
            self.core.ledger_prune()


def main() -> int:
    logging.basicConfig(level=os.environ.get("PACKMULE_LOG_LEVEL", "WARNING"),
                        format=f"packmule coordinator {os.getpid()}: %(levelname)s %(message)s")
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C in a terminal is for the user's process
    # Requests are unpickled into short-lived dicts and lists by the thousand: the
    # default threshold (700) would walk them, and the ever larger store, often.
    gc.freeze()
    gc.set_threshold(50_000, 10, 10)
    coordinator = Coordinator(os.environ[ADDRESS_VAR], bytes.fromhex(os.environ[SECRET_VAR]))
    threading.Thread(target=coordinator.accept, daemon=True, name="packmule-accept").start()
    threading.Thread(target=coordinator.sweep, daemon=True, name="packmule-sweep").start()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    sys.stdin.buffer.read()  # until the process that started us closes it, or ends
    coordinator.closing = True
    coordinator.listener.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
