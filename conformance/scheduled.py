"""Runners with schedules, for the conformance suite's schedule tests.  Each
tick's job notes its tick in a file named after its schedule, in
``TICKS_DIR``: a tick that ran twice shows twice, whichever process ran it.
(A separate module from ``runners.py``: a scheduler fires every schedule of
the modules it imports, and the other tests' workers need none.)"""

from __future__ import annotations

import atexit
import os
import shutil
import sys
import tempfile

import packmule

# A folder of its own for each pytest-xdist process (each has servers and workers of its own), named
# from the environment its workers inherit, so that processes running side by side never count
# each other's ticks
_XDIST = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")[:12] + os.environ.get("PYTEST_XDIST_WORKER", "")
TICKS_DIR = os.path.join(tempfile.gettempdir(), "packmule-conformance-ticks" + (f"-{_XDIST}" if _XDIST else ""))
_OWNER = os.getpid()


def _remove_ticks_dir() -> None:
    if os.getpid() == _OWNER:  # (a fork child of a test leaves it to the test process)
        shutil.rmtree(TICKS_DIR, ignore_errors=True)


if _XDIST and "xdist" in sys.modules:  # (the xdist process removes it at its end; its workers leave it)
    atexit.register(_remove_ticks_dir)


def ticks_file(key: str) -> str:
    return os.path.join(TICKS_DIR, key)


class Noted(packmule.Runner):
    """A tick notes itself, and its run records it as its value."""

    record_return_values = True

    def _note(self, key: str) -> str:
        tick = packmule.current_tick()
        assert tick is not None, "a scheduled job outside a tick's run"
        os.makedirs(TICKS_DIR, exist_ok=True)
        with open(ticks_file(key), "a") as f:
            f.write(f"{tick:%Y%m%dT%H%M%SZ} {os.getpid()}\n")
        return tick.isoformat()


class Beat(Noted):
    """Every second, for the tests with several scheduler processes.  Misfire
    ``all``: a tick fired late (a loaded machine, a scheduler starting) still
    fires, so a tick missing from the count is one the schedulers lost, never
    one the policy skipped."""

    @packmule.every(seconds=1, misfire="all")
    def beat(self) -> str:
        return self._note("Beat.beat")
