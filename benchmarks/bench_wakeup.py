"""The driver's wake-up lag: how long after its last job ends a blocking wait returns (issue 18).

    python benchmarks/bench_wakeup.py [--repeat 3] [--durations 0.05,0.5,2,5] [--long]
                                      [--backends local,beanstalk] [--baseline COMMIT]

A single job sleeps for a duration and returns ``time.time()`` at its very end;
the driver, blocked in ``deferred_result`` (or in ``runner.wait()``), notes
``time.time()`` when the call returns; the lag is the difference (one machine,
one clock).  ``--long`` adds a 30 s job.

While it waits, the driver also sends commands to the servers; per second of the
job's length:

  beanstalk  from beanstalkd's ``cmd-*`` and memcached's key operations (``stats``
             before and after the call), less what the servers count when idle (the
             worker's reserves and registry beats, measured first over 5 s) and less
             what the same call costs for a job of 0 s (the job itself: enqueue, run,
             commit, one read), measured in the same round
  local      the requests the driver sends to the coordinator (its client's senders
             wrapped in the driver process), less those of the same call for a 0 s job

Each contender (each backend, for today's code and ``--baseline``'s) runs in a
driver process of its own with 2 worker processes; rounds alternate the order.
Medians and maxima are printed; no assertion on speed.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Any

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # (after a driver's staged packmule)

from benchmarks._measure import (
    Cluster,
    Node,
    arguments,
    delta,
    driver,
    idle_rate,
    load,
    median,
    per,
    run,
    staged,
    table,
    total,
)

VIAS = ("deferred_result", "wait")


def op_setup() -> dict[str, Any]:
    import packmule
    from benchmarks import _jobs

    counting = os.environ.get("PACKMULE_BACKEND") == "local" and _jobs.count_local_requests()
    for i in range(10):
        _jobs.round_trip(i)
    return {"packmule": packmule.__file__, "counting": bool(counting)}


def op_wake(seconds: float, via: str) -> dict[str, float]:
    """One job of ``seconds``; the lag of the wait ``via``, and the coordinator requests it sent."""
    from benchmarks import _jobs

    runner = _jobs.Bench(f"wake-{os.getpid()}-{time.monotonic_ns()}")
    start = time.time()
    requests = _jobs.REQUESTS[0]
    ref = runner.enqueue("nap", seconds)
    if via == "deferred_result":
        (ended,) = runner.deferred_result("collect", [ref])
        returned = time.time()
        sent = _jobs.REQUESTS[0] - requests
    else:
        runner.wait(timeout=seconds + 120)
        returned = time.time()
        sent = _jobs.REQUESTS[0] - requests
        ended = runner.get_return_value(ref)
    return {"lag": returned - ended, "took": returned - start, "requests": sent}


def main() -> None:
    ap = arguments(__doc__, repeat=3)
    ap.add_argument("--durations", default="0.05,0.5,2,5", help="job lengths, seconds")
    ap.add_argument("--long", action="store_true", help="also a 30 s job")
    a = ap.parse_args()
    durations = [float(d) for d in a.durations.split(",")] + ([30.0] if a.long else [])
    print(load(), flush=True)
    with staged(a.baseline) as sites, contextlib.ExitStack() as stack:
        cluster = stack.enter_context(Cluster()) if "beanstalk" in a.backends else None
        children: dict[str, tuple[Any, Node | None]] = {}
        idle: dict[str, dict[str, float]] = {}
        counting: dict[str, bool] = {}
        for name, site in sites.items():
            for backend in a.backends.split(","):
                child, node = driver(__file__, site, backend, cluster)
                stack.callback(child.close)
                label = f"{name} {backend}"
                info = child.call("setup")
                print(f"{label}: {info['packmule']}", flush=True)
                counting[label] = info["counting"]
                if node is not None:
                    idle[label] = idle_rate(node.beanstalkd, node.memcached, 5.0)
                    print(f"  idle: {total(idle[label]):.2f} commands/s", flush=True)
                children[label] = (child, node)
        lags: dict[tuple[str, str, float], list[float]] = {}
        rates: dict[tuple[str, str, float], list[float]] = {}
        for r in range(a.repeat):
            order = list(children) if r % 2 == 0 else list(children)[::-1]
            for label in order:
                child, node = children[label]
                for via in VIAS:
                    zero = None
                    for seconds in [0.0, *durations]:
                        before = node.commands() if node else None
                        got = child.call("wake", seconds, via)
                        if node is not None:
                            assert before is not None
                            cost = total(per(delta(before, node.commands()), idle[label], got["took"], 1))
                        else:
                            cost = got["requests"] if counting[label] else float("nan")
                        if seconds == 0.0:
                            zero = cost
                            continue
                        assert zero is not None
                        lags.setdefault((label, via, seconds), []).append(got["lag"])
                        rates.setdefault((label, via, seconds), []).append((cost - zero) / seconds)
            print(f"round {r + 1}: " + ", ".join(f"{k[0]} {k[1]} {k[2]:g}s {v[-1] * 1e3:.0f} ms"
                                                 for k, v in lags.items()), flush=True)
    print(f"\nwake-up lag (the wait's return after the job's end), {a.repeat} rounds; {load()}")
    rows = []
    for (label, via, seconds), values in lags.items():
        rate = median(rates[label, via, seconds])
        unit = "commands/s" if "beanstalk" in label else "requests/s"
        rows.append([label, via, f"{seconds:g}", f"{median(values) * 1e3:.1f}", f"{max(values) * 1e3:.1f}",
                     "n/a" if rate != rate else f"{rate:.1f} {unit}"])
    print(table(["contender", "wait", "job s", "lag median ms", "lag max ms", "sent while waiting"], rows, left=2))


if __name__ == "__main__":
    run(main, globals())
