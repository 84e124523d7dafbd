"""A thousand waits at once on one event loop (issue 20): ``await runner.await_result()``
against the same waits made with ``asyncio.to_thread(runner.wait)``, a thread per wait
(the loop's default executor sized to hold them all: what an async caller without
``await_result`` does).

    python benchmarks/bench_async_waits.py [--backend local|beanstalk] [--waits 1000] [--repeat 3]

A round makes --waits runs of one ``Gated.wait_for`` job each (held at a closed gate),
starts one wait per run on a fresh loop beside a ticker that sleeps 10 ms at a time,
opens the gate after HOLD s, and measures, until the last wait returns:

  wall      seconds from the gate opening to the last wait returning
  lag       how late the ticker's wakes were (ms past its 10 ms: p50, p99, max), over
            the whole round: the waits' cost to the loop's other tasks
  threads   the process's peak ``threading.active_count()``, sampled by the ticker, and
            how many more than at the round's start that is (``added``)

Both contenders run in this process, on one harness (``conformance.harness``: the local
backend with 2 workers, or a real beanstalkd + memcached + ZooKeeper started on loopback
with a ``packmule worker --concurrency 2``), rounds alternating their order; medians of
--repeat rounds are printed, and the ratios thread-per-wait / await_result.  A contender
whose round fails is reported and not run again (the next round starts once the threads
it left are gone): on beanstalk,
a thousand threads each open a memcached connection of their own, past memcached's
default limit of 1,024 connections (``-c``).  No assertion on speed.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # conformance.* (the workers get it through PYTHONPATH)

from conformance.harness import Harness, beanstalk_harness, local_harness  # noqa: E402
from conformance.runners import Gated  # noqa: E402

HOLD = 0.5  # s the waits wait at the closed gate before it opens
TICK = 0.010  # s the ticker sleeps
WAIT = 120.0  # s any wait may take
CONTENDERS = ("await_result", "to_thread(wait)")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


async def one_round(runners: list[Gated], gate: str, how: str) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    if how == "to_thread(wait)":
        loop.set_default_executor(ThreadPoolExecutor(len(runners) + 4))  # (a thread per wait, as asked)

    def waiting(runner: Gated) -> Any:
        if how == "await_result":
            return runner.await_result(timeout=WAIT)
        return asyncio.to_thread(runner.wait, WAIT)

    late: list[float] = []
    threads = [threading.active_count()]
    waits = [asyncio.ensure_future(waiting(r)) for r in runners]

    async def tick() -> None:
        while not all(w.done() for w in waits):
            before = time.perf_counter()
            await asyncio.sleep(TICK)
            late.append((time.perf_counter() - before - TICK) * 1000)
            threads.append(threading.active_count())

    ticker = asyncio.ensure_future(tick())
    await asyncio.sleep(HOLD)
    opened = time.perf_counter()
    Path(gate).touch()
    results = await asyncio.gather(*waits)
    wall = time.perf_counter() - opened
    await ticker
    assert all(str(p) == "1.0 / 1.0" for p in results), set(map(str, results))
    return {"wall": wall, "p50": pct(late, 0.5), "p99": pct(late, 0.99), "max": max(late, default=0.0),
            "threads": float(max(threads)), "added": float(max(threads) - threads[0])}


def runs_for(h: Harness, waits: int, gate: str) -> list[Gated]:
    runners = [Gated(f"bench-aio-{os.getpid()}-{time.monotonic_ns()}-{i}", backend=h.backend) for i in range(waits)]
    for i, runner in enumerate(runners):
        runner.enqueue("wait_for", i, gate)
    return runners


def settle_threads(before: int, limit: float = 60.0) -> None:
    """After a failed round, wait until the threads it left (blocking waits' recounts) are gone."""
    deadline = time.monotonic() + limit
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.5)
    names = collections.Counter(t.name.partition("(")[2].rstrip(")") or t.name for t in threading.enumerate())
    print(f"  ({threading.active_count()} threads left, {before} before the round: {dict(names)})", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backend", choices=("local", "beanstalk"), default="local")
    ap.add_argument("--waits", type=int, default=1000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    factory = local_harness if args.backend == "local" else beanstalk_harness
    figures: dict[str, list[dict[str, float]]] = {how: [] for how in CONTENDERS}
    failures: dict[str, str] = {}
    with factory() as h, tempfile.TemporaryDirectory(prefix="bench-aio-") as tmp:
        for n in range(args.repeat):
            order = CONTENDERS if n % 2 == 0 else CONTENDERS[::-1]
            for how in order:
                if how in failures:
                    continue  # (not again: the threads of its failed round may linger)
                gate = os.path.join(tmp, f"gate-{n}-{how}")
                runners = runs_for(h, args.waits, gate)
                before = threading.active_count()
                try:
                    got = asyncio.run(one_round(runners, gate, how))
                except Exception as exc:  # (a thread per wait may exhaust a server's connections)
                    Path(gate).touch()
                    failures[how] = f"{type(exc).__name__}: {exc}"[:300]
                    print(f"round {n + 1} {how:16} FAILED {failures[how]}", flush=True)
                    settle_threads(before)
                    continue
                figures[how].append(got)
                print(f"round {n + 1} {how:16} " + "  ".join(f"{k} {v:.4g}" for k, v in got.items()), flush=True)
                for runner in runners:
                    runner.forget()
    report(args, figures, failures)


def report(args: argparse.Namespace, figures: dict[str, list[dict[str, float]]], failures: dict[str, str]) -> None:
    med = {how: {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}
           for how, rounds in figures.items() if rounds}
    print(f"\n{args.waits} waits at once on one loop, {args.backend} backend, medians of the rounds "
          f"(load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores)")
    print(f"{'':18}{'rounds':>7}{'wall s':>9}{'lag p50 ms':>12}{'lag p99 ms':>12}{'lag max ms':>12}"
          f"{'peak threads':>14}{'added':>7}")
    for how in CONTENDERS:
        if how in med:
            m = med[how]
            print(f"{how:18}{len(figures[how]):7}{m['wall']:9.3f}{m['p50']:12.2f}{m['p99']:12.2f}{m['max']:12.2f}"
                  f"{m['threads']:14.0f}{m['added']:7.0f}")
        if how in failures:
            print(f"{how:18} failed (not run again): {failures[how]}")
    if len(med) == 2:
        a, b = med["await_result"], med["to_thread(wait)"]
        print("ratios thread-per-wait / await_result: " + "  ".join(
            f"{k} {b[k] / a[k]:.2f}x" if a[k] else f"{k} -" for k in ("wall", "p50", "p99", "max", "threads", "added")))

if __name__ == "__main__":
    main()
