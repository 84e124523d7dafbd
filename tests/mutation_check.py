"""Does the conformance suite catch a broken backend or engine?  Plants one
defect at a time into a throwaway copy of the repository, runs the suite on
the ``local`` backend against that copy, and prints which test caught it.

    python tests/mutation_check.py            # every defect
    python tests/mutation_check.py -k lock    # those whose name contains 'lock'
    python tests/mutation_check.py -k lock,bury    # ... 'lock' or 'bury'

Not a pytest module (nothing here is named ``test_*``).  The copy is laid out as
packmule is installed (``packmule/``, ``packmule/backends/``,
``packmule/conformance/``) in a temp dir put first on ``PYTHONPATH``, so the
suite, the coordinator and the workers all import the copy, with no install per
defect; the packmule entry points of the running environment name backends by
module (``packmule.backends.local``), so they resolve to the copy too.

A defect counts as caught by the tests that fail with it and pass without it
(the copy is first run unchanged: its failures are listed, not counted).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUT = {"packmule": "packmule", "backends": "packmule/backends", "conformance": "packmule/conformance"}
SUITE_LIMIT = 300.0  # s: the suite on a broken backend must end within this
PYTEST_INI = """[pytest]
filterwarnings = error
addopts = -p no:cacheprovider
timeout = 300
"""


@dataclass
class Defect:
    name: str
    file: str  # in the repository's layout
    old: str  # text that must occur exactly once
    new: str


_THREAD_LOCK = '''_THREAD_LOCKS: dict[str, threading.Lock] = {}


@contextlib.contextmanager
def _thread_lock(name: str, timeout: float | None) -> Iterator[None]:
    lock = _THREAD_LOCKS.setdefault(name, threading.Lock())
    if not lock.acquire(timeout=-1 if timeout is None else timeout):
        raise TimeoutError(f"lock {name!r} not acquired within {timeout}s")
    try:
        yield
    finally:
        lock.release()


def _lock('''

_ACK_OLD = ("            for handle in handles:\n"
            "                if self._held(handle):\n                    del self.reserved")

_NON_ATOMIC_INCR_OLD = '''        with self.cond:
            for key, delta in deltas.items():
                value = self._live(key, now)
                if value is None:
                    out[key] = None
                    continue
                out[key] = self.values[key] = max(0, int(value) + delta)  # its expiry stays
'''
_NON_ATOMIC_INCR_NEW = '''        for key, delta in deltas.items():
            with self.cond:
                value = self._live(key, now)
            if value is None:
                out[key] = None
                continue
            time.sleep(0.001)
            with self.cond:
                out[key] = self.values[key] = int(value) + delta
'''

DEFECTS = [
    Defect("ack does nothing", "backends/local/core.py", _ACK_OLD,
           "            for handle in handles:\n                if False:\n                    del self.reserved"),
    Defect("queue never enforces time-to-run (core; the watchdog stays)", "backends/local/core.py",
           "if held is not None and held[0] == token and held[1] <= now:",
           "if False:"),
    Defect("lock excludes only within one process", "backends/local/client.py",
           "def _lock(", _THREAD_LOCK),
    Defect("lock excludes only within one process", "backends/local/client.py",
           "    return _filelock(path, name, timeout)", "    return _thread_lock(name, timeout)"),
    Defect("lapsed ack deletes the job another consumer holds", "backends/local/core.py", _ACK_OLD,
           "            for handle in handles:\n                if handle[0] in self.reserved:\n"
           "                    del self.reserved"),
    Defect("re-run of an enqueuing job counts its children again", "packmule/_worker/commit.py",
           "if o.ctx is not None and o.ctx.children and key in won:",
           "if o.ctx is not None and o.ctx.children:"),
    Defect("continuation values sorted (inside a job)", "packmule/_worker/engine.py",
           "        args, kwargs = spec.call\n",
           "        values = sorted(values)\n        args, kwargs = spec.call\n"),
    Defect("deferred_result values sorted (outside a job)", "packmule/_driver/waiting.py",
           "        if not self.record_return_values:\n            store.set_many(dict.fromkeys([*reader.keys",
           "        values = sorted(values)\n"
           "        if not self.record_return_values:\n            store.set_many(dict.fromkeys([*reader.keys"),
    Defect("a wake armed while a commit runs is missed (no re-read before the counts)", "packmule/_worker/commit.py",
           "        self.wakes.reread(self.store)  # (a driver may have armed while the batch ran)\n", ""),
    Defect("workers ignore cancel()", "packmule/_worker/engine.py",
           '        if p + "cancel" in got:\n            return [Outcome(item, t, p, "ack") for t in tasks]\n', ""),
    Defect("forget() leaves the old generation's counters", "packmule/_model/census.py",
           "    keys = [p + k for k in RUN_FIELDS]\n", "    keys = [p + k for k in RUN_FIELDS[3:]]\n"),
    Defect("non-atomic incr (read, sleep, write outside the lock)", "backends/local/core.py",
           _NON_ATOMIC_INCR_OLD, _NON_ATOMIC_INCR_NEW),
    Defect("bulk get drops a key", "backends/local/core.py",
           "        if int in map(type, found):\n",
           "        if len(found) > 50:  # a big read loses one value\n            found[len(found) // 2] = None\n"
           "        if int in map(type, found):\n"),
    Defect("dead consumer's jobs never given back", "backends/local/core.py",
           "mine = [jid for jid, held in self.reserved.items() if held[2] is owner]",
           "mine: list[int] = []"),
    Defect("touch does nothing", "backends/local/core.py",
           "            if self._held(handle):\n                token, _, owner = self.reserved[handle[0]]",
           "            if False:\n                token, _, owner = self.reserved[handle[0]]"),
    Defect("release ignores its delay", "backends/local/core.py",
           "                if delay > 0:\n                    heapq.heappush(self.delayed, (time.monotonic() + delay",
           "                if False:\n                    heapq.heappush(self.delayed, (time.monotonic() + delay"),
    Defect("bury makes the job ready again", "backends/local/core.py",
           "                del self.reserved[handle[0]]\n                self.buried.add(handle[0])",
           "                del self.reserved[handle[0]]\n                self.ready.append(handle[0])"),
    # issue 15: nothing a user names or raises reaches another run
    Defect("old key join (name, generation and field joined with ':')", "packmule/_model/keys.py",
           '    return f"pm{SEP}{name}"\n', '    return f"pm:{name}"\n'),
    Defect("old key join (name, generation and field joined with ':')", "packmule/_model/keys.py",
           '    return f"pm{SEP}{name}{SEP}{{{gen}}}{SEP}"\n', '    return f"pm:{name}:{{{gen}}}:"\n'),
    Defect("old method check (any callable but _pm_ names)", "packmule/_model/methods.py",
           '    if name.startswith("__") and name.endswith("__"):', "    if False:"),
    Defect("old method check (any callable but _pm_ names)", "packmule/_model/methods.py",
           '    if name.startswith("_pm_") or any(name in vars(base) for base in FRAMEWORK):',
           '    if name.startswith("_pm_"):'),
    Defect("old exception path (str(exc) unguarded, BaseException not caught)", "packmule/_worker/engine.py",
           "        except BaseException as exc:  # SystemExit and KeyboardInterrupt too",
           "        except Exception as exc:  # SystemExit and KeyboardInterrupt too"),
    Defect("old exception path (str(exc) unguarded, BaseException not caught)", "packmule/_worker/outcomes.py",
           '"exc_type": shown.exc_type, "message": shown.message,',
           '"exc_type": type(exc).__name__, "message": str(exc),'),
    Defect("signature comparison removed from the codec", "packmule/_transport/codec.py",
           "if len(blob) < HEAD or not compare_digest(mac(payload), blob[KEY_ID:HEAD]):",
           "if len(blob) < HEAD:"),
    Defect("spilled chunks joined in reverse", "packmule/_transport/spill.py",
           'out[key] = b"".join(got[chunk] for chunk in chunks)',
           'out[key] = b"".join(got[chunk] for chunk in reversed(chunks))'),
    Defect("a fork child talks on its parent's coordinator connection", "backends/local/client.py",
           "        self.ledger = LocalLedger(self)  # (in the coordinator: it outlives every worker)\n"
           "        forget_at_fork(self)\n",
           "        self.ledger = LocalLedger(self)  # (in the coordinator: it outlives every worker)\n"),
    Defect("a fork child gets no progress pusher of its own", "packmule/_driver/runner.py",
           "(self._pm_pusher is None or not self._pm_pusher.is_alive())", "self._pm_pusher is None"),
]


def stage(site: str, defects: list[Defect]) -> None:
    """(Re)build the installed layout under ``site`` from the repository, with ``defects`` planted."""
    for src, dst in LAYOUT.items():
        target = os.path.join(site, dst)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(os.path.join(ROOT, src), target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for d in defects:
        top, _, rest = d.file.partition("/")
        path = os.path.join(site, LAYOUT[top], rest)
        with open(path) as f:
            text = f.read()
        if text.count(d.old) != 1:
            raise SystemExit(f"defect {d.name!r}: the text to replace occurs {text.count(d.old)} times in "
                             f"{d.file}, not once; update the defect to the code")
        with open(path, "w") as f:
            f.write(text.replace(d.old, d.new))


def run_suite(site: str, log: str) -> tuple[set[str], float, str]:
    """The failed tests, the seconds the suite took, and its summary line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    env.update(PYTHONPATH=site, PACKMULE_CONFORMANCE_BACKENDS="local", PYTHONDONTWRITEBYTECODE="1")
    start = time.monotonic()
    with open(log, "w") as out, contextlib.suppress(subprocess.TimeoutExpired):  # (over the limit: see main)
        subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "--durations=20",  # (the slow ones, in the log)
                        "-c", os.path.join(site, "pytest.ini"), "--rootdir", site,
                        os.path.join(site, "packmule", "conformance")],
                       cwd=site, env=env, stdout=out, stderr=subprocess.STDOUT, timeout=SUITE_LIMIT + 60)
    took = time.monotonic() - start
    with open(log) as f:
        text = f.read()
    failed = set(re.findall(r"^(?:FAILED|ERROR) (\S+)", text, re.M))
    summary = next((line for line in reversed(text.splitlines()) if " in " in line and "=" not in line[:1]), "")
    return {name.split("::", 1)[-1] for name in failed}, took, summary.strip("= ")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-k", default="", help="only defects whose name contains this (or, comma-separated, "
                                                "any of these)")
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs of every run)")
    args = parser.parse_args()
    wanted = [part.strip().lower() for part in args.k.split(",")]
    names = list(dict.fromkeys(d.name for d in DEFECTS if any(w in d.name.lower() for w in wanted)))
    tmp = tempfile.mkdtemp(prefix="packmule-mutants-")
    site = os.path.join(tmp, "site")
    os.makedirs(site)
    with open(os.path.join(site, "pytest.ini"), "w") as f:
        f.write(PYTEST_INI)
    rows = []
    try:
        stage(site, [])
        base_failed, took, summary = run_suite(site, os.path.join(tmp, "baseline.log"))
        print(f"baseline (no defect): {summary} in {took:.0f} s", flush=True)
        for name in sorted(base_failed):
            print(f"  fails already: {name}", flush=True)
        for i, name in enumerate(names):
            stage(site, [d for d in DEFECTS if d.name == name])
            failed, took, _ = run_suite(site, os.path.join(tmp, f"defect-{i}.log"))
            caught = sorted(failed - base_failed)
            rows.append((name, caught, took))
            print(f"{name}: {'caught by ' + ', '.join(caught) if caught else 'MISSED'} ({took:.0f} s)", flush=True)
    finally:
        if args.keep:
            print(f"logs in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    width = max(len(name) for name, _, _ in rows) if rows else 10
    print(f"\n| {'defect':<{width}} | caught by (tests that fail only with it) | seconds |")
    print(f"|{'-' * (width + 2)}|------------------------------------------|---------|")
    for name, caught, took in rows:
        shown = f"{len(caught)}: {', '.join(caught)}" if caught else "MISSED"
        late = " (over the limit)" if took > SUITE_LIMIT else ""
        print(f"| {name:<{width}} | {shown} | {took:.0f}{late} |")
    missed = [name for name, caught, took in rows if not caught or took > SUITE_LIMIT]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
