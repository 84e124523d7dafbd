"""Fan-out throughput: beanstalk beside local, and local beside ``multiprocessing.Pool(2)`` (issue 18).

    python benchmarks/bench_throughput.py [--jobs 20000] [--repeat 5] [--backends local,beanstalk]
                                          [--baseline COMMIT]

Each round, the order alternating between rounds:

  Pool(2)    ``Pool(2).map`` of a no-op over the jobs, chunksize=1 (this process)
  local      ``enqueue_each`` of no-op jobs + one blocking ``deferred_result`` over
             them, end to end, in a driver process of its own with 2 worker processes
  beanstalk  the same on beanstalkd, memcached and ZooKeeper on loopback, with one
             ``packmule worker --concurrency 2`` (its own servers for each contender)

for today's code and ``--baseline``'s.  Medians of jobs per second, and the
ratios beanstalk / local and local / Pool(2), each within one code; no
assertion on speed.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (after a driver's staged packmule)

from benchmarks._measure import (
    Cluster,
    arguments,
    driver,
    load,
    median,
    run,
    staged,
    table,
)


def noop(x: int) -> int:
    return x


def op_setup() -> str:
    import packmule

    op_fan(500)
    return packmule.__file__


def op_fan(n: int) -> float:
    from benchmarks import _jobs

    runner = _jobs.Bench(f"fan-{os.getpid()}-{time.monotonic_ns()}")
    start = time.perf_counter()
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(n))) == n
    took = time.perf_counter() - start
    runner.forget()
    return took


def main() -> None:
    ap = arguments(__doc__, repeat=5)
    ap.add_argument("--jobs", type=int, default=20_000)
    a = ap.parse_args()
    backends = a.backends.split(",")
    print(load(), flush=True)
    with staged(a.baseline) as sites, contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.get_context("fork").Pool(2))
        pool.map(noop, range(100), chunksize=1)

        def pool_run(n: int) -> float:
            start = time.perf_counter()
            pool.map(noop, range(n), chunksize=1)
            return time.perf_counter() - start

        contenders: dict[str, Callable[[int], float]] = {"Pool(2)": pool_run}
        cluster = stack.enter_context(Cluster(memcached_mb=256)) if "beanstalk" in backends else None
        for name, site in sites.items():
            for backend in backends:
                child, _ = driver(__file__, site, backend, cluster)
                stack.callback(child.close)
                label = f"{name} {backend}"
                print(f"{label}: {child.call('setup')}", flush=True)
                contenders[label] = functools.partial(child.call, "fan")
        took: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(a.repeat):
            order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
            for name in order:
                took[name].append(contenders[name](a.jobs))
            print(f"round {r + 1}: " + ", ".join(f"{n} {a.jobs / took[n][-1]:,.0f}/s" for n in contenders), flush=True)
    rate = {name: a.jobs / median(values) for name, values in took.items()}
    print(f"\nfan-out of {a.jobs:,} no-op jobs, 2 worker processes each, medians of {a.repeat} rounds; {load()}")
    rows = []
    for name in contenders:
        best = a.jobs / min(took[name])
        ratio = ""
        if name.endswith(" beanstalk") and name[:-len(" beanstalk")] + " local" in rate:
            ratio = f"{rate[name] / rate[name[:-len(' beanstalk')] + ' local']:.2f}x local"
        elif name.endswith(" local"):
            ratio = f"{rate[name] / rate['Pool(2)']:.2f}x Pool(2)"
        backend = name.rsplit(" ", 1)[-1]
        versus = f"{rate[name] / rate['today ' + backend]:.2f}x" if f"today {backend}" in rate else ""
        rows.append([name, f"{rate[name]:,.0f}", f"{best:,.0f}", ratio, versus])
    print(table(["contender", "jobs/s median", "jobs/s best", "ratio (medians)", "rate / today's"], rows))


if __name__ == "__main__":
    run(main, globals())
