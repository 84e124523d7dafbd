"""What a local fan-out spends per job, and how much of it is the path of the jobs' values (issue 18).

    python benchmarks/bench_value_path.py [--jobs 20000] [--repeat 5]

Each round, in this process, with the local backend's coordinator and 2 worker processes:

  Pool(2)      ``Pool(2).map`` of a no-op over the jobs, chunksize=1
  fan-out      ``enqueue_each`` of no-op jobs + one blocking ``deferred_result``; the CPU
               time that the driver (this process), the coordinator and the workers used
               over it (psutil), per job
  value path   each job's value alone, as packmule moves it: pickled and signed
               (HMAC-SHA256) and added to the store in bundles of 256, as a worker
               commits a batch; then read back in windows of 1,000 and checked and
               unpickled, as a waiting driver does; the CPU of this process and the
               coordinator, per value

The value path is what the guarantees on values cost: each job's value is a
record of its own in a store that outlives the worker (its add is the job's
commit: a job runs again only if its worker died before it), any process
reads it by the run's name, and nothing is unpickled unless its signature is
right.  Medians; the share of the fan-out's CPU per job that the value path
takes, and (signing alone) the HMACs' share; no assertion on speed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import pickle
import statistics
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ["PACKMULE_BACKEND"] = "local"
os.environ.setdefault("PACKMULE_WORKERS", "2")

BUNDLE, WINDOW = 256, 1000


def noop(x: int) -> int:
    return x


def cpu(procs: list[psutil.Process]) -> float:
    return sum(sum(p.cpu_times()[:2]) for p in procs)


def value_path(runner: object, n: int, coordinator: psutil.Process) -> tuple[float, float, float]:
    """CPU seconds per value: (this process, the coordinator, signing and checking alone)."""
    from packmule._transport.codec import dumps, signer_for

    backend = runner.backend  # type: ignore[attr-defined]
    store, signer = backend.store, signer_for(backend)
    me = psutil.Process()
    tag = f"pm-bench-vp-{os.getpid()}-{time.monotonic_ns()}/v:"
    keys = [f"{tag}{i}" for i in range(n)]
    c0, k0 = cpu([me]), cpu([coordinator])
    hmac = 0.0
    for start in range(0, n, BUNDLE):
        chunk = keys[start:start + BUNDLE]
        payloads = [dumps(("ok", i)) for i in range(start, start + len(chunk))]
        t = time.process_time()
        blobs = signer.sign_many(payloads)
        hmac += time.process_time() - t
        store.add_many(dict(zip(chunk, blobs, strict=True)), 600)
    for start in range(0, n, WINDOW):
        got = store.get_many(keys[start:start + WINDOW])
        t = time.process_time()
        checked = signer.payloads(got.values())
        hmac += time.process_time() - t
        values = list(map(pickle.loads, checked))
        assert len(values) == len(got) == min(WINDOW, n - start)
    took, coord = cpu([me]) - c0, cpu([coordinator]) - k0
    store.delete_many(keys)
    return took / n, coord / n, hmac / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=20_000)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    from benchmarks import _jobs

    n = a.jobs
    warm = _jobs.Bench(f"vp-warm-{os.getpid()}")
    assert warm.deferred_result("count", warm.enqueue_each("noop", range(500))) == 500
    me = psutil.Process()
    pid = _jobs.coordinator_pid(warm.backend)
    assert pid is not None, "no local coordinator found"
    coordinator = psutil.Process(pid)
    workers = [psutil.Process(p) for p in warm.backend.worker_pids()]
    print(f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} cores; "
          f"{len(workers)} worker processes", flush=True)
    rows: dict[str, list[float]] = {k: [] for k in ("pool", "fan", "driver", "coord", "workers", "vp", "vp_coord",
                                                      "hmac")}
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(noop, range(100), chunksize=1)
        for r in range(a.repeat):
            t = time.perf_counter()
            pool.map(noop, range(n), chunksize=1)
            rows["pool"].append(n / (time.perf_counter() - t))
            runner = _jobs.Bench(f"vp-{os.getpid()}-{r}")
            d0, k0, w0 = cpu([me]), cpu([coordinator]), cpu(workers)
            t = time.perf_counter()
            assert runner.deferred_result("count", runner.enqueue_each("noop", range(n))) == n
            rows["fan"].append(n / (time.perf_counter() - t))
            rows["driver"].append((cpu([me]) - d0) / n)
            rows["coord"].append((cpu([coordinator]) - k0) / n)
            rows["workers"].append((cpu(workers) - w0) / n)
            runner.forget()
            vp, vp_coord, hmac = value_path(runner, n, coordinator)
            rows["vp"].append(vp)
            rows["vp_coord"].append(vp_coord)
            rows["hmac"].append(hmac)
            print(f"round {r + 1}: Pool(2) {rows['pool'][-1]:,.0f}/s, fan-out {rows['fan'][-1]:,.0f}/s; "
                  f"value path {1e6 * (vp + vp_coord):.2f} us/value", flush=True)
    m = {k: statistics.median(v) for k, v in rows.items()}
    us = {k: 1e6 * m[k] for k in ("driver", "coord", "workers", "vp", "vp_coord", "hmac")}
    total = us["driver"] + us["coord"] + us["workers"]
    path = us["vp"] + us["vp_coord"]
    print(f"\nfan-out of {n:,} no-op jobs, 2 worker processes, medians of {a.repeat} rounds")
    print(f"  Pool(2)      {m['pool']:>9,.0f} jobs/s")
    print(f"  fan-out      {m['fan']:>9,.0f} jobs/s   {m['fan'] / m['pool']:.2f}x Pool(2)")
    print(f"  CPU per job  {total:.2f} us: driver {us['driver']:.2f}, coordinator {us['coord']:.2f}, "
          f"workers {us['workers']:.2f}")
    print(f"  value path   {path:.2f} us per value ({path / total:.0%} of the fan-out's CPU per job): "
          f"this process {us['vp']:.2f}, coordinator {us['vp_coord']:.2f}; of it HMACs {us['hmac']:.2f} "
          f"({us['hmac'] / total:.0%})")


if __name__ == "__main__":
    main()
