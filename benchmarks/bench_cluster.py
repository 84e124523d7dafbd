"""Cluster fan-out/fan-in beside the raw beanstalkd ceiling, in one run.

    python benchmarks/bench_cluster.py [--n 10000] [--repeat 5]

Starts beanstalkd, memcached and ZooKeeper on loopback ports and one
``packmule worker --concurrency 2``; then, N no-op jobs each:
- packmule: ``enqueue_each`` + blocking ``deferred_result`` (end to end);
- raw: greenstalk ``put`` of N bodies, then 2 processes ``reserve`` + ``delete``
  until all are gone (what beanstalkd alone can do for the same work).
Prints medians and the ratio packmule / raw.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import greenstalk  # noqa: E402

from conformance.harness import beanstalk_harness  # noqa: E402
from conformance.runners import Worky  # noqa: E402


def consume(address: tuple[str, int], tube: str) -> None:
    with greenstalk.Client(address, watch=tube) as client:
        while True:
            try:
                client.delete(client.reserve(timeout=0))
            except greenstalk.TimedOutError:
                return


def raw(address: tuple[str, int], n: int) -> float:
    """put N, then 2 processes reserve+delete until the tube is empty."""
    tube = f"raw{time.monotonic_ns()}"
    procs = [multiprocessing.Process(target=consume, args=(address, tube)) for _ in range(2)]
    start = time.perf_counter()
    with greenstalk.Client(address, use=tube) as client:
        for i in range(n):
            client.put(b"%d" % i)
        for p in procs:
            p.start()
        for p in procs:
            p.join()
        assert client.stats_tube(tube)["total-jobs"] == n and client.stats_tube(tube)["current-jobs-ready"] == 0
    return time.perf_counter() - start


def fan(backend: object, n: int) -> float:
    runner = Worky(backend=backend)
    start = time.perf_counter()
    jobs = runner.enqueue_each("incr_noop", range(n))
    assert runner.deferred_result("collect", jobs) == list(range(n))
    took = time.perf_counter() - start
    runner.forget()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=10_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    with beanstalk_harness(concurrency=2) as h:
        host, port = h.extras["beanstalkd"].address.split(":")
        address = (host, int(port))
        fan(h.backend, 200)  # warm the workers
        ours, ceiling = [], []
        for _ in range(a.repeat):
            ours.append(fan(h.backend, a.n))
            ceiling.append(raw(address, a.n))
    mo, mc = statistics.median(ours), statistics.median(ceiling)
    print(f"N={a.n} no-op jobs, 2 worker processes, servers on loopback, median of {a.repeat}")
    print(f"  packmule beanstalk fan-out/fan-in  {a.n / mo:>9,.0f} jobs/s")
    print(f"  raw greenstalk put + 2x reserve/delete {a.n / mc:>9,.0f} jobs/s")
    print(f"  ratio packmule / raw: {mc / mo:.0%}")


if __name__ == "__main__":
    main()
