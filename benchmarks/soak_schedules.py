"""Schedules under fire (issue 19): 3 ``packmule worker`` processes, each
running the scheduler and jobs, on a 1-second schedule, on a real beanstalkd +
memcached + ZooKeeper; every ``--kill-every`` seconds the worker that fired the
newest tick is SIGKILLed (its worker processes see their supervisor gone and
exit) and a fresh one started; once, at half time, beanstalkd is killed and
restarted on its binlog.  At the end every tick between the first fired and
the last must have run exactly once:

    python benchmarks/soak_schedules.py --minutes 10

It prints the expected ticks, the ticks fired, the duplicates and the missed
ones, and exits 1 unless there are none of the last two.  The schedule's
misfire policy is ``all``: a tick that fell due while beanstalkd was down is
fired when it is back, so "missed" counts only ticks the scheduler lost.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import packmule  # noqa: E402

TICKS = os.path.join(tempfile.gettempdir(), "packmule-soak-ticks")


class SoakBeat(packmule.Runner):
    """Each tick notes itself (its tick and the pid that ran it)."""

    @packmule.every(seconds=1, misfire="all")
    def beat(self) -> None:
        tick = packmule.current_tick()
        assert tick is not None
        with open(TICKS, "a") as f:
            f.write(f"{tick:%Y%m%dT%H%M%SZ} {os.getpid()}\n")


def _ticks() -> collections.Counter[str]:
    with contextlib.suppress(FileNotFoundError), open(TICKS) as f:
        return collections.Counter(line.split()[0] for line in f if line.strip())
    return collections.Counter()


def _firer(backend: packmule.backends.base.Backend, tick: str) -> int | None:  # type: ignore[name-defined]
    from packmule.scheduling import claim_key

    when = datetime.strptime(tick, "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    raw = backend.ledger.read(claim_key("SoakBeat.beat", when))[0]
    return int(raw.split()[1].split(b":")[1]) if raw is not None else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--kill-every", type=float, default=20.0, metavar="SECONDS")
    a = ap.parse_args()
    from conformance.harness import beanstalk_harness, environ_for

    with contextlib.suppress(FileNotFoundError):
        os.unlink(TICKS)
    with beanstalk_harness(concurrency=0) as h:
        env = environ_for(h)
        env["PYTHONPATH"] = ROOT
        procs: list[subprocess.Popen[bytes]] = []

        def start() -> None:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "packmule", "worker", "--concurrency", "1", "--log-level", "WARNING",
                 "--import", "benchmarks.soak_schedules"], env=env, stdin=subprocess.DEVNULL))

        for _ in range(3):
            start()
        began = time.monotonic()
        end, restart_at, next_kill = began + a.minutes * 60, began + a.minutes * 30, began + a.kill_every
        kills, restarted = 0, False
        try:
            while time.monotonic() < end:
                time.sleep(0.5)
                now = time.monotonic()
                if now >= next_kill and _ticks():
                    pid = _firer(h.backend, max(_ticks()))
                    victim = next((p for p in procs if p.pid == pid and p.poll() is None), None)
                    if victim is not None:
                        victim.send_signal(signal.SIGKILL)
                        victim.wait()
                        kills += 1
                        start()
                    next_kill = now + a.kill_every
                if not restarted and now >= restart_at:
                    h.extras["beanstalkd"].kill()
                    time.sleep(1.0)
                    h.extras["beanstalkd"].start()
                    restarted = True
                    print(f"beanstalkd restarted on its binlog at {now - began:.0f}s", flush=True)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in procs:
                proc.wait(30)
            seen, settle = _ticks(), time.monotonic() + 30  # (the last ticks' jobs were queued: let them run)
            worker = subprocess.Popen([sys.executable, "-m", "packmule", "worker", "--concurrency", "1",
                                       "--no-schedules", "--log-level", "WARNING"], env=env)
            while time.monotonic() < settle:
                time.sleep(2)
                if _ticks() == seen:
                    break
                seen = _ticks()
            worker.terminate()
            worker.wait(30)
    ticks = _ticks()
    first, last = (datetime.strptime(t, "%Y%m%dT%H%M%SZ") for t in (min(ticks), max(ticks)))
    expected = int((last - first).total_seconds()) + 1
    duplicates = sum(n - 1 for n in ticks.values() if n > 1)
    missed = expected - len(ticks)
    print(f"{a.minutes:g} min, 3 workers, 1-s schedule, {kills} SIGKILLs, beanstalkd restarted: "
          f"{'yes' if restarted else 'no'}: expected ticks {expected}, fired {len(ticks)}, "
          f"duplicates {duplicates}, missed {missed}")
    return 0 if duplicates == 0 and missed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
