"""What delays and priorities (issue 19) cost the no-op job path: today's code
beside e75a147 (the commit before them), in one alternating run per backend.

    python benchmarks/bench_timing_cost.py [--baseline e75a147] [--repeat 5]

It runs the two side-by-side benchmarks that stage a baseline commit from git:
``bench_registry_cost.py`` (local: no-op jobs per second and the workers' CPU
per job; its "registry on" row is today's code as shipped) and
``bench_failover_cost.py`` (beanstalk: one job's round trip p50/p99 and a
fan-out's jobs per second), each with ``--baseline``.  No assertion on speed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--baseline", default="e75a147", help="the commit before delays and priorities")
    ap.add_argument("--repeat", type=int, default=5)
    a = ap.parse_args()
    for script, extra in (("bench_registry_cost.py", ["--jobs", "20000"]), ("bench_failover_cost.py", [])):
        print(f"== {script} --baseline {a.baseline}", flush=True)
        code = subprocess.call([sys.executable, os.path.join(HERE, script), "--baseline", a.baseline,
                                "--repeat", str(a.repeat), *extra])
        if code:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
