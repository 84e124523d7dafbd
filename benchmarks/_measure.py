"""What the issue-18 benchmarks share: code staged from git, driver processes that
run one contender's code, real servers on loopback, and the servers' own counters.

Nothing here imports packmule: the parent process of a benchmark only starts and
reads processes, so that each contender (today's work tree, or ``--baseline
COMMIT`` staged from git) runs only its own code.  A contender's driver is a
:class:`Child`: the benchmark script itself run with ``--child`` and
``PYTHONPATH=<staged site>:<repository>``, answering one JSON line per request
(:func:`child_main`); its jobs are the runners of ``benchmarks/_jobs.py``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.append(ROOT)  # (after everything else: a child's staged packmule comes first)

from benchmarks.bench_registry_cost import stage  # noqa: E402

__all__ = ["LOCAL_ENV", "ROOT", "Child", "Cluster", "arguments", "child_main", "commands", "driver", "load",
           "memcached_stats", "pct", "run", "sites", "stage", "table"]


# --- contenders -------------------------------------------------------------------------------

def sites(baseline: str | None, tmp: str) -> dict[str, str]:
    """Contender name -> staged site: ``today`` (this work tree), and the baseline commit if given."""
    out = {"today": stage(None, os.path.join(tmp, "today"))}
    if baseline:
        out[f"base {baseline[:10]}"] = stage(baseline, os.path.join(tmp, "base"))
    return out


def child_env(site: str, env: dict[str, str]) -> dict[str, str]:
    """The environment of a process that runs ``site``'s packmule: no PACKMULE_ variable but ``env``'s."""
    out = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    out.update(env)
    out["PYTHONPATH"] = os.pathsep.join([site, ROOT])
    return out


class Child:
    """A driver process: ``script --child`` run on ``site``'s code; ``call(op, ...)`` runs
    ``op_<op>(...)`` of the script in it and returns what it returned."""

    def __init__(self, script: str, site: str, env: dict[str, str], *args: str) -> None:
        self.site = site
        self.proc = subprocess.Popen([sys.executable, os.path.abspath(script), "--child", *args],
                                     env=child_env(site, env), cwd=site, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def call(self, op: str, *args: Any) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps([op, *args]) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"driver process for {self.site} ended (exit {self.proc.wait()})")
        answer = json.loads(line)
        if "error" in answer:
            raise RuntimeError(f"{op} failed in the driver process:\n{answer['error']}")
        return answer["value"]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


LOCAL_ENV = {"PACKMULE_BACKEND": "local", "PACKMULE_WORKERS": "2"}


def arguments(doc: str | None, repeat: int, backends: bool = True) -> argparse.ArgumentParser:
    """The options every benchmark takes: ``--repeat``, ``--backends``, ``--baseline``."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeat", type=int, default=repeat, help="rounds")
    if backends:
        ap.add_argument("--backends", default="local,beanstalk")
    ap.add_argument("--baseline", help="a commit to compare with, staged from git")
    return ap


def driver(script: str, site: str, backend: str, cluster: Cluster | None) -> tuple[Child, Node | None]:
    """A driver process on ``site``'s code: on the local backend with 2 workers of its own, or
    on a node of ``cluster`` (its servers, and a worker of 2 processes) made for it."""
    if backend == "local":
        return Child(script, site, LOCAL_ENV), None
    if cluster is None:
        raise ValueError(f"no cluster for backend {backend!r}")
    node = cluster.node(site)
    return Child(script, site, node.env), node


def run(main: Callable[[], None], namespace: dict[str, Any]) -> None:
    """A benchmark script's entry: ``main()``, or with ``--child`` a driver process's loop
    serving the script's ``op_`` functions."""
    if "--child" in sys.argv:
        child_main({k: v for k, v in namespace.items() if k.startswith("op_")})
    else:
        main()


def child_main(handlers: dict[str, Callable[..., Any]]) -> None:
    """A driver process's loop: one JSON request a line on stdin, one JSON answer a line on
    the original stdout (whatever else prints goes to stderr)."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in sys.stdin:
        op, *args = json.loads(line)
        try:
            answer = {"value": handlers["op_" + op](*args)}
        except Exception:  # noqa: BLE001 (handed to the parent, which raises it)
            answer = {"error": traceback.format_exc()}
        out.write(json.dumps(answer) + "\n")
        out.flush()


# --- servers and their counters -----------------------------------------------------------------

def _ask(address: str, request: bytes, until: bytes) -> bytes:
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(request)
        data = b""
        while not data.endswith(until):
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            data += chunk
    return data


def beanstalkd_stats(address: str, tube: str | None = None) -> dict[str, str]:
    """beanstalkd's ``stats`` (or ``stats-tube``), read on a raw socket: one ``cmd-stats`` (or
    ``cmd-stats-tube``) more on the server."""
    request = b"stats\r\n" if tube is None else b"stats-tube %s\r\n" % tube.encode()
    data = _ask(address, request, b"\r\n")
    head, _, body = data.partition(b"\r\n")
    if not head.startswith(b"OK "):
        return {}
    need = int(head.split()[1]) + 2
    while len(body) < need:  # (rare: a reply larger than one read)
        body = _ask(address, request, b"\r\n").partition(b"\r\n")[2]
    out = {}
    for row in body.decode().splitlines():
        key, sep, value = row.partition(": ")
        if sep:
            out[key.strip()] = value.strip()
    return out


def memcached_stats(address: str) -> dict[str, str]:
    """memcached's ``stats`` (not a command it counts)."""
    data = _ask(address, b"stats\r\n", b"END\r\n").decode()
    return {parts[1]: parts[2] for parts in (row.split() for row in data.splitlines()) if len(parts) == 3}


MEMCACHED_COUNTERS = {"get": ("cmd_get",), "set/add": ("cmd_set",), "touch": ("cmd_touch",),
                      "incr": ("incr_hits", "incr_misses"), "decr": ("decr_hits", "decr_misses"),
                      "delete": ("delete_hits", "delete_misses")}


def commands(beanstalkd: str, memcached: str) -> Counter[str]:
    """Commands each server has counted so far, by command: ``bs:put``, ``mc:get`` (each key of a
    multi-get), ...  Reading them costs one ``bs:stats``, which :func:`delta` takes off."""
    out: Counter[str] = Counter()
    for key, value in beanstalkd_stats(beanstalkd).items():
        if key.startswith("cmd-"):
            out["bs:" + key[4:]] = int(value)
    mc = memcached_stats(memcached)
    for name, keys in MEMCACHED_COUNTERS.items():
        out["mc:" + name] = sum(int(mc.get(k, 0)) for k in keys)
    return out


def delta(before: Counter[str], after: Counter[str]) -> Counter[str]:
    """Commands between two readings, without the reading's own ``stats``."""
    out = Counter({k: after[k] - before.get(k, 0) for k in after})
    out["bs:stats"] -= 1
    return +out


def per(counts: Counter[str], idle_rate: dict[str, float], seconds: float, n: float) -> dict[str, float]:
    """Commands per unit (``n`` units over ``seconds``), less what the servers count when idle."""
    keys = set(counts) | set(idle_rate)
    return {k: (counts.get(k, 0) - idle_rate.get(k, 0.0) * seconds) / n for k in sorted(keys)}


def idle_rate(beanstalkd: str, memcached: str, seconds: float) -> dict[str, float]:
    """Commands per second the servers count while nothing runs (a worker's reserves and beats)."""
    before = commands(beanstalkd, memcached)
    time.sleep(seconds)
    return {k: v / seconds for k, v in delta(before, commands(beanstalkd, memcached)).items()}


def total(counts: dict[str, float]) -> float:
    return sum(counts.values())


def by_server(counts: dict[str, float]) -> str:
    """``35.0 = bs 4.0 (put 1, ...) + mc 31.0 (get 16, ...)``."""
    parts = []
    for server in ("bs", "mc"):
        mine = {k[3:]: v for k, v in counts.items() if k.startswith(server + ":") and abs(v) >= 0.005}
        detail = ", ".join(f"{k} {round(v, 2):g}" for k, v in sorted(mine.items(), key=lambda kv: -kv[1]))
        parts.append(f"{server} {sum(mine.values()):.2f} ({detail})")
    return f"{total(counts):.2f} = " + " + ".join(parts)


@dataclass
class Node:
    """One contender's beanstalkd and memcached, and what a process needs to reach them."""

    env: dict[str, str]
    beanstalkd: str
    memcached: str
    tube: str
    servers: list[Any] = field(default_factory=list)
    worker: subprocess.Popen[bytes] | None = None

    def commands(self) -> Counter[str]:
        return commands(self.beanstalkd, self.memcached)


class Cluster:
    """One ZooKeeper, and for each contender a beanstalkd and a memcached of its own (so that
    each one's counters are its own) with a ``packmule worker`` run on the contender's code."""

    def __init__(self, memcached_mb: int = 64) -> None:
        from conformance.servers import Memcached, servers_installed

        missing = servers_installed()
        if missing:
            raise SystemExit(f"beanstalk backend: {missing}")
        self.memcached_mb = memcached_mb

        class BigMemcached(Memcached):
            def command(self) -> list[str]:
                cmd = super().command()
                cmd[cmd.index("-m") + 1] = str(memcached_mb)
                return cmd

        self._memcached = BigMemcached
        self._stack = contextlib.ExitStack()
        self._tmp = self._stack.enter_context(tempfile.TemporaryDirectory(prefix="packmule-bench-cluster-"))
        self._zookeeper: Any = None

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def node(self, site: str, concurrency: int = 2, registry: bool = True, **env: str) -> Node:
        from conformance.servers import Beanstalkd, ZooKeeper

        if self._zookeeper is None:
            self._zookeeper = self._stack.enter_context(ZooKeeper(self._tmp))
        bs = self._stack.enter_context(Beanstalkd(self._tmp))
        mc = self._stack.enter_context(self._memcached(self._tmp))
        tube = f"bench{secrets.token_hex(3)}"
        node_env = {"PACKMULE_BACKEND": "beanstalk", "PACKMULE_BEANSTALKD": bs.address,
                    "PACKMULE_MEMCACHED": mc.address, "PACKMULE_ZOOKEEPER": self._zookeeper.address,
                    "PACKMULE_SECRET": secrets.token_hex(16), "PACKMULE_TUBE": tube,
                    "PACKMULE_REGISTRY": "1" if registry else "0", **env}
        node = Node(node_env, bs.address, mc.address, tube, [bs, mc])
        if concurrency:
            node.worker = self._start_worker(site, node, concurrency)
        return node

    def _start_worker(self, site: str, node: Node, concurrency: int) -> subprocess.Popen[bytes]:
        from conformance.harness import stop_worker

        worker = subprocess.Popen([sys.executable, "-m", "packmule", "worker", "--concurrency", str(concurrency),
                                   "--log-level", "WARNING", "--grace", "10"], env=child_env(site, node.env),
                                  cwd=site, stdin=subprocess.DEVNULL)
        self._stack.callback(stop_worker, worker)
        deadline = time.monotonic() + 60
        while int(beanstalkd_stats(node.beanstalkd, node.tube).get("current-watching", 0)) < concurrency:
            if worker.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"packmule worker ({site}) did not start serving (exit {worker.poll()})")
            time.sleep(0.1)
        return worker


# --- processes ------------------------------------------------------------------------------------

def tree(pid: int) -> list[int]:
    """``pid`` and every process under it."""
    import psutil

    try:
        return [pid] + [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for row in f:
            if row.startswith("Pss:"):
                return int(row.split()[1])
    return 0


# --- figures ---------------------------------------------------------------------------------------

def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100), nearest rank."""
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"


def table(headers: list[str], rows: list[list[Any]], left: int = 1) -> str:
    """Rows under headers, the first ``left`` columns aligned left, the others right."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i < left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@contextlib.contextmanager
def staged(baseline: str | None) -> Iterator[dict[str, str]]:
    """The contenders' sites, removed afterwards."""
    import shutil

    tmp = tempfile.mkdtemp(prefix="packmule-bench-")
    try:
        yield sites(baseline, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
