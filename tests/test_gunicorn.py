"""gunicorn ``--preload`` with 4 workers serving an app that used packmule
before the fork (``tests/gunicorn_app.py``): many concurrent requests, each a
run started and waited on in the worker that serves it, all answered right, by
all 4 workers; on the local backend, the master's coordinator and workers serve
them all, none restarted, and they end with the master.  Everything is started
here and stopped by PID, with a deadline on every wait."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest

from conformance.harness import beanstalk_harness
from conformance.servers import end_process, free_port

TESTS = os.path.dirname(os.path.abspath(__file__))
WORKERS = 4  # gunicorn's
START_WAIT = 60.0  # s for gunicorn to import the app (its boot run) and serve
REQUEST_WAIT = 60.0  # s a request may take
STOP_WAIT = 30.0  # s for gunicorn to stop after SIGTERM, and its processes to be gone
ROUNDS, PER_ROUND, CLIENTS = 5, 48, 12  # requests until every worker has served some


@pytest.fixture(params=["local", "beanstalk"])
def env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The environment gunicorn runs in: a backend of the kind named, for it alone."""
    if request.param == "local":  # (the app's import starts the coordinator and 2 workers, in the master)
        yield {**{k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")},
               "PACKMULE_BACKEND": "local", "PACKMULE_WORKERS": "2"}
        return
    with beanstalk_harness(concurrency=2) as harness:
        yield dict(harness.extras["env"])


class Served:
    def __init__(self, proc: subprocess.Popen[bytes], client: httpx.Client) -> None:
        self.proc, self.client = proc, client
        self.killed: list[int] = []  # processes of gunicorn's that had to be killed at the end


@contextlib.contextmanager
def gunicorn(env: dict[str, str], log: Path) -> Iterator[Served]:
    port = free_port()
    command = [sys.executable, "-m", "gunicorn", "--preload", "-w", str(WORKERS), "-b", f"127.0.0.1:{port}",
               "--chdir", TESTS, "--timeout", str(int(REQUEST_WAIT)), "--graceful-timeout", "10", "gunicorn_app:app"]
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    started = [proc.pid]
    served = Served(proc, httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=REQUEST_WAIT))
    client = served.client
    try:
        deadline = time.monotonic() + START_WAIT
        while True:
            assert proc.poll() is None, f"gunicorn exited with {proc.returncode}:\n{log.read_text()}"
            with contextlib.suppress(httpx.TransportError):
                if client.get("/pid").status_code == 200 and len(gunicorn_workers(proc.pid)) == WORKERS:
                    break
            assert time.monotonic() < deadline, f"gunicorn did not serve within {START_WAIT} s:\n{log.read_text()}"
            time.sleep(0.1)
        started += [child.pid for child in psutil.Process(proc.pid).children(recursive=True)]
        yield served
    finally:
        client.close()
        served.killed = stop(proc, started)


def stop(proc: subprocess.Popen[bytes], started: list[int]) -> list[int]:
    """SIGTERM to gunicorn's master (its graceful stop), SIGKILL past STOP_WAIT;
    then SIGKILL to any process it had that has not ended by itself (by PID):
    those are returned."""
    killed = [proc.pid] if end_process(proc, grace=STOP_WAIT) else []
    deadline = time.monotonic() + STOP_WAIT
    for pid in started[1:]:
        while running(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        if running(pid):
            with contextlib.suppress(psutil.NoSuchProcess):
                psutil.Process(pid).kill()
            killed.append(pid)
    return killed


def running(pid: int) -> bool:
    """(An ended process that nobody has reaped yet - a zombie - has ended.)"""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def expected(tag: str, width: int) -> dict[str, Any]:
    return {"progress": f"{width + 1}.0 / {width + 1}.0", "value": [f"{tag}:{k}" for k in range(width)],
            "sync": [[f"{i}.{j}" for j in range(width)] for i in range(width)], "booted": "2.0 / 2.0"}


def ask(client: httpx.Client, tag: str, width: int) -> dict[str, Any]:
    response = client.get("/run", params={"tag": tag, "width": width})
    answer: dict[str, Any] = response.json()
    assert response.status_code == 200, answer.get("error", answer)
    return answer


def load(client: httpx.Client) -> list[tuple[str, int, dict[str, Any]]]:
    """Rounds of concurrent requests, until every gunicorn worker has served some."""
    done: list[tuple[str, int, dict[str, Any]]] = []
    with ThreadPoolExecutor(CLIENTS) as pool:
        for round_ in range(ROUNDS):
            asked = [(f"r{round_}-{n}", 1 + n % 4) for n in range(PER_ROUND)]
            answers = pool.map(lambda a: ask(client, *a), asked, timeout=REQUEST_WAIT * 2)
            done += [(tag, width, answer) for (tag, width), answer in zip(asked, answers, strict=True)]
            if len({answer["pid"] for _, _, answer in done}) == WORKERS:
                break
    return done


def packmule_processes(master: int) -> set[int]:
    """The local backend's coordinator and workers: processes the master started besides gunicorn's workers."""
    return {child.pid for child in psutil.Process(master).children()
            if any(module in part for part in child.cmdline()
                   for module in ("packmule.backends.local", "packmule._worker.local_process"))}


def gunicorn_workers(master: int) -> set[int]:
    return {child.pid for child in psutil.Process(master).children()} - packmule_processes(master)


def test_gunicorn_preload_workers_each_run_and_wait_on_runs_of_their_own(env, tmp_path):
    # Given gunicorn --preload, whose master started and waited on a run as it imported the app
    with gunicorn(env, tmp_path / "gunicorn.log") as served:
        proc, client = served.proc, served.client
        local, workers = packmule_processes(proc.pid), gunicorn_workers(proc.pid)
        assert len(workers) == WORKERS and len(local) == (3 if env["PACKMULE_BACKEND"] == "local" else 0)
        # When many concurrent requests each start a run in a worker and wait on it
        done = load(client)
        # Then every answer is the run of that request, and every worker served some
        for tag, width, answer in done:
            assert {k: answer[k] for k in ("progress", "value", "sync", "booted")} == expected(tag, width), tag
            assert answer["master"] == proc.pid
        assert {answer["pid"] for _, _, answer in done} == workers
        # and the workers restarted no gunicorn worker nor any of the backend's processes, and started none
        assert packmule_processes(proc.pid) == local
        assert gunicorn_workers(proc.pid) == workers
        assert all(not psutil.Process(pid).children() for pid in workers)
    # and gunicorn stops, and with its master the coordinator and the workers it started
    assert proc.returncode == 0, (tmp_path / "gunicorn.log").read_text()
    assert served.killed == []
