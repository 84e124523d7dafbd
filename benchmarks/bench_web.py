"""The dashboard's figures (issue 9), on the local backend and on a real
beanstalkd + memcached + ZooKeeper cluster started as the test fixtures do.

    python benchmarks/bench_web.py [--backends local,beanstalk] [--runs 1000] [--requests 50]
                                   [--polls 3600] [--jobs 20000] [--repeat 3] [--only page,memory,cost]

page    With --runs runs in the registry, the response time of the runs page
        ``/`` and of ``/api/runs`` (median and p95 of --requests requests each),
        against the goal of 300 ms.
memory  The RSS of the process serving the dashboard over --polls rounds of
        ``/api/runs`` + ``/metrics`` + ``/api/workers`` (an hour of a page
        polling once a second, compressed into a loop without pauses), with an
        event stream of a running run open the whole time: RSS after a warm-up,
        every tenth of the way, and at the end.
cost    No-op jobs per second with the registry on and off
        (``PACKMULE_REGISTRY=1`` / ``0``, read by the workers), --jobs jobs a
        round, rounds alternating, medians of --repeat: the job path's cost of
        the registry, as a ratio.

The dashboard runs in a child process of this one (``--serve``, below): on the
local backend that child is also the driver of the runs it shows, as a local
run is visible only in its driver's process tree.  Figures are printed; no
assertion on speed.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # conformance.*, tests.* (the workers get it through PYTHONPATH)

from tests.web_runners import Gated  # noqa: E402

GOAL_MS = 300.0
READY_TIMEOUT = 600.0  # s the child may take to make its runs and serve
LONG_RUN = "bench-long-run"  # the running run whose event stream stays open


# --- the child: make the runs, serve the dashboard until stdin closes ---------------------------

def serve(runs: int) -> None:
    from packmule.backends._choice import get_backend

    from packmule._driver.watcher import Watcher
    from packmule.web import create_app
    from tests.browser import served

    backend = get_backend()
    try:
        made = [Gated(f"bench-{i:04d}", backend=backend) for i in range(runs)]
        for i, runner in enumerate(made):
            runner.enqueue_each("noop", range(1 + i % 5))
        for runner in made:
            runner.wait(timeout=READY_TIMEOUT)
        long = Gated(LONG_RUN, backend=backend, time_to_run=7200.0)
        long.enqueue_each("nap", range(2), 7200.0)
        with served(create_app(Watcher(backend))) as url:
            print(f"ready {url}", flush=True)
            sys.stdin.read()  # the parent closes it when done
        long.cancel()
    finally:
        backend.close()


@contextlib.contextmanager
def dashboard(env: dict[str, str], runs: int) -> Iterator[tuple[str, int]]:
    """A child serving the dashboard of the backend ``env`` names, with ``runs``
    runs made; yields its base URL and PID."""
    child = subprocess.Popen([sys.executable, __file__, "--serve", "--runs", str(runs)], env=env, cwd=ROOT,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert child.stdin is not None and child.stdout is not None
    timer = threading.Timer(READY_TIMEOUT, child.kill)
    timer.start()
    line = child.stdout.readline()
    timer.cancel()
    if not line.startswith("ready "):
        child.kill()
        raise SystemExit(f"the dashboard child did not get ready within {READY_TIMEOUT:g} s (said {line!r})")
    try:
        yield line.split()[1], child.pid
    finally:
        child.stdin.close()
        try:
            child.wait(60)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as reply:
        body: bytes = reply.read()
        return body


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# --- (i) page time, (ii) memory -----------------------------------------------------------------

def page_times(url: str, requests: int) -> None:
    listed = len(json.loads(get(url + "/api/runs")))
    print(f"  /api/runs lists {listed} runs")
    for path in ("/", "/api/runs"):
        get(url + path)  # warm
        took = []
        for _ in range(requests):
            start = time.perf_counter()
            size = len(get(url + path))
            took.append((time.perf_counter() - start) * 1000)
        p50, p95 = statistics.median(took), percentile(took, 95)
        verdict = "within" if p95 <= GOAL_MS else "OVER"
        print(f"  GET {path:<10} {size:>8} bytes  median {p50:7.1f} ms  p95 {p95:7.1f} ms  max {max(took):7.1f} ms"
              f"  ({verdict} the {GOAL_MS:g} ms goal)")


def memory_over_polls(url: str, pid: int, polls: int) -> None:
    import psutil

    host, port = url.removeprefix("http://").split(":")
    stream = http.client.HTTPConnection(host, int(port), timeout=None)
    stream.request("GET", f"/api/runs/{LONG_RUN}/events")
    reply = stream.getresponse()
    assert reply.status == 200, f"the event stream of {LONG_RUN} answered {reply.status}"
    events = {"count": 0}

    def read_events() -> None:
        with contextlib.suppress(Exception):
            for line in reply:
                events["count"] += line.startswith(b"data:")

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()
    rss = psutil.Process(pid).memory_info
    paths = ("/api/runs", "/metrics", "/api/workers")
    for _ in range(50):  # warm-up: imports, caches, first allocations
        for path in paths:
            get(url + path)
    start_rss, samples = rss().rss, []
    began = time.perf_counter()
    for i in range(1, polls + 1):
        for path in paths:
            get(url + path)
        if i % max(1, polls // 10) == 0:
            samples.append(rss().rss)
    took = time.perf_counter() - began
    end_rss = rss().rss
    open_at_end = reader.is_alive()
    with contextlib.suppress(OSError):
        stream.sock.shutdown(socket.SHUT_RDWR)  # type: ignore[union-attr]
    stream.close()
    mib = 1 << 20
    print(f"  {polls} polls x {len(paths)} requests in {took:.0f} s, event stream "
          f"{'still open' if open_at_end else 'CLOSED'} at the end ({events['count']} events)")
    print(f"  RSS start {start_rss / mib:.1f} MiB, end {end_rss / mib:.1f} MiB, growth "
          f"{(end_rss - start_rss) / mib:+.1f} MiB ({(end_rss - start_rss) / start_rss:+.1%})")
    print("  RSS every tenth: " + " ".join(f"{s / mib:.1f}" for s in samples))


# --- (iii) the registry's cost on the job path --------------------------------------------------

def noop_round(backend: object, jobs: int) -> float:
    runner = Gated(backend=backend)
    start = time.perf_counter()
    runner.enqueue_each("noop", range(jobs))
    runner.wait(timeout=READY_TIMEOUT)
    rate = jobs / (time.perf_counter() - start)
    runner.forget()
    return rate


def registry_cost(name: str, jobs: int, repeat: int, harness: object | None) -> None:
    rates: dict[str, list[float]] = {"1": [], "0": []}
    for _ in range(repeat):
        for setting in ("1", "0"):
            rates[setting].append(noop_round_with(name, setting, jobs, harness))
    on, off = statistics.median(rates["1"]), statistics.median(rates["0"])
    print(f"  registry on : {on:8.0f} jobs/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['1'])})")
    print(f"  registry off: {off:8.0f} jobs/s  (rounds: {', '.join(f'{r:.0f}' for r in rates['0'])})")
    print(f"  on / off = {on / off:.3f}")


def noop_round_with(name: str, setting: str, jobs: int, harness: object | None) -> float:
    if name == "local":
        from packmule.backends.local import LocalBackend

        os.environ["PACKMULE_REGISTRY"] = setting  # the workers started now read it
        try:
            backend = LocalBackend(workers=2)
            try:
                backend.ensure_workers()
                return noop_round(backend, jobs)
            finally:
                backend.close()
        finally:
            del os.environ["PACKMULE_REGISTRY"]
    from conformance.harness import start_worker, stop_worker

    extras = harness.extras  # type: ignore[attr-defined]
    env = extras["env"]
    extras["env"] = dict(env, PACKMULE_REGISTRY=setting)
    try:
        worker = start_worker(harness, 2)  # type: ignore[arg-type]
    finally:
        extras["env"] = env
    try:
        return noop_round(harness.backend, jobs)  # type: ignore[attr-defined]
    finally:
        stop_worker(worker)


# --- main -----------------------------------------------------------------------------------------

@contextlib.contextmanager
def cluster() -> Iterator[object]:
    from conformance.harness import beanstalk_harness

    with beanstalk_harness(concurrency=0) as h:
        yield h


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backends", default="local,beanstalk")
    ap.add_argument("--runs", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=50)
    ap.add_argument("--polls", type=int, default=3600)
    ap.add_argument("--jobs", type=int, default=20000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default="page,memory,cost")
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)  # the child
    a = ap.parse_args()
    if a.serve:
        serve(a.runs)
        return
    only = set(a.only.split(","))
    import packmule._model.registry as registry

    if "cost" in only and not hasattr(registry, "ENABLED"):
        raise SystemExit("packmule._model.registry has no ENABLED switch (PACKMULE_REGISTRY): measure the cost "
                         "against the commit before the registry instead")
    for name in a.backends.split(","):
        with contextlib.ExitStack() as stack:
            harness = None
            if name == "local":
                env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
                env.update(PACKMULE_BACKEND="local", PACKMULE_WORKERS="2")
            else:
                harness = stack.enter_context(cluster())
                env = dict(harness.extras["env"])  # type: ignore[attr-defined]
            env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
            if only & {"page", "memory"}:
                if harness is not None:
                    from conformance.harness import start_worker, stop_worker

                    stack.callback(stop_worker, start_worker(harness, 2))  # type: ignore[arg-type]
                with dashboard(env, a.runs) as (url, pid):
                    if "page" in only:
                        print(f"[{name}] page time with {a.runs} runs in the registry")
                        page_times(url, a.requests)
                    if "memory" in only:
                        print(f"[{name}] dashboard memory over {a.polls} polls")
                        memory_over_polls(url, pid, a.polls)
            if "cost" in only:
                print(f"[{name}] registry cost on the job path: {a.jobs} no-op jobs a round, 2 worker processes")
                if harness is not None:
                    stack.close()  # the page's worker gone: only the round's workers run jobs
                    harness = stack.enter_context(cluster())
                registry_cost(name, a.jobs, a.repeat, harness)


if __name__ == "__main__":
    main()
