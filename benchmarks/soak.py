"""A chaos soak: a mixed workload while worker processes are SIGKILLed.

    python benchmarks/soak.py --backend local|beanstalk --minutes N
                              [--seed S] [--kill-every SECONDS] [--concurrency C]
                              [--deadline SECONDS] [--kinds tree,retried,...] [--load N]
                              [--failover]

Starts the backend through the conformance harness (``local``: a coordinator
and 2 worker processes; ``beanstalk``: beanstalkd, memcached and ZooKeeper on
loopback ports and ``packmule worker --concurrency 2``).  Then, for N minutes,
``--concurrency`` driver threads each start a run, wait for it and check it,
over and over; each run is one of these kinds (``soak_runners.py``):

  tree        a two-level fan-out; the root's value is the exact sum
  tree_file   the same with record_return_values=False; the root writes the sum to a file
  retried     leaves fail 1 or 2 times (counted in files), then succeed
  doomed      some leaves fail for good: get_return_value raises JobFailed naming the first
  slow        leaves that sleep 0.5 to 2.5 s
  big         5 MB arguments (made in the root job) and 5 MB values; one such run at a time
  fanin       the driver's own blocking deferred_result over enqueue_each

Every run's value and its counts (done == total == expected total, failed ==
expected failed) are computed from its parameters and checked.  A run is a
*mismatch* if it completes with another value or other counts, a *hang* if it
is not complete within --deadline seconds or its wait raises (RunStateLost,
NoWorkers, ...); an enqueue refused because a server is down is counted as
*refused* and the run is started again under a new name.

Meanwhile a chaos thread SIGKILLs a random worker process every --kill-every
seconds (0.5x to 1.5x, at random): only the harness's job processes, never the
coordinator or the ``packmule worker`` supervisor (both replace the dead).  On
the cluster it also restarts beanstalkd once (--restarts), on its binlog.

While a run is waited on, a watcher thread reads its progress every 20 ms
(``soak_watch.py``), and each progress the driver reads is checked too: at no
moment may ``done`` exceed ``total``.  A run's first read that does is printed
at once (``OVER <run>: done D > total T ...``) with the run's tree as the store
has it then (counters, value records, commit markers, continuations' arrived
counts); the run counts as *over*.  A hang is printed with its tree too.
``--load N`` starts N CPU hogs of its own (``while True: pass``, killed by PID
at the end): the races of a commit show under load; a quiet machine hides them.

``--failover`` (beanstalk only, issue 17; ``soak_failover.py``): 2 beanstalkd,
2 memcached and a 3-member ZooKeeper ensemble, and one server of each kind is
killed for good partway (a third of the way in, staggered; the worker kills go
on; no beanstalkd restart unless --restarts asks, and then of the live one).
A run that raises ``RunStateLost`` naming the dead memcached that holds its
state, or the dead beanstalkd that holds its remaining jobs, counts as *lost*
(expected); any other error is a hang, as before.

Each mismatch and hang is printed on its own line, then one summary line:

    soak local: 10.0 min, runs 412, jobs 123456, kills 97, restarts 0, refused 0, mismatches 0, hangs 0, over 0

(with --failover, ``lost N (memcached M, beanstalkd B)`` before the mismatches).

The exit status is 1 if there was any mismatch, hang or over.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # benchmarks.soak_runners, for this process and the local workers it starts

import packmule  # noqa: E402
from benchmarks.soak_failover import Failover  # noqa: E402
from benchmarks.soak_runners import Soak, expected_big, expected_tree, leaf_value  # noqa: E402
from benchmarks.soak_watch import Watcher, describe, start_hogs, stop_hogs  # noqa: E402
from conformance.harness import Harness, beanstalk_harness, local_harness  # noqa: E402

KINDS = {"tree": 3, "tree_file": 1, "retried": 2, "doomed": 1, "slow": 1, "big": 1, "fanin": 2}  # weights
REFUSED_PAUSE = 1.0  # s before starting again a run whose enqueue a down server refused


@dataclasses.dataclass
class Plan:
    """One run: what the driver queues and what it must find at the end."""

    kind: str
    name: str
    method: str
    args: tuple[Any, ...]
    total: int  # expected done == total
    failed: int = 0
    value: Any = None  # the root's value; for doomed, the text JobFailed must contain
    options: dict[str, Any] = dataclasses.field(default_factory=dict)  # Runner(...) keywords


def make_plan(kind: str, name: str, rng: random.Random) -> Plan:
    if kind in ("tree", "tree_file"):
        width, depth2 = rng.randint(2, 6), rng.randint(2, 40)
        record = kind == "tree"
        return Plan(kind, name, "tree" if record else "tree_to_file", (width, depth2), 1 + width + width * depth2,
                    value=expected_tree(width, depth2), options={"record_return_values": record})
    if kind == "retried":
        n, fails = rng.randint(3, 12), rng.randint(1, 2)
        return Plan(kind, name, "retried", (n, fails), 1 + n, value=sum(leaf_value(i, fails) for i in range(n)),
                    options={"max_retries": 3})
    if kind == "doomed":
        n = rng.randint(3, 10)
        bad = sorted(rng.sample(range(n), rng.randint(1, min(3, n - 1))))
        return Plan(kind, name, "doomed", (n, bad), 1 + n, failed=len(bad) + 1,
                    value=f"planned for good: item {bad[0]}", options={"max_retries": 1})
    if kind == "slow":
        naps = [round(rng.uniform(0.5, 2.5), 2) for _ in range(rng.randint(2, 4))]
        return Plan(kind, name, "slow", (naps,), 1 + len(naps), value=sum(leaf_value(i, 7) for i in range(len(naps))))
    if kind == "big":
        seeds = [rng.randrange(2**32) for _ in range(2)]
        return Plan(kind, name, "big", (seeds,), 1 + len(seeds), value=expected_big(seeds))
    if kind == "fanin":
        n = rng.randint(10, 300)
        return Plan(kind, name, "square", (n,), n, value=sum(leaf_value(i, 3) for i in range(n)))
    raise ValueError(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")


def short(x: Any, limit: int = 300) -> str:
    text = repr(x)
    return text if len(text) <= limit else text[:limit] + "..."


class Driver:
    """The driver: runs, checks and tallies; one instance per soak."""

    def __init__(self, harness: Harness, args: argparse.Namespace, scratch: str) -> None:
        self.h, self.args, self.scratch = harness, args, scratch
        self.kinds = [k for k in args.kinds.split(",") if k]
        for kind in self.kinds:
            if kind not in KINDS:
                raise SystemExit(f"unknown kind {kind!r}; known: {', '.join(KINDS)}")
        self.lock = threading.Lock()
        self.big_slot = threading.Semaphore(1)
        self.index = 0
        self.stop = threading.Event()  # no new runs
        self.drained = threading.Event()  # every run ended: chaos stops
        self.tally: Counter[str] = Counter()
        self.by_kind: Counter[tuple[str, str]] = Counter()
        self.problems: list[str] = []
        self.watcher = Watcher(self.say)
        self.failover: Failover | None = None  # (--failover: its kills, and which RunStateLost is expected)
        self.began: dict[str, float] = {}  # run name -> when the driver started it (a loss must follow a kill)

    def say(self, text: str) -> None:
        with self.lock:
            self.problems.append(text)
        print(text, file=sys.stderr, flush=True)

    # --- the workload -------------------------------------------------------------
    def next_plan(self) -> Plan:
        with self.lock:
            index = self.index
            self.index += 1
        rng = random.Random(f"{self.args.seed}:{index}")
        kind = rng.choices(self.kinds, [KINDS[k] for k in self.kinds])[0]
        return make_plan(kind, f"soak{self.args.seed}-{index}-{kind}", rng)

    def driver(self) -> None:
        while not self.stop.is_set():
            plan = self.next_plan()
            slot = self.big_slot if plan.kind == "big" else contextlib.nullcontext()
            with slot:
                outcome, detail = self.run(plan)
            with self.lock:
                self.tally["runs"] += 1
                self.tally["jobs"] += plan.total
                self.tally[outcome] += 1
                self.by_kind[(plan.kind, outcome)] += 1
                if outcome.startswith("lost "):
                    self.tally["lost"] += 1
            if outcome in ("mismatch", "hang"):
                self.say(f"{outcome.upper()} {plan.name} {plan.method}{short(plan.args, 120)}: {detail}")
            elif outcome.startswith("lost "):
                print(f"LOST (expected, {outcome[5:]} died) {plan.name}: {short(detail, 300)}", file=sys.stderr,
                      flush=True)

    def run(self, plan: Plan) -> tuple[str, str]:
        """Start the run (again under a new name while a server refuses), wait, check; forget it."""
        deadline = time.monotonic() + self.args.deadline
        while True:
            runner = Soak(plan.name, backend=self.h.backend, **plan.options)
            runner.scratch = self.scratch
            runner.wait_timeout = self.args.deadline  # the fanin's blocking deferred_result
            try:
                with self.watcher.watching(runner):
                    outcome, detail = self.start_and_check(runner, plan, deadline)
            except Exception as exc:  # a bug of the soak or an error nobody expects: say so, go on
                outcome, detail = "mismatch", f"the driver raised {type(exc).__name__}: {short(str(exc), 400)}"
            self.cleanup(runner)
            if outcome != "refused":
                return outcome, detail
            with self.lock:
                self.tally["refused"] += 1
            if time.monotonic() > deadline:
                return "hang", f"every enqueue refused for {self.args.deadline:g}s; last: {detail}"
            time.sleep(REFUSED_PAUSE)
            plan = dataclasses.replace(plan, name=plan.name + "r")

    def start_and_check(self, runner: Soak, plan: Plan, deadline: float) -> tuple[str, str]:
        self.began[runner.name] = time.monotonic()
        try:
            if plan.kind == "fanin":
                refs = runner.enqueue_each("square", range(plan.args[0]))
            else:
                runner.enqueue(plan.method, *plan.args)
        except packmule.BackendUnavailable as exc:  # a server is down: the run starts again
            self.progress_of(runner)  # (what the take-back of the jobs not queued left)
            return "refused", f"{type(exc).__name__}: {exc}"
        if plan.kind == "fanin":
            try:
                value = runner.deferred_result("total", refs)
            except Exception as exc:
                return self.hang(runner, "blocking deferred_result", exc)
            try:  # the counts, once the run is complete (a wait recounts one a kill left short)
                progress = runner.wait(timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:
                return self.hang(runner, "wait", exc)
            got: Any = value
        else:
            try:
                progress = runner.wait(timeout=max(1.0, deadline - time.monotonic()))
            except Exception as exc:
                return self.hang(runner, "wait", exc)
            got = self.root_value(runner, plan)
            if isinstance(got, packmule.RunStateLost):
                lost = self.lost(runner, got)
                if lost is not None:
                    return lost, f"its value: {type(got).__name__}: {got}"
        self.watcher.check(runner, progress, "driver's wait")
        counts = (progress.done, progress.total, progress.failed)
        want = (plan.total, plan.total, plan.failed)
        if counts != want:
            return "mismatch", f"counts (done, total, failed) {counts}, expected {want}; value {short(got)}"
        if not self.value_ok(plan, got):
            return "mismatch", f"value {short(got)}, expected {short(plan.value)}"
        if plan.kind == "retried":
            return self.check_tries(plan)
        return "ok", ""

    def hang(self, runner: Soak, what: str, exc: Exception) -> tuple[str, str]:
        """A wait that raised: what it said, the progress, and the run's tree (or,
        with --failover, a loss the death of a server explains)."""
        lost = self.lost(runner, exc)
        if lost is not None:
            return lost, f"{what} raised {type(exc).__name__}: {exc}"
        gen = self.watcher.gen_of(runner)
        tree = "\n" + describe(runner, gen) if gen else ""
        return "hang", f"{what} raised {type(exc).__name__}: {short(str(exc), 400)}; {self.progress_of(runner)}{tree}"

    def lost(self, runner: Soak, exc: BaseException) -> str | None:
        """``'lost <kind>'`` if ``exc`` is an expected loss of the run (--failover), else None."""
        if self.failover is None:
            return None
        began = self.began.get(runner.name, 0.0)
        kind = self.failover.lost(runner, self.watcher.gen_of(runner), began, exc)
        return None if kind is None else f"lost {kind}"

    def root_value(self, runner: Soak, plan: Plan) -> Any:
        """What the run produced: its root's value, the file it wrote, or the error it raised."""
        if plan.kind == "tree_file":
            try:
                with open(os.path.join(self.scratch, f"{plan.name}.result")) as f:
                    return int(f.read())
            except (OSError, ValueError) as exc:
                return exc
        try:
            return runner.get_return_value()
        except Exception as exc:
            return exc

    def value_ok(self, plan: Plan, got: Any) -> bool:
        if plan.kind == "doomed":
            return (isinstance(got, packmule.JobFailed) and got.method == "maybe_fail"
                    and got.exc_type == "ValueError" and plan.value in got.message)
        return bool(got == plan.value)

    def check_tries(self, plan: Plan) -> tuple[str, str]:
        """Each flaky leaf ran at least fails + 1 times (the failures really happened)."""
        n, fails = plan.args
        for i in range(n):
            path = os.path.join(self.scratch, f"{plan.name}.{i}.tries")
            try:
                with open(path) as f:
                    tries = sum(1 for _ in f)
            except OSError:
                tries = 0
            if tries < fails + 1:
                return "mismatch", f"item {i} ran {tries} times, expected at least {fails + 1}"
        return "ok", ""

    def cleanup(self, runner: Soak) -> None:
        """Drop what is left of the run (its unstarted jobs, its state) and its files."""
        with contextlib.suppress(Exception):
            progress = runner.update_progress()
            if not progress.complete:
                runner.cancel()
        with contextlib.suppress(Exception):
            runner.forget()
        for entry in os.listdir(self.scratch):
            if entry.startswith(runner.name + "."):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(self.scratch, entry))

    # --- chaos ---------------------------------------------------------------------------
    def chaos(self, protected: set[int], restart_at: list[float], restart: Callable[[], None] | None) -> None:
        rng = random.Random(f"{self.args.seed}:chaos")
        every = self.args.kill_every or 1.0
        while not self.drained.wait(every * rng.uniform(0.5, 1.5)):
            if restart is not None and restart_at and time.monotonic() >= restart_at[0]:
                restart_at.pop(0)
                try:
                    restart()
                    with self.lock:
                        self.tally["restarts"] += 1
                except Exception as exc:  # the soak must say so, not die
                    self.problems.append(f"RESTART FAILED: {type(exc).__name__}: {exc}")
                continue
            pids = [p for p in self.h.worker_pids() if p not in protected]
            if not self.args.kill_every or not pids:
                continue
            pid = rng.choice(pids)
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            with self.lock:
                self.tally["kills"] += 1

    def report_now(self, start: float) -> None:
        t = self.tally
        print(f"[{time.monotonic() - start:6.0f}s] runs {t['runs']}, kills {t['kills']}, restarts {t['restarts']}, "
              f"refused {t['refused']}, mismatches {t['mismatch']}, hangs {t['hang']}, over {len(self.watcher.over)}",
              file=sys.stderr, flush=True)

    def progress_of(self, runner: Soak) -> str:
        try:
            p = runner.update_progress()
        except Exception as exc:
            return f"progress unreadable ({type(exc).__name__}: {exc})"
        self.watcher.check(runner, p, "driver")
        return f"progress {p} failed {p.failed}"


def soak(harness: Harness, args: argparse.Namespace) -> int:
    scratch = tempfile.mkdtemp(prefix="packmule-soak-")
    s = Driver(harness, args, scratch)
    protected = {os.getpid()}
    coordinator = getattr(harness.backend, "_coordinator", None)
    if coordinator is not None:
        protected.add(coordinator.pid)
    supervisor = harness.extras.get("worker")
    if supervisor is not None:
        protected.add(supervisor.pid)
    start = time.monotonic()
    end = start + args.minutes * 60
    server = harness.extras.get("beanstalkd")
    if args.failover:  # one of each kind dies for good; a restart (asked for) is of the beanstalkd that lives
        s.failover = Failover(harness.extras, args.seed, start, args.minutes * 60).start()
        server = s.failover.survivor
    restarts = args.restarts if args.restarts is not None else (1 if server is not None and not args.failover else 0)
    restart_at = [start + args.minutes * 60 * (k + 1) / (restarts + 1) for k in range(restarts if server else 0)]
    chaos = threading.Thread(target=s.chaos, args=(protected, restart_at, server.restart if server else None),
                             name="chaos", daemon=True)
    drivers = [threading.Thread(target=s.driver, name=f"driver-{i}", daemon=True) for i in range(args.concurrency)]
    chaos.start()
    s.watcher.start()
    for d in drivers:
        d.start()
    try:
        while time.monotonic() < end:
            time.sleep(min(30.0, max(0.1, end - time.monotonic())))
            s.report_now(start)
    finally:
        s.stop.set()
        for d in drivers:  # each finishes its run in flight: at most --deadline, plus a start refused
            d.join(args.deadline * 3)
        s.drained.set()
        chaos.join(60)
        if s.failover is not None:
            s.failover.close()
            s.problems += s.failover.problems
        s.watcher.close()
        shutil.rmtree(scratch, ignore_errors=True)
    minutes = (time.monotonic() - start) / 60
    kinds = ", ".join(f"{k} {s.by_kind[(k, 'ok')]}/{sum(n for (kind, _), n in s.by_kind.items() if kind == k)}"
                      for k in s.kinds)
    for line in s.problems:
        print(line)
    print(f"ok per kind: {kinds}")
    t = s.tally
    lost = "" if s.failover is None else (
        f"lost {t['lost']} (memcached {t['lost memcached']}, beanstalkd {t['lost beanstalkd']}), ")
    mode = " --failover" if args.failover else ""
    print(f"soak {args.backend}{mode}: {minutes:.1f} min, runs {t['runs']}, jobs {t['jobs']}, kills {t['kills']}, "
          f"restarts {t['restarts']}, refused {t['refused']}, {lost}mismatches {t['mismatch']}, hangs {t['hang']}, "
          f"over {len(s.watcher.over)}")
    failed = t["mismatch"] or t["hang"] or s.watcher.over or any(p.startswith(("RESTART", "KILL")) for p in s.problems)
    return 1 if failed else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("local", "beanstalk"), default="local")
    ap.add_argument("--minutes", type=float, default=1.0)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--kill-every", type=float, default=3.0, help="mean seconds between SIGKILLs (0: none)")
    ap.add_argument("--concurrency", type=int, default=4, help="runs in flight at once")
    ap.add_argument("--deadline", type=float, default=120.0, help="seconds a run may take before it is a hang")
    ap.add_argument("--restarts", type=int, default=None, help="beanstalkd restarts (default 1 on beanstalk)")
    ap.add_argument("--kinds", default=",".join(KINDS), help=f"run kinds to mix (default {','.join(KINDS)})")
    ap.add_argument("--load", type=int, default=0, metavar="N",
                    help="CPU hogs of its own to run beside the soak (0: none)")
    ap.add_argument("--log-level", default="ERROR", help="of this process's packmule logger")
    ap.add_argument("--worker-log-level", default="ERROR", help="of the worker processes")
    ap.add_argument("--failover", action="store_true",
                    help="2 servers of each kind, one of each killed for good partway (beanstalk only)")
    args = ap.parse_args()
    if args.failover and args.backend != "beanstalk":
        ap.error("--failover needs --backend beanstalk")
    os.environ["PACKMULE_LOG_LEVEL"] = args.worker_log_level  # local workers
    os.environ["PACKMULE_TEST_WORKER_LOG"] = args.worker_log_level  # the harness's packmule worker
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(levelname)s %(message)s")
    harness = (local_harness() if args.backend == "local" else
               beanstalk_harness(beanstalkds=2, memcacheds=2, zookeepers=3) if args.failover else beanstalk_harness())
    with harness as h:
        hogs = start_hogs(args.load)
        try:
            code = soak(h, args)
        finally:
            stop_hogs(hogs)
    sys.exit(code)


if __name__ == "__main__":
    main()
