"""What a fork child of the process that started the local backend has, and
what it leaves alone: the parent's workers (started before the fork if they
were not yet, never started, replaced or stopped by the child, even at its
exit) and the parent's dashboard.  Each case runs in a fresh Python process of
its own, which forks: the test process's own backend state stays out of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx

from conformance.servers import free_port

WAIT = 60.0  # s the script may take (its own waits have deadlines of their own)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FORK_CHILD = """
import json, os, signal, sys
import psutil
from packmule.backends import local
from packmule.conformance.runners import Tree

def child(path):
    signal.alarm(40)  # (a child that hangs dies)
    try:  # (through the parent's own backend object, as a Runner made before the fork does)
        out = {"value": Tree(None, backend=local._coordinator).root(3), "children": len(psutil.Process().children())}
    except BaseException as exc:
        out = {"error": repr(exc)}
    with open(path, "w") as f:
        json.dump(out, f)
    sys.exit(0)  # (its atexit hooks run, as a gunicorn worker's do: the backend's close among them)

def forked(path):
    pid = os.fork()
    if pid == 0:
        child(path)
    return pid

def main(script, before_fork):
    runner = Tree(None)
    if before_fork == "run":
        runner.root(2)
    else:
        runner.update_progress()  # the backend is built, its workers not started
    backend = local._coordinator
    before = backend.worker_pids()
    pid = forked(script + ".child")
    at_fork = backend.worker_pids()
    _, status = os.waitpid(pid, 0)
    with open(script + ".child") as f:
        got = json.load(f)
    after = backend.worker_pids()
    _, status2 = os.waitpid(forked(script + ".child2"), 0)  # (the first one's exit left the backend whole)
    with open(script + ".child2") as f:
        got2 = json.load(f)
    print(json.dumps({"before": before, "at_fork": at_fork, "status": status, "child": got, "after": after,
                      "child2": [status2, got2], "parent": Tree(None).root(2)}))

main(*sys.argv[1:])
"""


def fork_child(tmp_path: Path, before_fork: str) -> dict[str, Any]:
    script = tmp_path / "fork_child.py"
    script.write_text(FORK_CHILD)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}, "PACKMULE_WORKERS": "2"}
    done = subprocess.run([sys.executable, str(script), str(script), before_fork], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    assert "error" not in out["child"], out["child"]["error"]
    return out


def test_a_fork_child_is_served_by_its_parents_workers_and_leaves_them_running_at_its_exit(tmp_path):
    out = fork_child(tmp_path, "run")
    assert len(out["before"]) == 2 and out["at_fork"] == out["before"]
    assert out["child"] == {"value": [[f"{i}.{j}" for j in range(3)] for i in range(3)], "children": 0}
    assert out["status"] == 0
    assert out["after"] == out["before"]  # none stopped, none replaced
    assert out["child2"] == [0, out["child"]]  # (nor the coordinator's socket removed)
    assert out["parent"] == [["0.0", "0.1"], ["1.0", "1.1"]]


def test_a_process_that_never_ran_a_job_starts_its_workers_before_it_forks(tmp_path):
    out = fork_child(tmp_path, "read")
    assert out["before"] == [] and len(out["at_fork"]) == 2
    assert out["child"]["value"] == [[f"{i}.{j}" for j in range(3)] for i in range(3)]
    assert out["child"]["children"] == 0  # (the child started none of its own)
    assert out["after"] == out["at_fork"]


DASHBOARD_CHILD = """
import json, os, signal, sys
from packmule._driver import dashboard as _dashboard
from packmule.conformance.runners import Tree

Tree(None).root(2)  # the first run: this process serves the dashboard
pid = os.fork()
if pid == 0:
    signal.alarm(40)
    Tree(None).root(2)
    with open(sys.argv[1], "w") as f:
        json.dump(_dashboard._served.get(os.getpid()), f)
    os._exit(0)
os.waitpid(pid, 0)
print(json.dumps({"parent": _dashboard._served.get(os.getpid())}), flush=True)
sys.stdin.read()  # (serving until the test closes stdin)
"""


def test_a_fork_child_does_not_serve_its_parents_dashboard(tmp_path):
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")},
           "PACKMULE_WORKERS": "2", "PACKMULE_DASHBOARD_PORT": str(port)}
    child_file = tmp_path / "child.json"
    with subprocess.Popen([sys.executable, "-c", DASHBOARD_CHILD, str(child_file)], env=env, cwd=ROOT,
                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        assert proc.stdout is not None and proc.stdin is not None and proc.stderr is not None
        try:
            parent = json.loads(proc.stdout.readline())["parent"]
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
                assert client.get("/api/runs", headers={"X-PackMule": "1"}).status_code == 200  # the parent's, still
        finally:
            proc.stdin.close()
            try:
                proc.wait(WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
        stderr = proc.stderr.read()
    assert parent == f"http://127.0.0.1:{port}"
    assert json.loads(child_file.read_text()) == f"not served by this fork child; its parent's: {parent}"
    assert stderr.count("dashboard at") == 1 and "not served" not in stderr, stderr
