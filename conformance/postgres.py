"""A real PostgreSQL for tests (the Django app's: ``tests/test_django_*.py``), a
``Server`` of ``servers.py``: on 127.0.0.1 on a free port, its data in a directory
of its own, stopped by the PID this module started::

    with PostgreSQL() as server:
        server.port         # user postgres, trust authentication
        server.restart()    # fast shutdown (sessions ended), same port, same data
"""

from __future__ import annotations

import atexit
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from .servers import READY_TIMEOUT, Server, _existing_user, _stop_at_exit, end_process

POSTGRES_BIN = "/usr/lib/postgresql/15/bin"  # Debian's postgresql (15): initdb, postgres, pg_isready


def postgres_installed() -> str | None:
    """None if PostgreSQL can be started here, else what is missing and how to install it."""
    if os.path.exists(os.path.join(POSTGRES_BIN, "postgres")):
        return None
    return f"missing {POSTGRES_BIN}/postgres; install with: apt-get install -y postgresql"


class PostgreSQL(Server):
    """A PostgreSQL 15 cluster of its own (initdb'd at first start, trust
    authentication, user ``postgres``, no fsync), on 127.0.0.1 only (no Unix
    socket).  PostgreSQL refuses to run as root, so as root its programs run as
    the ``postgres`` user, with the data in a directory of its own that this
    object made (the caller's may not be open to that user).  ``stop()`` is a
    fast shutdown (SIGINT: sessions are ended, as in a restart by an operator)."""

    name = "postgres"
    user = "postgres"

    def __init__(self, tmpdir: str | os.PathLike[str] | None = None) -> None:
        super().__init__(tmpdir)
        self.data = Path(tempfile.mkdtemp(prefix="packmule-pgdata-"))
        self._uid: int | None = None
        if os.geteuid() == 0:
            entry = pwd.getpwnam(_existing_user(self.user))
            self._uid, self._gid = entry.pw_uid, entry.pw_gid
            os.chown(self.data, entry.pw_uid, entry.pw_gid)

    def _as_user(self) -> None:  # (preexec_fn: in the child, before exec)
        if self._uid is not None:
            os.setgid(self._gid)
            os.setuid(self._uid)

    def command(self) -> list[str]:
        if not (self.data / "PG_VERSION").exists():
            subprocess.run([f"{POSTGRES_BIN}/initdb", "-D", str(self.data), "-U", "postgres", "-A", "trust",
                            "--no-sync", "-E", "UTF8"], check=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, preexec_fn=self._as_user)
        return [f"{POSTGRES_BIN}/postgres", "-D", str(self.data), "-h", "127.0.0.1", "-p", str(self.port), "-k", "",
                "-c", "fsync=off", "-c", "full_page_writes=off", "-c", "synchronous_commit=off"]

    def ready(self) -> bool:
        return subprocess.run([f"{POSTGRES_BIN}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(self.port)],
                              stdin=subprocess.DEVNULL).returncode == 0

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command(), cwd=self.data, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=log, start_new_session=True, preexec_fn=self._as_user)
        atexit.register(_stop_at_exit, self.proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(f"postgres on {self.address} did not start; its log ({self.log_path}) ends "
                                   f"with:\n{self.stderr_tail()}")
            time.sleep(0.05)

    def stop(self) -> None:
        """Fast shutdown (SIGINT), then SIGKILL after the grace period."""
        proc, self.proc = self.proc, None
        if proc is not None:
            end_process(proc, signal.SIGINT)

    def close(self) -> None:
        super().close()
        shutil.rmtree(self.data, ignore_errors=True)
