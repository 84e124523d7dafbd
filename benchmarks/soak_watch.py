"""What ``benchmarks/soak.py`` keeps around its runs: a watcher that reads each
run's progress while the driver waits on it and checks ``done <= total`` at
every read, the dump of a run's tree (``packmule._model.census``) that shows where
a count went wrong, and CPU hogs (``--load``), because an idle machine hides
the races that a busy one opens."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

from packmule._core.types import Progress
from packmule._driver.runner import Runner
from packmule._model import census as _census
from packmule._model.keys import prefix
from packmule._transport.codec import signer_for
from packmule._transport.spill import gather

EVERY = 0.02  # s between the watcher's reads of one run's progress


class Watcher:
    """Reads the progress of every run being waited on, every EVERY seconds, in
    a thread of its own; ``check`` is also called with each progress the driver
    reads.  The first read of a run with ``done > total`` is reported at once
    (``report``: one line, then the run's tree); the run counts as *over*."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self.report = report
        self.lock = threading.Lock()
        self.runs: dict[str, tuple[Runner, float]] = {}  # name -> (its runner, when the watch began)
        self.gens: dict[str, str] = {}  # name -> the generation seen (deferred_result forgets its own)
        self.over: set[str] = set()
        self.reads = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="soak-watcher", daemon=True)

    def start(self) -> Watcher:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)

    @contextlib.contextmanager
    def watching(self, runner: Runner) -> Iterator[None]:
        with self.lock:
            self.runs[runner.name] = (runner, time.monotonic())
        try:
            yield
        finally:
            with self.lock:
                self.runs.pop(runner.name, None)
                self.gens.pop(runner.name, None)

    def gen_of(self, runner: Runner) -> str | None:
        gen = runner._pm_gen or self.gens.get(runner.name)
        if gen is not None:
            self.gens[runner.name] = gen
        return gen

    def check(self, runner: Runner, progress: Progress | None, where: str) -> bool:
        """Whether ``progress`` keeps ``done <= total``; if not, and it is the
        run's first such read, report it with the run's tree."""
        self.reads += 1
        if progress is None or progress.done <= progress.total:
            return True
        with self.lock:
            first = runner.name not in self.over
            self.over.add(runner.name)
            began = self.runs.get(runner.name, (runner, time.monotonic()))[1]
        if first:
            gen = self.gen_of(runner)
            text = (f"OVER {runner.name}: done {progress.done} > total {progress.total} (failed {progress.failed}), "
                    f"read by the {where} {time.monotonic() - began:.2f}s into its wait")
            self.report(text + "\n" + (describe(runner, gen) if gen else "  (no generation known)"))
        return False

    def _run(self) -> None:
        while not self.stop.wait(EVERY):
            with self.lock:
                runners = [runner for runner, _ in self.runs.values()]
            for runner in runners:
                gen = self.gen_of(runner)
                if gen is None:
                    continue
                with contextlib.suppress(Exception):  # (a run lost or forgotten: the driver says so)
                    self.check(runner, runner._state().progress(gen, missing_ok=True), "watcher")


def _kinds(records: dict[str, Any], paths: list[str]) -> str:
    tally = Counter(records[path][0] if path in records else "none" for path in paths)
    return ", ".join(f"{kind} {n}" for kind, n in sorted(tally.items()))


def describe(runner: Runner, gen: str) -> str:
    """The run's tree as the store has it now: its counters, what its value
    records say (as a recount reads them), and each job that enqueued, with
    its commit marker, its children's values and its continuations' counts."""
    backend = runner.backend
    store, signer, p = backend.store, signer_for(backend), prefix(runner.name, gen)
    try:
        counters = store.get_many([p + k for k in ("done", "total", "failed", "seq")])
        nodes = _census.walk(store, p, with_values=True)
        raw = {path: n.value for path, n in nodes.items() if n.value is not None}
        records = dict(zip(raw, signer.loads_many(gather(store, signer, raw).values()), strict=True))
        specs = [path for path, n in nodes.items() if n.spec is not None]
        arrived = store.get_many([p + "n:" + path for path in specs])
    except Exception as exc:
        return f"  (tree unreadable: {type(exc).__name__}: {exc})"
    jobs = [path for path, n in nodes.items() if n.spec is None and records.get(path) != ("void",)]
    head = ", ".join(f"{k} {counters.get(p + k, b'gone').decode()}" for k in ("done", "total", "failed", "seq"))
    lines = [f"  tree of {runner.name} generation {gen}: counters {head}; the records say jobs {len(jobs)}, "
             f"with a value {sum(1 for path in jobs if path in records)} ({_kinds(records, jobs)})"]
    for path, node in nodes.items():
        if not node.positions and node.spec is None and path in records:
            continue  # a leaf that completed: counted in the lines above
        what = [f"value {records[path][0] if path in records else 'none'}"]
        if node.positions:
            kids = [c for c in node.children if nodes[c].spec is None]
            what.append(f"cm {node.positions}: {len(kids)} jobs ({_kinds(records, kids)})")
        if node.spec is not None:
            what.append(f"continuation, arrived {arrived.get(p + 'n:' + path, b'none').decode()}")
        lines.append(f"    {path:<10} " + "; ".join(what))
    return "\n".join(lines[:60] + ([f"    ... {len(lines) - 60} more"] if len(lines) > 60 else []))


def start_hogs(n: int) -> list[subprocess.Popen[bytes]]:
    """``n`` processes that each keep a CPU busy (``while True: pass``)."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)
            for _ in range(n)]


def stop_hogs(hogs: list[subprocess.Popen[bytes]]) -> None:
    for hog in hogs:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hog.pid, signal.SIGKILL)
        hog.wait()
