"""No-op jobs per second through ``manage.py packmule_worker`` beside ``packmule worker``, in one run.

    python benchmarks/bench_django_worker.py [--n 5000] [--rounds 5] [--concurrency 2]

Starts beanstalkd, memcached and ZooKeeper on loopback ports (no worker), then, in
each round, each worker kind in turn (the order alternating between rounds), on
the same cluster:
- ``packmule worker --concurrency C``;
- ``python -m packmule.examples.django_shop packmule_worker --concurrency C``: the
  example project's ``manage.py`` (a file SQLite), so every job runs inside
  Django's connection handling (``close_old_connections()`` before and after it;
  the benchmark checks the hooks are installed in the worker).
Each kind is started, warmed (200 jobs), timed over N no-op jobs (``enqueue_each``
and a blocking ``deferred_result``), and stopped (drained).  Prints the median
jobs/s of each and the ratio Django / plain (target: at least 0.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import packmule  # noqa: E402
from conformance.harness import beanstalk_harness, stop_worker  # noqa: E402

WARM = 200
START_WAIT = 60.0  # s a worker may take to start serving


class HooksProbe(packmule.Runner):
    """(Imported by reference as ``benchmarks.bench_django_worker``.)"""

    record_return_values = True

    def hooks(self) -> list[str]:
        """The per-job hooks installed in the worker process that runs this job."""
        from packmule._model.job import HOOKS

        return [f"{fn.__module__}.{fn.__name__}" for fn in (*HOOKS.before, *HOOKS.after)]


def command(kind: str, concurrency: int) -> list[str]:
    base = ["packmule", "worker"] if kind == "plain" else ["packmule.examples.django_shop", "packmule_worker"]
    return [sys.executable, "-m", *base, "--concurrency", str(concurrency), "--log-level", "WARNING"]


def start(kind: str, concurrency: int, env: dict[str, str], backend: object) -> subprocess.Popen[bytes]:
    worker = subprocess.Popen(command(kind, concurrency), cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + START_WAIT
    while backend.queue.stats().workers < concurrency:  # type: ignore[attr-defined]
        assert worker.poll() is None, f"the {kind} worker exited with {worker.returncode}"
        assert time.monotonic() < deadline, f"the {kind} worker did not start serving"
        time.sleep(0.05)
    return worker


def timed(backend: object, n: int) -> float:
    from benchmarks._jobs import Bench

    runner = Bench(f"bench-django-{time.monotonic_ns()}", backend=backend)
    begin = time.perf_counter()
    assert runner.deferred_result("count", runner.enqueue_each("noop", range(n))) == n
    took = time.perf_counter() - begin
    runner.forget()
    return took


def hooks_in(backend: object) -> list[str]:
    from benchmarks import bench_django_worker as me  # (by reference: the workers import it by that name)

    probe = me.HooksProbe(f"bench-hooks-{time.monotonic_ns()}", backend=backend)
    ref = probe.enqueue("hooks")
    probe.wait(START_WAIT)
    hooks: list[str] = probe.get_return_value(ref)
    probe.forget()
    return hooks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=5000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--concurrency", type=int, default=2)
    a = ap.parse_args()
    rates: dict[str, list[float]] = {"plain": [], "django": []}
    with tempfile.TemporaryDirectory(prefix="bench-django-") as tmp, beanstalk_harness(concurrency=0) as h:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKMULE_", "DJANGO_"))}
        env.update(h.env, PYTHONPATH=ROOT, SHOP_DB=os.path.join(tmp, "shop.sqlite3"))
        subprocess.run([sys.executable, "-m", "packmule.examples.django_shop", "migrate", "-v", "0"], cwd=ROOT,
                       env=env, check=True)
        for r in range(a.rounds):
            for kind in (("plain", "django") if r % 2 == 0 else ("django", "plain")):
                worker = start(kind, a.concurrency, env, h.backend)
                serving = h.backend.queue.stats().workers
                try:
                    hooks = hooks_in(h.backend)
                    django_hooks = any("contrib.django.worker" in name for name in hooks)
                    assert django_hooks == (kind == "django"), (kind, hooks)
                    timed(h.backend, WARM)
                    rates[kind].append(a.n / timed(h.backend, a.n))
                finally:
                    stop_worker(worker)
                print(f"round {r + 1} {kind:>6}: {rates[kind][-1]:>8,.0f} jobs/s ({serving} serving)", flush=True)
    plain, django = statistics.median(rates["plain"]), statistics.median(rates["django"])
    print(f"N={a.n} no-op jobs, --concurrency {a.concurrency}, beanstalk on loopback, median of {a.rounds} rounds")
    print(f"  packmule worker                {plain:>8,.0f} jobs/s")
    print(f"  manage.py packmule_worker      {django:>8,.0f} jobs/s  (close_old_connections around each job)")
    print(f"  ratio Django / plain: {django / plain:.2f}x  (target >= 0.8x)")


if __name__ == "__main__":
    main()
