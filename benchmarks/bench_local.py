"""Local backend fan-out/fan-in beside multiprocessing.Pool and ProcessPoolExecutor.

    python benchmarks/bench_local.py [--n 20000] [--repeat 5]

Each contender runs N no-op tasks on 2 worker processes; medians of --repeat
runs, measured side by side in one run; ratios printed at the end.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import time
from concurrent.futures import ProcessPoolExecutor

os.environ.setdefault("PACKMULE_WORKERS", "2")

import packmule  # noqa: E402


def noop(x: int) -> int:
    return x


class Noop(packmule.Runner):
    def noop(self, x: int) -> int:
        return x

    def count(self, values: list[int]) -> int:
        return len(values)


def packmule_fan(n: int) -> float:
    runner = Noop()
    start = time.perf_counter()
    jobs = runner.enqueue_each("noop", range(n))
    assert runner.deferred_result("count", jobs) == n
    took = time.perf_counter() - start
    runner.forget()
    return took


def enqueue_each(n: int) -> float:
    runner = Noop()
    start = time.perf_counter()
    runner.enqueue_each("noop", range(n))
    took = time.perf_counter() - start
    runner.wait(timeout=600)
    runner.forget()
    return took


def enqueue_loop(n: int) -> float:
    runner = Noop()
    start = time.perf_counter()
    for i in range(n):
        runner.enqueue("noop", i)
    took = time.perf_counter() - start
    runner.wait(timeout=600)
    runner.forget()
    return took


def pool_map(n: int, pool: multiprocessing.pool.Pool) -> float:
    start = time.perf_counter()
    pool.map(noop, range(n), chunksize=1)
    return time.perf_counter() - start


def executor_submit(n: int, ex: ProcessPoolExecutor) -> float:
    start = time.perf_counter()
    futures = [ex.submit(noop, i) for i in range(n)]
    for f in futures:
        f.result()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    n = a.n
    times: dict[str, list[float]] = {k: [] for k in ("packmule", "pool", "executor", "each", "loop")}
    packmule_fan(100)  # start the workers
    with multiprocessing.Pool(2) as pool, ProcessPoolExecutor(2) as ex:
        pool.map(noop, range(10))
        list(ex.map(noop, range(10)))
        for _ in range(a.repeat):
            times["packmule"].append(packmule_fan(n))
            times["pool"].append(pool_map(n, pool))
            times["executor"].append(executor_submit(n, ex))
            times["each"].append(enqueue_each(n // 4))
            times["loop"].append(enqueue_loop(n // 4))
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"N={n} no-op jobs, 2 workers, median of {a.repeat}")
    print(f"  packmule local fan-out/fan-in  {n / med['packmule']:>9,.0f} jobs/s")
    print(f"  multiprocessing.Pool(2).map    {n / med['pool']:>9,.0f} jobs/s  (chunksize=1)")
    print(f"  ProcessPoolExecutor(2).submit  {n / med['executor']:>9,.0f} jobs/s")
    print(f"  ratio vs Pool: {med['pool'] / med['packmule']:.2f}x   vs executor: "
          f"{med['executor'] / med['packmule']:.2f}x")
    print(f"  enqueue_each {n // 4} jobs: {med['each'] * 1e3:.0f} ms; enqueue loop: {med['loop'] * 1e3:.0f} ms; "
          f"ratio {med['loop'] / med['each']:.1f}x")


if __name__ == "__main__":
    main()
