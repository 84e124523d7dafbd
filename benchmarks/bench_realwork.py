"""Real work beside ``multiprocessing.Pool(2).map`` (chunksize=1), in one run.

    python benchmarks/bench_realwork.py [--jobs 600] [--repeat 5] [--backends local,beanstalk]

Each job is CPU-bound, about 4 ms here: SHA-256 over 4 MiB.  Each round runs,
one after another (the order alternating between rounds): ``Pool(2).map``,
and for each backend a packmule run of the same jobs with 2 worker processes
(``enqueue_each`` + blocking ``deferred_result``, end to end).  Medians over the
rounds, the ratio Pool time / packmule time (1.0: as fast as Pool; higher is
faster), and the CPU time the worker processes used over the run (how much of
the 2 cores they kept busy) are printed.  No assertion on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import multiprocessing
import os
import statistics
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("PACKMULE_WORKERS", "2")

import packmule  # noqa: E402

DATA = b"x" * (4 << 20)


def work(i: int) -> str:
    return hashlib.sha256(DATA).hexdigest()[:8] + str(i)


class Hasher(packmule.Runner):
    record_return_values = True

    def work(self, i: int) -> str:
        return hashlib.sha256(DATA).hexdigest()[:8] + str(i)

    def count(self, values: list[str]) -> int:
        return len(values)


def cpu(pids: list[int]) -> float:
    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            t = psutil.Process(pid).cpu_times()
            total += t.user + t.system
    return total


def pool_run(pool: multiprocessing.pool.Pool, n: int, pids: list[int]) -> tuple[float, float]:
    before = cpu(pids)
    start = time.perf_counter()
    pool.map(work, range(n), chunksize=1)
    took = time.perf_counter() - start
    return took, (cpu(pids) - before) / took


def packmule_run(backend: object, n: int, pids: list[int]) -> tuple[float, float]:
    runner = Hasher(backend=backend)
    before = cpu(pids)
    start = time.perf_counter()
    assert runner.deferred_result("count", runner.enqueue_each("work", range(n))) == n
    took = time.perf_counter() - start
    busy = (cpu(pids) - before) / took
    runner.forget()
    return took, busy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=600)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backends", default="local,beanstalk")
    a = ap.parse_args()
    t0 = time.perf_counter()
    work(0)
    print(f"one job takes {(time.perf_counter() - t0) * 1e3:.1f} ms here")
    with contextlib.ExitStack() as stack:
        pool = stack.enter_context(multiprocessing.get_context("fork").Pool(2))
        pool.map(work, range(4))
        contenders = {"Pool(2)": (lambda: pool_run(pool, a.jobs, [p.pid for p in pool._pool]))}  # type: ignore[attr-defined]
        for name in a.backends.split(","):
            if name == "local":
                backend = packmule.backends.local.LocalBackend.from_env({"PACKMULE_WORKERS": "2"})
                backend.ensure_workers()
                stack.callback(backend.close)
                pids = backend.worker_pids()
            else:
                from conformance.harness import beanstalk_harness, job_processes
                h = stack.enter_context(beanstalk_harness(concurrency=2))
                backend, pids = h.backend, job_processes([h.extras["worker"].pid])
            packmule_run(backend, 20, pids)  # warm
            contenders[name] = (lambda b=backend, p=pids: packmule_run(b, a.jobs, p))
        times: dict[str, list[float]] = {n: [] for n in contenders}
        busy: dict[str, list[float]] = {n: [] for n in contenders}
        for r in range(a.repeat):
            order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
            for name in order:
                took, cores = contenders[name]()
                times[name].append(took)
                busy[name].append(cores)
            print(f"round {r + 1}: " + ", ".join(f"{n} {times[n][-1]:.3f} s" for n in contenders), flush=True)
    pool_median = statistics.median(times["Pool(2)"])
    print(f"\n{a.jobs} CPU-bound jobs, 2 worker processes, medians of {a.repeat} rounds:")
    for name in contenders:
        median = statistics.median(times[name])
        print(f"  {name:<9} {median:7.3f} s   Pool/this {pool_median / median:5.2f}x   "
              f"workers busy {statistics.median(busy[name]):.2f} cores")


if __name__ == "__main__":
    import packmule.backends.local  # noqa: F401
    main()
