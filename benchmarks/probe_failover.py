"""The operator's probe of issue 17, on real servers: two servers of one kind,
one killed for good (``kill -9``), two ``packmule worker``s, then 10 runs of 20
no-op jobs started.  How many complete, with exact counts?

    python benchmarks/probe_failover.py [--runs 10] [--jobs 20] [--spread 200]

Done once with two beanstalkd (one memcached) and once with two memcached (one
beanstalkd).  With two memcached it also starts --spread runs while both are up
and counts how many each server holds (runs spread evenly over the live servers).
Prints one line per kind; exits 1 unless every run completed exactly.
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from conformance.harness import beanstalk_harness, start_worker, stop_worker  # noqa: E402
from conformance.runners import Plain  # noqa: E402


def probe(kind: str, runs: int, jobs: int, spread: int) -> bool:
    servers = {"beanstalkds": 2} if kind == "beanstalkd" else {"memcacheds": 2}
    with beanstalk_harness(concurrency=2, **servers) as h:  # type: ignore[arg-type]
        second = start_worker(h, 2)  # two `packmule worker`s
        try:
            if spread:
                homes = collections.Counter()
                for n in range(spread):
                    runner = Plain(f"spread-{n}", backend=h.backend)
                    runner.enqueue("work", 0)
                    homes[h.backend.store.holder(runner._pm_gen)] += 1
                print(f"  {spread} runs while both memcached are up: " +
                      ", ".join(f"{server} {count}" for server, count in sorted(homes.items())))
            victim = h.extras[f"{kind}s"][0]
            victim.kill()
            start = time.monotonic()
            started = []
            for n in range(runs):
                runner = Plain(f"after-kill-{n}", backend=h.backend)
                try:
                    runner.enqueue_each("work", range(jobs))
                except Exception as exc:  # the outage the probe looks for
                    print(f"  run {n}: enqueue refused: {type(exc).__name__}: {exc}")
                    continue
                started.append(runner)
            complete = 0
            for runner in started:
                try:
                    progress = runner.wait(timeout=60)
                except Exception as exc:
                    print(f"  {runner.name}: {type(exc).__name__}: {exc}")
                    continue
                exact = progress == f"{jobs:.1f} / {jobs:.1f}" and progress.failed == 0
                complete += exact
            took = time.monotonic() - start
            print(f"one of two {kind} killed: {complete} of {runs} runs of {jobs} jobs started after the kill "
                  f"completed exactly, in {took:.2f} s")
            return complete == runs
        finally:
            stop_worker(second)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--jobs", type=int, default=20)
    ap.add_argument("--spread", type=int, default=200)
    a = ap.parse_args()
    ok = probe("beanstalkd", a.runs, a.jobs, 0)
    ok = probe("memcached", a.runs, a.jobs, a.spread) and ok
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
