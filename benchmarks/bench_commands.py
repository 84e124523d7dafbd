"""Server commands a job costs on beanstalk, counted by the servers themselves (issue 18).

    python benchmarks/bench_commands.py [--repeat 3] [--trips 50] [--fan 5000] [--baseline COMMIT]

Two figures, each from beanstalkd's and memcached's own ``stats`` read before and
after (beanstalkd: every ``cmd-*``; memcached: ``cmd_get`` - each key of a
multi-get counts -, ``cmd_set`` - set, add, cas... -, ``cmd_touch``, and the hits
plus misses of incr, decr and delete):

  round trip  one job's round trip (enqueue one no-op job on a fresh run, block on
              ``deferred_result`` of it), averaged over ``--trips`` one after another
  fan-out     per job of ``enqueue_each`` of ``--fan`` no-op jobs and one blocking
              ``deferred_result`` over them

A ``packmule worker`` reserves with a timeout and beats every 2 s (the registry)
also when idle: what the servers count in an idle 5 s, per second, is taken off
(the first figure), and each contender also runs on a worker with
``PACKMULE_REGISTRY=0`` (the second figure).  Each contender has its own
beanstalkd and memcached, so each one's counters are its own; the driver
processes stay up between rounds (their connections made once).  Medians over
the rounds, broken down by command; no assertion.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (after a driver's staged packmule)

from benchmarks._measure import (
    Child,
    Cluster,
    Node,
    arguments,
    by_server,
    delta,
    idle_rate,
    load,
    median,
    per,
    run,
    staged,
    total,
)


def op_setup() -> str:
    import packmule
    from benchmarks import _jobs

    for i in range(10):
        _jobs.round_trip(i)
    op_fan(200)
    return packmule.__file__


def op_trips(n: int) -> None:
    from benchmarks import _jobs

    for i in range(n):
        _jobs.round_trip(i)


def op_fan(n: int) -> None:
    from benchmarks import _jobs

    runner = _jobs.Bench(f"fan-{os.getpid()}-{time.monotonic_ns()}")
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(n))) == n


def main() -> None:
    ap = arguments(__doc__, repeat=3, backends=False)
    ap.add_argument("--trips", type=int, default=50, help="round trips a round")
    ap.add_argument("--fan", type=int, default=5000, help="jobs of the fan-out")
    ap.add_argument("--idle", type=float, default=5.0, help="seconds of idle servers measured")
    a = ap.parse_args()
    print(load(), flush=True)
    with staged(a.baseline) as sites, contextlib.ExitStack() as stack:
        cluster = stack.enter_context(Cluster())
        nodes: dict[str, tuple[Child, Node]] = {}
        idle: dict[str, dict[str, float]] = {}
        for name, site in sites.items():
            for registry in (True, False):
                label = f"{name}, registry {'on' if registry else 'off'}"
                node = cluster.node(site, registry=registry)
                child = Child(__file__, site, node.env)
                stack.callback(child.close)
                print(f"{label}: {child.call('setup')}", flush=True)
                nodes[label] = (child, node)
        for label, (_, node) in nodes.items():
            idle[label] = idle_rate(node.beanstalkd, node.memcached, a.idle)
            print(f"{label}: idle {by_server(idle[label])} commands/s", flush=True)
        figures: dict[tuple[str, str], list[dict[str, float]]] = {}
        for r in range(a.repeat):
            order = list(nodes) if r % 2 == 0 else list(nodes)[::-1]
            for label in order:
                child, node = nodes[label]
                for kind, op, n in (("round trip", "trips", a.trips), ("fan-out", "fan", a.fan)):
                    before, start = node.commands(), time.monotonic()
                    child.call(op, n)
                    counts = delta(before, node.commands())
                    figures.setdefault((label, kind), []).append(per(counts, idle[label], time.monotonic() - start, n))
            print(f"round {r + 1}: " + ", ".join(f"{k[0]} {k[1]} {total(v[-1]):.2f}" for k, v in figures.items()),
                  flush=True)
    print(f"\nserver commands per job on beanstalk (2 worker processes), medians of {a.repeat} rounds, "
          f"idle rate taken off; {load()}")
    for (label, kind), rounds in figures.items():
        keys = {k for counts in rounds for k in counts}
        med = {k: median([counts.get(k, 0.0) for counts in rounds]) for k in keys}
        n = a.trips if kind == "round trip" else a.fan
        what = "one job's round trip" if kind == "round trip" else f"a job of a fan-out of {n}"
        print(f"  {label:<28} {what:<28} {by_server(med)}")
        print(f"  {'':<28} {'':<28} rounds: {', '.join(f'{total(c):.2f}' for c in rounds)}")


if __name__ == "__main__":
    run(main, globals())
