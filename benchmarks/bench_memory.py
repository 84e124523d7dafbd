"""A worker's memory, and the import time of packmule and of the worker (issue 18).

    python benchmarks/bench_memory.py [--repeat 2] [--jobs 1000] [--imports 9] [--baseline COMMIT]

Memory: a fresh ``packmule worker --concurrency 2`` on beanstalkd, memcached and
ZooKeeper on loopback runs ``--jobs`` no-op jobs (one ``enqueue_each`` and a
blocking ``deferred_result``, from a driver process), then, a second later, its
supervisor and worker processes are read: PSS from ``/proc/<pid>/smaps_rollup``
(shared pages divided among the processes that share them: the sum is what the
worker costs the machine), RSS and USS from psutil's ``memory_full_info``, each
summed over the processes, with each process's figures.  ``--repeat`` fresh
workers per contender, alternating; medians.

Import time: a fresh interpreter per sample times ``import packmule`` and the
import of the worker (``packmule._worker.supervisor``, what ``packmule worker``
runs, else ``packmule.cli``), alternating between contenders; medians of
``--imports`` samples, the modules each loads, and today's heaviest imports
(``python -X importtime``).  No assertion on size or speed.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (after a driver's staged packmule)

from benchmarks._measure import (
    Child,
    Cluster,
    arguments,
    child_env,
    load,
    median,
    pss_kib,
    run,
    staged,
    table,
    tree,
)

WORKER_MODULES = ("packmule._worker.supervisor", "packmule.cli")
TIMED = """
import importlib, sys, time
before = len(sys.modules)
start = time.perf_counter()
importlib.import_module(sys.argv[1])
print(time.perf_counter() - start, len(sys.modules) - before, sys.argv[1])
"""


def op_fan(n: int) -> str:
    import packmule
    from benchmarks import _jobs

    runner = _jobs.Bench(f"mem-{os.getpid()}-{time.monotonic_ns()}")
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(n))) == n
    return packmule.__file__


def measure(pid: int) -> list[tuple[int, int, int, int]]:
    """(pid, PSS, RSS, USS) in KiB for ``pid`` and each process under it."""
    import psutil

    out = []
    for p in tree(pid):
        with contextlib.suppress(psutil.Error, OSError):
            info = psutil.Process(p).memory_full_info()
            out.append((p, pss_kib(p), info.rss // 1024, info.uss // 1024))
    return out


def worker_module(site: str) -> str:
    """The first of WORKER_MODULES that ``site`` has (looked up on disk: a lookup by import
    would import its packages before the import is timed)."""
    return next(m for m in WORKER_MODULES if os.path.exists(os.path.join(site, *m.split(".")) + ".py"))


def import_time(site: str, module: str) -> tuple[float, int, str]:
    out = subprocess.run([sys.executable, "-c", TIMED, module], env=child_env(site, {}), cwd=site, check=True,
                         capture_output=True, text=True).stdout.split()
    return float(out[0]), int(out[1]), out[2]


def heaviest(site: str, module: str, n: int = 8) -> list[tuple[int, str]]:
    """The imports of ``module`` that take longest (cumulative microseconds), from ``-X importtime``."""
    err = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {module}"], env=child_env(site, {}),
                         cwd=site, check=True, capture_output=True, text=True).stderr
    rows = []
    for line in err.splitlines():
        if line.startswith("import time:") and "|" in line and "cumulative" not in line:
            _, cumulative, name = line[len("import time:"):].split("|")
            rows.append((int(cumulative), name.strip()))
    return sorted(rows, reverse=True)[:n]


def main() -> None:
    ap = arguments(__doc__, repeat=2, backends=False)  # (--repeat: fresh workers per contender)
    ap.add_argument("--jobs", type=int, default=1000)
    ap.add_argument("--imports", type=int, default=9, help="import-time samples per contender")
    a = ap.parse_args()
    print(load(), flush=True)
    memory: dict[str, list[list[tuple[int, int, int, int]]]] = {}
    imports: dict[tuple[str, str], list[tuple[float, int, str]]] = {}
    with staged(a.baseline) as sites:
        for r in range(a.repeat):
            order = list(sites) if r % 2 == 0 else list(sites)[::-1]
            for name in order:
                with Cluster() as cluster:
                    node = cluster.node(sites[name])
                    child = Child(__file__, sites[name], node.env)
                    try:
                        print(f"{name}: {child.call('fan', a.jobs)}", flush=True)
                    finally:
                        child.close()
                    time.sleep(1.0)
                    assert node.worker is not None
                    memory.setdefault(name, []).append(measure(node.worker.pid))
                print(f"round {r + 1} {name}: PSS {sum(m[1] for m in memory[name][-1]) / 1024:.1f} MiB", flush=True)
        for i in range(a.imports):
            for name in list(sites)[:: 1 if i % 2 == 0 else -1]:
                worker = worker_module(sites[name])
                for what, module in (("import packmule", "packmule"), ("import the worker", worker)):
                    imports.setdefault((name, what), []).append(import_time(sites[name], module))
        heavy = heaviest(sites["today"], imports["today", "import the worker"][0][2])
    print(f"\n`packmule worker --concurrency 2` after {a.jobs} no-op jobs (supervisor + its processes), "
          f"medians of {a.repeat}; {load()}")
    rows = []
    for name, rounds in memory.items():
        totals = [[sum(m[i] for m in procs) / 1024 for i in (1, 2, 3)] for procs in rounds]
        each = "; ".join(f"{p[1] / 1024:.1f}/{p[2] / 1024:.1f}/{p[3] / 1024:.1f}" for p in rounds[-1])
        rows.append([name, *(f"{median([t[i] for t in totals]):.1f}" for i in range(3)), len(rounds[-1]), each])
    print(table(["contender", "PSS MiB", "RSS MiB", "USS MiB", "processes", "each PSS/RSS/USS MiB (last)"], rows))
    print(f"\nimport time in a fresh interpreter, medians of {a.imports}")
    rows = []
    first = list(sites)[0]
    for (name, what), samples in imports.items():
        ms = median([s[0] for s in samples]) * 1e3
        today = median([s[0] for s in imports[first, what]]) * 1e3
        rows.append([name, f"{what} ({samples[0][2]})", f"{ms:.1f}", samples[0][1], f"{ms / today:.2f}x"])
    print(table(["contender", "what", "ms", "modules loaded", f"ratio to {first}"], rows, left=2))
    print("\ntoday's heaviest imports of the worker (cumulative, one -X importtime run):")
    for us, module in heavy:
        print(f"  {us / 1e3:7.1f} ms  {module}")


if __name__ == "__main__":
    run(main, globals())
