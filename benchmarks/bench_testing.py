"""The pytest plugin (``packmule.testing``): what a test pays for its own backend.

    python benchmarks/bench_testing.py [--repeat 10]

Printed, side by side:

1. start-up: entering the fixture (coordinator up, workers spawned), the
   first job done after it, and teardown; medians and worst of --repeat;
2. a module of 20 small tests, each in a pytest process of its own run:
   with ``packmule_backend``; with the isolation that worked before it (the
   default backend, ``forget_backends()`` after each test); and with one shared
   backend and no isolation (the floor, leaks included);
3. the README's example file and a test whose job raises, timed per test by
   pytest, and how long the pytest process took to exit after its last test.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

MODULE_HEAD = '''import packmule
import pytest


class Adder(packmule.Runner):
    record_return_values = True

    def total(self, items):
        return self.deferred_result("add", self.enqueue_each("double", items))

    def double(self, x):
        return 2 * x

    def add(self, values):
        return sum(values)
'''
FIXTURE_TEST = '''

def test_{i}(packmule_backend):
    assert Adder("adder").total(range({i} + 5)) == ({i} + 5) * ({i} + 4)
    assert Adder("adder").update_progress() == "{n}.0 / {n}.0"
'''
FORGET_HEAD = '''

@pytest.fixture(autouse=True)
def fresh_backend():
    yield
    packmule.backends._choice.forget_backends()  # a private call: the only isolation there was
'''
PLAIN_TEST = '''

def test_{i}():
    runner = Adder()
    assert runner.total(range({i} + 5)) == ({i} + 5) * ({i} + 4)
'''

WATCH = '''import json, os, time
import pytest

def _write(record):
    with open(os.environ["WATCH_OUT"], "a") as f:
        f.write(json.dumps(record) + "\\n")

def pytest_runtest_logreport(report):
    _write({"test": report.nodeid.split("::")[-1], "when": report.when, "outcome": report.outcome,
            "duration": report.duration})

def pytest_runtest_logfinish(nodeid):
    _write({"finished_at": time.time()})
'''

FAILING = '''from test_shop import Shop

def test_a_price_job_that_raises(packmule_backend):
    Shop("shop").enqueue("price", -5)
    packmule_backend.join(timeout=60)
'''


def startup(repeat: int) -> dict[str, list[float]]:
    import packmule
    from packmule.testing import backend_for_test

    class One(packmule.Runner):
        def one(self) -> int:
            return 1

    out: dict[str, list[float]] = {"enter": [], "first job done": [], "teardown": []}
    for _ in range(repeat):
        t0 = time.perf_counter()
        with backend_for_test() as fixture:
            t1 = time.perf_counter()
            One().enqueue("one")
            fixture.join(timeout=30)
            t2 = time.perf_counter()
        t3 = time.perf_counter()
        out["enter"].append(t1 - t0)
        out["first job done"].append(t2 - t0)
        out["teardown"].append(t3 - t2)
    return out


def run_pytest(folder: Path, *args: str, workers: str = "") -> tuple[float, int, list[dict[str, object]], float]:
    """Wall time of a pytest process, its exit code, its watch records, and the
    seconds between its last test's end and its exit."""
    (folder / "watch_plugin.py").write_text(WATCH)
    watch = folder / "watch.jsonl"
    watch.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    env["WATCH_OUT"] = str(watch)
    if workers:
        env["PACKMULE_WORKERS"] = workers
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "watch_plugin", "-p", "no:cacheprovider",
                           *args], cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          timeout=600)
    wall = time.perf_counter() - start
    exited = time.time()
    records = [json.loads(line) for line in watch.read_text().splitlines()]
    last = max(float(r["finished_at"]) for r in records if "finished_at" in r)  # type: ignore[arg-type]
    if proc.returncode not in (0, 1):
        sys.stdout.write(proc.stdout.decode())
    return wall, proc.returncode, records, exited - last


def module(folder: Path, name: str, head: str, test: str) -> Path:
    body = head + "".join(test.format(i=i, n=i + 5) for i in range(20))
    path = folder / f"test_{name}.py"
    path.write_text(MODULE_HEAD + body)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=10)
    a = ap.parse_args()
    for var in [v for v in os.environ if v.startswith("PACKMULE_")]:
        del os.environ[var]

    print(f"1. start-up of packmule_backend (2 workers), {a.repeat} times: median / worst")
    for what, times in startup(a.repeat).items():
        print(f"   {what:<16} {statistics.median(times) * 1000:7.0f} ms / {max(times) * 1000:5.0f} ms")

    with tempfile.TemporaryDirectory(prefix="bench-testing-") as tmp:
        folder = Path(tmp)
        print("\n2. a module of 20 small tests (a fan-out of 5..24 jobs and a deferred_result each), one pytest "
              "process: wall time, time to exit after the last test")
        contenders = [
            ("packmule_backend", "", FIXTURE_TEST),
            ("forget_backends", FORGET_HEAD, PLAIN_TEST),
            ("shared, no isolation", "", PLAIN_TEST),
        ]
        walls = {}
        for i, (label, head, test) in enumerate(contenders):
            path = module(folder, f"module{i}", head, test)
            wall, code, _, exit_after = run_pytest(folder, path.name, workers="2")  # 2 workers for every one
            walls[label] = wall
            print(f"   {label:<22} {wall:6.2f} s   exit after last test {exit_after:5.2f} s   "
                  f"{'passed' if code == 0 else 'FAILED'}")

        print("\n3. README's example file, and a test whose job raises (join's timeout: 60 s)")
        (folder / "test_shop.py").write_text((ROOT / "tests" / "test_readme_testing_example.py").read_text())
        (folder / "test_fails.py").write_text(FAILING)
        wall, code, records, exit_after = run_pytest(folder, "test_shop.py", "test_fails.py")
        for r in records:
            if r.get("when") == "call":
                print(f"   {r['test']:<58} {r['outcome']:<7} {float(r['duration']):6.2f} s")  # type: ignore[arg-type]
        setups = [float(r["duration"]) for r in records if r.get("when") == "setup"]  # type: ignore[arg-type]
        print(f"   fixture setup: median {statistics.median(setups) * 1000:.0f} ms, worst {max(setups) * 1000:.0f} ms")
        print(f"   pytest process: {wall:.2f} s in all; exited {exit_after:.2f} s after its last test "
              f"(exit code {code}: 1 expected, one test fails on purpose)")


if __name__ == "__main__":
    main()
