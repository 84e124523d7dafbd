"""What a blocking deferred_result costs the driver: today's code beside a
baseline commit, in one run, on the local backend with 2 workers.

    python benchmarks/bench_deferred.py [--baseline 5e9f9e3] [--repeat 7]

Two workloads a round, each in a fresh process per contender; rounds
alternate, and so does which contender goes first, so that the machine's
other load falls on both alike:

  fan     one deferred_result over 20,000 no-op jobs (the values are read in windows)
  small   300 deferred_results one after another, each over 3 no-op jobs (the
          driver's fixed cost per call, where waiting for the counts could show)

The default baseline is the commit before deferred_result waited for ``done``
to count its jobs.  Medians and best rounds in seconds, with ratios to the
baseline, are printed; no assertion on speed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

from benchmarks.bench_registry_cost import stage

ROUND = """
import sys, time
import packmule

class Noop(packmule.Runner):
    def noop(self, x):
        return x

    def count(self, values):
        return len(values)

runner = Noop()
runner.enqueue("noop", -1)
runner.wait(timeout=60)  # (workers up and warm)
kind = sys.argv[1]
start = time.perf_counter()
if kind == "fan":
    runner = Noop()
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(20_000))) == 20_000
else:
    for i in range(300):
        runner = Noop(f"small-{i}")
        assert runner.deferred_result("count", runner.enqueue_each("noop", range(3))) == 3
print(time.perf_counter() - start)
"""


def one_round(site: str, kind: str) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    env.update(PYTHONPATH=site, PACKMULE_WORKERS="2")
    out = subprocess.run([sys.executable, "-c", ROUND, kind], env=env, cwd=site, check=True,
                         capture_output=True, text=True, timeout=600).stdout
    return float(out.split()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="5e9f9e3", help="a commit to compare with")
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="packmule-bench-")
    kinds = ("fan", "small")
    try:
        sites = {"baseline": stage(a.baseline, os.path.join(tmp, "base")),
                 "today": stage(None, os.path.join(tmp, "now"))}
        took: dict[tuple[str, str], list[float]] = {(s, k): [] for s in sites for k in kinds}
        for r in range(a.repeat):
            order = list(sites.items())[::-1 if r % 2 else 1]  # (who goes first alternates: the second was slower)
            for kind in kinds:
                for name, site in order:
                    took[name, kind].append(one_round(site, kind))
            print(f"round {r + 1}: " + ", ".join(f"{n} {k} {took[n, k][-1]:.3f} s" for n, k in took), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nseconds, local backend, 2 workers, {a.repeat} rounds (ratio today / baseline; under 1 is faster):")
    for kind in kinds:
        base, now = took["baseline", kind], took["today", kind]
        print(f"  {kind:<6} baseline median {statistics.median(base):.3f} best {min(base):.3f}   "
              f"today median {statistics.median(now):.3f} best {min(now):.3f}   "
              f"ratio median {statistics.median(now) / statistics.median(base):.3f} "
              f"best {min(now) / min(base):.3f}")


if __name__ == "__main__":
    main()
