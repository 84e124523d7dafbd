"""What failover (issue 17) costs the job path with one server of each kind:
today's code beside the commit before failover, on the same beanstalkd,
memcached and ZooKeeper, in one run.

    python benchmarks/bench_failover_cost.py [--baseline 6a61947] [--jobs 5000] [--trips 200] [--repeat 5]

Each round runs both contenders one after the other (the order alternates
between rounds, so that the machine's other load falls on both alike); a
contender is its code staged from git in the installed layout, a fresh
``packmule worker --concurrency 2`` of that code and a fresh driver process:

  trip     one no-op job's round trip: ``enqueue`` + blocking ``deferred_result``, p50 and p99 of --trips
  fan-out  ``enqueue_each`` of --jobs no-op jobs + blocking ``deferred_result``: jobs per second,
           and the worker processes' CPU time per job (steadier than wall time on a shared machine)

Medians over the rounds, and today's ratio to the baseline, are printed; no
assertion on speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.bench_registry_cost import stage  # noqa: E402
from conformance.harness import beanstalk_harness, environ_for, job_processes, stop_worker  # noqa: E402

ROUND = """
import statistics, sys, time
import psutil
import packmule

class Noop(packmule.Runner):
    record_return_values = True

    def noop(self, x):
        return x

    def collect(self, values):
        return len(values)

def cpu(pids):
    total = 0.0
    for pid in pids:
        t = psutil.Process(pid).cpu_times()
        total += t.user + t.system
    return total

jobs, trips, pids = int(sys.argv[1]), int(sys.argv[2]), [int(p) for p in sys.argv[3].split(",")]
warm = Noop()
assert warm.deferred_result("collect", warm.enqueue_each("noop", range(200))) == 200
times = []
for _ in range(trips):
    r = Noop()
    start = time.perf_counter()
    assert r.deferred_result("collect", [r.enqueue("noop", 1)]) == 1
    times.append(time.perf_counter() - start)
times.sort()
runner = Noop()
before = cpu(pids)
start = time.perf_counter()
assert runner.deferred_result("collect", runner.enqueue_each("noop", range(jobs))) == jobs
took = time.perf_counter() - start
print(times[len(times) // 2] * 1e3, times[int(len(times) * 0.99)] * 1e3, jobs / took,
      (cpu(pids) - before) / jobs * 1e6)
"""


def one_round(harness: object, site: str, jobs: int, trips: int) -> list[float]:
    """p50 and p99 of a trip (ms), fan-out jobs per second, worker CPU per job (us)."""
    env = environ_for(harness)  # type: ignore[arg-type]
    env.update(PYTHONPATH=site, PACKMULE_LOG_LEVEL="ERROR")
    worker = subprocess.Popen([sys.executable, "-m", "packmule", "worker", "--concurrency", "2",
                               "--log-level", "ERROR"], env=env, cwd=site, stdin=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while harness.backend.queue.stats().workers < 2:  # type: ignore[attr-defined]
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the worker of {site} did not start serving (exit {worker.poll()})")
            time.sleep(0.05)
        pids = ",".join(str(p) for p in job_processes([worker.pid]))
        out = subprocess.run([sys.executable, "-c", ROUND, str(jobs), str(trips), pids], env=env, cwd=site,
                             check=True, capture_output=True, text=True, timeout=900).stdout
        return [float(x) for x in out.split()[-4:]]
    finally:
        stop_worker(worker)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="6a61947", help="the commit before failover")
    ap.add_argument("--jobs", type=int, default=5_000)
    ap.add_argument("--trips", type=int, default=200)
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="packmule-bench-")
    names = ("baseline", "today")
    figures: dict[str, list[list[float]]] = {name: [] for name in names}
    try:
        sites = {"baseline": stage(a.baseline, os.path.join(tmp, "base")),
                 "today": stage(None, os.path.join(tmp, "now"))}
        with beanstalk_harness(concurrency=0) as h:
            for r in range(a.repeat):
                for name in (names if r % 2 == 0 else names[::-1]):
                    figures[name].append(one_round(h, sites[name], a.jobs, a.trips))
                print(f"round {r + 1}: " + "; ".join(
                    f"{n} trip p50 {figures[n][-1][0]:.2f} ms, fan-out {figures[n][-1][2]:.0f}/s" for n in names),
                    flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    labels = ("trip p50 (ms)", "trip p99 (ms)", "fan-out (jobs/s)", "worker CPU/job (us)")
    print(f"\nbeanstalk backend, one server of each kind, {a.jobs} jobs a fan-out, {a.trips} trips, "
          f"{a.repeat} rounds (medians):")
    for k, label in enumerate(labels):
        base = statistics.median(f[k] for f in figures["baseline"])
        now = statistics.median(f[k] for f in figures["today"])
        print(f"  {label:<20} baseline {base:10.2f}   today {now:10.2f}   today / baseline {now / base:.3f}")


if __name__ == "__main__":
    main()
