"""Cost as the work grows: fan-outs of 10k, 100k (and with ``--big`` 1M) no-op jobs (issue 18).

    python benchmarks/bench_scaling.py [--sizes 10000,100000] [--big] [--repeat 1]
                                       [--backends local,beanstalk] [--baseline COMMIT]

Each fan-out (``enqueue_each`` of N no-op jobs and one blocking
``deferred_result`` over them, 2 worker processes) runs in a fresh driver
process, which reports:

  time per job       end to end
  driver peak        the driver process's ``ru_maxrss``, and its growth per job over its
                     RSS just before the fan-out
  coordinator        local: the coordinator process's RSS growth over the fan-out, per job
                     (a fresh coordinator each fan-out, warmed by 100 jobs)
  memcached          beanstalk: memcached's ``bytes`` stat after less before, per job
                     (memcached started with room enough that nothing is evicted)

After the largest beanstalk fan-out, the keys memcached holds for its run are
listed (``lru_crawler metadump``) and their bytes summed by field: where
memcached's per-job memory goes.  A row per contender and size; per-job figures
that grow with N are what grows faster than linearly.  No assertion.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import urllib.parse
from collections import Counter
from typing import Any

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (after a driver's staged packmule)

from benchmarks._measure import (
    LOCAL_ENV,
    Child,
    Cluster,
    _ask,
    arguments,
    load,
    median,
    memcached_stats,
    run,
    staged,
    table,
)


def op_scale(n: int) -> dict[str, Any]:
    import resource

    import psutil

    from benchmarks import _jobs

    runner = _jobs.Bench(f"warm-{os.getpid()}")
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(100))) == 100
    coordinator = _jobs.coordinator_pid(runner.backend) if os.environ.get("PACKMULE_BACKEND") == "local" else None
    me = psutil.Process()

    def coordinator_rss() -> int:
        return psutil.Process(coordinator).memory_info().rss if coordinator else 0

    runner = _jobs.Bench(f"scale-{os.getpid()}-{time.monotonic_ns()}")
    rss, coord = me.memory_info().rss, coordinator_rss()
    start = time.perf_counter()
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(n))) == n
    took = time.perf_counter() - start
    return {"took": took, "rss": rss, "maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "coordinator": coordinator_rss() - coord if coordinator else None, "run": runner.name}


def keys_of(memcached: str, run: str) -> tuple[Counter[str], Counter[str]]:
    """Bytes and keys memcached holds for ``run``, by field (``lru_crawler metadump all``)."""
    dump = _ask(memcached, b"lru_crawler metadump all\r\n", b"END\r\n").decode()
    size: Counter[str] = Counter()
    count: Counter[str] = Counter()
    for line in dump.splitlines():
        fields = dict(part.split("=", 1) for part in line.split() if "=" in part)
        key = urllib.parse.unquote(fields.get("key", ""))
        parts = key.split("/")
        if len(parts) < 2 or parts[1] != run:
            continue
        field = "run pointer" if len(parts) == 2 else (  # (a path field: "v:" and the job's path)
            parts[3].split(":")[0] + ":" if ":" in parts[3] else parts[3]) if len(parts) > 3 else "/".join(parts[2:])
        size[field] += int(fields.get("size", 0))
        count[field] += 1
    return size, count


def main() -> None:
    ap = arguments(__doc__, repeat=1)  # (--repeat: fan-outs of each size and contender)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--big", action="store_true", help="also 1,000,000 jobs")
    a = ap.parse_args()
    sizes = [int(s) for s in a.sizes.split(",")] + ([1_000_000] if a.big else [])
    print(load(), flush=True)
    results: dict[tuple[str, int], list[dict[str, Any]]] = {}
    where: tuple[str, int, Counter[str], Counter[str]] | None = None
    with staged(a.baseline) as sites, contextlib.ExitStack() as stack:
        room = 4096 if a.big else 1024  # MiB: nothing evicted
        cluster = stack.enter_context(Cluster(memcached_mb=room)) if "beanstalk" in a.backends else None
        nodes = {name: cluster.node(site) for name, site in sites.items()} if cluster else {}
        for n in sizes:
            for r in range(a.repeat):
                for name in list(sites)[:: 1 if r % 2 == 0 else -1]:
                    for backend in a.backends.split(","):
                        env = LOCAL_ENV if backend == "local" else nodes[name].env
                        before = memcached_stats(nodes[name].memcached) if backend == "beanstalk" else None
                        child = Child(__file__, sites[name], env)
                        try:
                            got = child.call("scale", n)
                        finally:
                            child.close()
                        if before is not None:
                            after = memcached_stats(nodes[name].memcached)
                            got["memcached"] = int(after["bytes"]) - int(before["bytes"])
                            evicted = int(after["evictions"])
                            if evicted:
                                print(f"  (memcached evicted {evicted} items: its bytes are too low)")
                            if name == "today" and (where is None or n >= where[1]):
                                where = (got["run"], n, *keys_of(nodes[name].memcached, got["run"]))
                        results.setdefault((f"{name} {backend}", n), []).append(got)
                        print(f"{name} {backend} {n:,}: {got['took']:.2f} s", flush=True)
    print(f"\nfan-outs of no-op jobs, 2 worker processes, medians of {a.repeat}; {load()}")
    rows = []
    for (label, n), runs in sorted(results.items(), key=lambda kv: (kv[0][0], kv[0][1])):
        def med(key: str, runs: list[dict[str, Any]] = runs) -> float:
            values = [run[key] for run in runs if run.get(key) is not None]
            return median(values) if values else float("nan")
        rows.append([label, f"{n:,}", f"{med('took') / n * 1e6:.1f}", f"{med('maxrss') / 2**20:.0f}",
                     f"{(med('maxrss') - med('rss')) / n:.0f}",
                     "" if "local" not in label else f"{med('coordinator') / n:.0f}",
                     "" if "beanstalk" not in label else f"{med('memcached') / n:.0f}"])
    print(table(["contender", "jobs", "us/job", "driver peak MiB", "driver B/job", "coordinator B/job",
                 "memcached B/job"], rows))
    if where is not None:
        run, n, size, count = where
        print(f"\nwhere memcached's bytes go, today's run of {n:,} jobs ({run}), by key field:")
        print(table(["field", "keys", "keys/job", "bytes", "bytes/job"],
                    [[f, f"{count[f]:,}", f"{count[f] / n:.3f}", f"{size[f]:,}", f"{size[f] / n:.1f}"]
                     for f, _ in size.most_common()] +
                    [["all", f"{sum(count.values()):,}", f"{sum(count.values()) / n:.3f}", f"{sum(size.values()):,}",
                      f"{sum(size.values()) / n:.1f}"]]))
        print("  (keys outside the run's own pm/<name> tree - the registry, other runs - are left out)")
    print("  the local coordinator's memory is read as its RSS only: where it goes inside is not measured")


if __name__ == "__main__":
    run(main, globals())
