"""One job's round trip beside its floor, in one run (issue 18).

    python benchmarks/bench_roundtrip.py [--repeat 10] [--per-round 100] [--backends local,beanstalk]
                                         [--baseline COMMIT] [--made-runs]

A round trip: enqueue one no-op job on a fresh run, block on ``deferred_result`` of
it (``benchmarks/_jobs.py``, ``round_trip``), timed in the driver.  The floors,
timed in this process the same way:

  local floor      ``multiprocessing.Pool(1).apply`` of a no-op: a pickle, a pipe and a
                   process wake-up each way
  beanstalk floor  a raw greenstalk echo between two processes: put, reserve, put a
                   reply, delete, reserve the reply, delete

Each contender (packmule on each backend, for today's code and ``--baseline``'s)
runs in a driver process of its own with 2 worker processes (local: its own
coordinator; beanstalk: its own beanstalkd and memcached, one ZooKeeper, a
``packmule worker --concurrency 2``).  Each round runs ``--per-round`` round
trips of every contender and floor, the order alternating between rounds.
p50/p99 over all round trips and the ratios to the floor's p50 are printed; no
assertion on speed.  ``--made-runs`` adds, for each, the round trip of a job on
a run made before (its generation in the store already): the difference is what
making a run by name, with exact counts, costs a one-job run.
"""

from __future__ import annotations

import contextlib
import functools
import multiprocessing
import os
import sys
import time
from collections.abc import Callable

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (after a driver's staged packmule)

from benchmarks._measure import (
    Cluster,
    arguments,
    driver,
    load,
    median,
    pct,
    run,
    staged,
    table,
)

LOCAL_FLOOR, BEANSTALK_FLOOR = "local floor: Pool(1).apply", "beanstalk floor: greenstalk echo"
MADE = ", run made before"


def noop(x: int) -> int:
    return x


def echo(address: tuple[str, int], requests: str, replies: str) -> None:
    import greenstalk

    with greenstalk.Client(address, use=replies, watch=requests) as client:
        while True:
            job = client.reserve()
            if job.body == "stop":
                client.delete(job)
                return
            client.put(job.body)
            client.delete(job)


class EchoFloor:
    """The beanstalk floor: a process that echoes each request to a reply tube."""

    def __init__(self, beanstalkd: str) -> None:
        import greenstalk

        host, port = beanstalkd.rsplit(":", 1)
        self.address = (host, int(port))
        tag = f"{os.getpid()}-{time.monotonic_ns()}"
        self.requests, self.replies = f"req-{tag}", f"rep-{tag}"
        self.proc = multiprocessing.get_context("fork").Process(target=echo, args=(self.address, self.requests,
                                                                                    self.replies))
        self.proc.start()
        self.client = greenstalk.Client(self.address, use=self.requests, watch=self.replies)

    def trips(self, n: int) -> list[float]:
        out = []
        for i in range(n):
            start = time.perf_counter()
            self.client.put(str(i))
            job = self.client.reserve(timeout=10)
            self.client.delete(job)
            out.append(time.perf_counter() - start)
        return out

    def close(self) -> None:
        self.client.put("stop")
        self.proc.join(10)
        self.client.close()


def op_setup() -> str:
    import packmule
    from benchmarks import _jobs

    for i in range(20):  # (workers up and warm)
        _jobs.round_trip(i)
    return packmule.__file__


def op_trips(n: int) -> list[float]:
    from benchmarks import _jobs

    return [_jobs.round_trip(i) for i in range(n)]


def op_made_trips(n: int) -> list[float]:
    from benchmarks import _jobs

    return [_jobs.round_trip_on_a_made_run(i) for i in range(n)]


def main() -> None:
    ap = arguments(__doc__, repeat=10)
    ap.add_argument("--per-round", type=int, default=100, help="round trips of each contender a round")
    ap.add_argument("--made-runs", action="store_true",
                    help="also a job's round trip on a run made before (the cost of making a run by name)")
    a = ap.parse_args()
    backends = a.backends.split(",")
    print(load(), flush=True)
    with staged(a.baseline) as sites, contextlib.ExitStack() as stack:
        contenders: dict[str, Callable[[int], list[float]]] = {}
        floor_of: dict[str, str] = {}
        if "local" in backends:
            pool = stack.enter_context(multiprocessing.get_context("fork").Pool(1))
            pool.apply(noop, (0,))

            def pool_trips(n: int) -> list[float]:
                out = []
                for i in range(n):
                    start = time.perf_counter()
                    pool.apply(noop, (i,))
                    out.append(time.perf_counter() - start)
                return out

            contenders[LOCAL_FLOOR] = pool_trips
        cluster = stack.enter_context(Cluster()) if "beanstalk" in backends else None
        for name, site in sites.items():
            for backend in backends:
                child, node = driver(__file__, site, backend, cluster)
                if node is not None and BEANSTALK_FLOOR not in contenders:
                    floor = EchoFloor(node.beanstalkd)
                    stack.callback(floor.close)
                    floor.trips(20)
                    contenders[BEANSTALK_FLOOR] = floor.trips
                stack.callback(child.close)
                label = f"{name} {backend}"
                print(f"{label}: {child.call('setup')}", flush=True)
                contenders[label] = functools.partial(child.call, "trips")
                floor_of[label] = LOCAL_FLOOR if backend == "local" else BEANSTALK_FLOOR
                if a.made_runs:
                    contenders[label + MADE] = functools.partial(child.call, "made_trips")
                    floor_of[label + MADE] = floor_of[label]
        took: dict[str, list[float]] = {name: [] for name in contenders}
        for r in range(a.repeat):
            order = list(contenders) if r % 2 == 0 else list(contenders)[::-1]
            for name in order:
                took[name] += contenders[name](a.per_round)
            print(f"round {r + 1}: " + ", ".join(f"{n} p50 {median(took[n][-a.per_round:]) * 1e3:.2f} ms"
                                                 for n in contenders), flush=True)
    print(f"\none job's round trip, {a.repeat} x {a.per_round} a contender, 2 worker processes; {load()}")
    rows = []

    def round_p50(values: list[float], r: int) -> float:
        return median(values[r * a.per_round:(r + 1) * a.per_round])

    for name, values in took.items():
        p50, p99 = pct(values, 50) * 1e3, pct(values, 99) * 1e3
        row = [name, f"{p50:.3f}", f"{p99:.3f}", f"{max(values) * 1e3:.1f}"]
        if name in floor_of:
            f50, f99 = pct(took[floor_of[name]], 50) * 1e3, pct(took[floor_of[name]], 99) * 1e3
            base, made = name.removesuffix(MADE), MADE if name.endswith(MADE) else ""
            today = pct(took["today " + base.rsplit(" ", 1)[-1] + made], 50) * 1e3
            # the floor wanders between rounds (a core's wake-up from idle): the ratio within each round too
            rounds = sorted(round_p50(values, r) / round_p50(took[floor_of[name]], r) for r in range(a.repeat))
            row += [f"{p50 / f50:.2f}x", f"{median(rounds):.2f}x ({rounds[0]:.1f}-{rounds[-1]:.1f})",
                    f"{p99 / f50:.2f}x", f"{p99 / f99:.2f}x", f"{p50 / today:.2f}x"]
        else:
            rounds = [round_p50(values, r) * 1e3 for r in range(a.repeat)]
            row += [f"(rounds {min(rounds):.3f}-{max(rounds):.3f})", "", "", "", ""]
        rows.append(row)
    print(table(["contender", "p50 ms", "p99 ms", "max ms", "p50/floor p50", "by round: median (range)",
                 "p99/floor p50", "p99/floor p99",
                 "p50 / today's"],
                rows))


if __name__ == "__main__":
    run(main, globals())
