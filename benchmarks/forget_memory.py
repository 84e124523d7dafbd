"""Bounded memory: does the local coordinator give back what forgotten runs held?

    python benchmarks/forget_memory.py [--runs 50] [--jobs 20000] [--record both|on|off]
                                       [--workers 2] [--limit-mib 20] [--verbose]

For each setting of record_return_values (both by default, each on a fresh
local backend): ``--runs`` runs of ``--jobs`` no-op jobs each, queued with
``enqueue_each``, waited for, then ``forget()``-ed.  The coordinator process's
RSS (psutil) is read after each run (once the run is forgotten); the figure is
the RSS after the last run minus the RSS after the first.  Issue 6 asks for
1,000,000 jobs in 50 runs of 20,000 to end within 20 MiB of the size after the
first run: PASS or FAIL against --limit-mib.  Exit status 1 on any FAIL.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import psutil
from packmule.backends.local import LocalBackend

import packmule

MIB = 1 << 20
SETTLE = 0.5  # s after forget() before reading RSS: the coordinator answers other requests first


class Noop(packmule.Runner):
    time_to_run = 600.0

    def noop(self, i: int) -> None:
        return None


def measure(record: bool, args: argparse.Namespace) -> tuple[list[float], float]:
    """RSS in MiB after each run, and the seconds it all took."""
    backend = LocalBackend(workers=args.workers)
    try:
        coordinator = psutil.Process(backend._coordinator.pid)
        rss: list[float] = []
        start = time.perf_counter()
        for i in range(args.runs):
            runner = Noop(f"forget-{os.getpid()}-{int(record)}-{i}", record_return_values=record, backend=backend)
            runner.enqueue_each("noop", range(args.jobs))
            progress = runner.wait(timeout=600)
            if (progress.done, progress.total, progress.failed) != (args.jobs, args.jobs, 0):
                raise SystemExit(f"run {runner.name} ended at {progress} (failed {progress.failed}), "
                                 f"not {args.jobs} / {args.jobs}")
            runner.forget()
            time.sleep(SETTLE)
            rss.append(coordinator.memory_info().rss / MIB)
            if args.verbose:
                print(f"  record={record} run {i + 1}: coordinator RSS {rss[-1]:.1f} MiB", flush=True)
        return rss, time.perf_counter() - start
    finally:
        backend.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--record", choices=("both", "on", "off"), default="both",
                    help="record_return_values of the runs (both: one backend each)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit-mib", type=float, default=20.0)
    ap.add_argument("--verbose", action="store_true", help="print RSS after every run")
    args = ap.parse_args()
    if args.runs < 2:
        raise SystemExit("--runs must be at least 2: the figure compares the first run with the last")
    settings = {"both": [False, True], "on": [True], "off": [False]}[args.record]
    failed = False
    for record in settings:
        rss, took = measure(record, args)
        growth = rss[-1] - rss[0]
        verdict = "PASS" if growth <= args.limit_mib else "FAIL"
        failed |= verdict == "FAIL"
        per_job = growth * MIB / (args.jobs * (args.runs - 1))
        print(f"forget memory, record_return_values={record}: {args.runs} runs x {args.jobs} jobs in {took:.0f}s; "
              f"coordinator RSS after run 1 {rss[0]:.1f} MiB, after run {args.runs} {rss[-1]:.1f} MiB "
              f"(max {max(rss):.1f}): {growth:+.1f} MiB ({per_job:.0f} B per later job), "
              f"limit {args.limit_mib:g} MiB: {verdict}", flush=True)
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
