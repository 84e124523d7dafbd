"""Seeing a dead server (issue 17): ``packmule status`` and the dashboard's API show
each server's state — up, set aside since when and why, back since when — on a
real cluster of two beanstalkd, two memcached and a ZooKeeper, one server of
each of the first two killed (SIGKILL, by PID) and started again.  (The Queue
page's table of them is in ``test_browser.py``.)"""

from __future__ import annotations

import contextlib
import itertools
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import pytest

from conformance.harness import Harness, beanstalk_harness
from conformance.runners import Plain

WAIT = 60.0  # s any command, request or state change here may take before the test fails
_names = itertools.count()


@pytest.fixture
def split_cluster() -> Iterator[Harness]:
    """Two beanstalkd, two memcached, one ZooKeeper; no worker (nothing here runs jobs)."""
    with beanstalk_harness(concurrency=0, beanstalkds=2, memcacheds=2) as h:
        yield h


def packmule_status(h: Harness, *args: str) -> subprocess.CompletedProcess[str]:
    """``packmule status ARGS`` in a process of its own, with the cluster's variables."""
    return subprocess.run([sys.executable, "-m", "packmule", "status", *args], env=h.extras["env"],
                          cwd=h.extras["root"], capture_output=True, text=True, timeout=WAIT)


def server_lines(stdout: str) -> dict[str, str]:
    """The servers section of ``packmule status``: address -> its line."""
    head, found, section = stdout.partition("servers (beanstalk):\n")
    assert found, f"no servers section in:\n{stdout}"
    lines = [line.split() for line in section.splitlines() if line.startswith("  ")]
    return {words[1]: " ".join(words) for words in lines}


def kill_one_of_each(h: Harness) -> tuple[Any, Any]:
    """SIGKILL the second beanstalkd and the second memcached; (those two servers)."""
    queue, store = h.extras["beanstalkds"][1], h.extras["memcacheds"][1]
    queue.kill()
    store.kill()
    return queue, store


def test_status_shows_a_killed_server_of_each_kind_aside_with_its_address_and_the_others_up(split_cluster):
    # Given a cluster whose second beanstalkd and second memcached were killed, and a run started after
    live_queue, live_store = split_cluster.extras["beanstalkds"][0], split_cluster.extras["memcacheds"][0]
    zk = split_cluster.extras["zookeeper"]
    dead_queue, dead_store = kill_one_of_each(split_cluster)
    killed_at = time.time()
    runner = Plain(f"seen-{next(_names)}", backend=split_cluster.backend)
    runner.enqueue_each("work", range(3))
    # When an operator asks for the run's status, and for the status without a run
    for args in ((runner.name,), ()):
        done = packmule_status(split_cluster, *args)
        # Then each server has one line: the dead ones aside since the kill, saying why; the others up
        assert done.returncode == 0, done.stderr
        lines = server_lines(done.stdout)
        assert set(lines) == {live_queue.address, dead_queue.address, live_store.address, dead_store.address,
                              zk.address}, done.stdout
        assert lines[live_queue.address] == f"beanstalkd {live_queue.address} up"
        assert lines[live_store.address] == f"memcached {live_store.address} up"
        assert lines[zk.address] == f"ZooKeeper {zk.address} up, standalone"
        for service, server in (("beanstalkd", dead_queue), ("memcached", dead_store)):
            line = lines[server.address]
            assert line.startswith(f"{service} {server.address} aside since "), line
            since = line.split("aside since ")[1].split(" (")[0]
            gap = abs(_seconds_of_day(since) - _seconds_of_day(killed_at))
            assert min(gap, 86400 - gap) <= 2, line
            assert " ago): " in line and line.split(" ago): ")[1], f"no problem given: {line}"
        # and the run's own status comes first when it is named
        assert (f"run {runner.name} (generation " in done.stdout) == bool(args), done.stdout


def _seconds_of_day(when: str | float) -> int:
    """'14:03:05' (as status prints it), or a time.time(), as seconds since local midnight."""
    hms = when if isinstance(when, str) else time.strftime("%H:%M:%S", time.localtime(when))
    h, m, s = (int(part) for part in hms.split(":"))
    return h * 3600 + m * 60 + s


def test_status_of_a_run_whose_store_server_died_fails_naming_it_and_still_lists_the_servers(split_cluster):
    # Given a run whose state is on the second memcached, which is then killed
    dead_store = split_cluster.extras["memcacheds"][1]
    runner = None
    while runner is None or split_cluster.backend.store.holder(runner._pm_gen) != dead_store.address:
        runner = Plain(f"homed-{next(_names)}", backend=split_cluster.backend)
        runner.enqueue("work", 1)
    dead_store.kill()
    # When an operator asks for its status
    done = packmule_status(split_cluster, runner.name)
    # Then the command fails, saying the run's server is unavailable, and the servers section shows it aside
    assert done.returncode == 1, done.stdout
    assert dead_store.address in done.stderr, done.stderr
    assert server_lines(done.stdout)[dead_store.address].startswith(f"memcached {dead_store.address} aside since ")


# --- the dashboard's API --------------------------------------------------------------------------------
@contextlib.contextmanager
def dashboard(h: Harness) -> Iterator[Any]:
    """The dashboard of the cluster served from this process (a Watcher of the harness's backend)."""
    import httpx

    import packmule.web
    from packmule._driver.watcher import Watcher

    url = packmule.web.serve(port=0, background=True, watcher=Watcher(h.backend))
    try:
        with httpx.Client(base_url=url, timeout=WAIT) as client:
            yield client
    finally:
        url.stop()  # type: ignore[attr-defined]


def states_until(client: Any, what: str, check: Any) -> dict[str, dict[str, Any]]:
    """Poll ``GET /api/servers`` until ``check(states by address)`` holds; those states."""
    deadline = time.monotonic() + WAIT
    while True:
        answer = client.get("/api/servers")
        assert answer.status_code == 200, answer.text
        states = {s["server"]: s for s in answer.json()}
        if check(states):
            return states
        assert time.monotonic() < deadline, f"waited {WAIT}s for {what}; last: {states}"
        time.sleep(0.1)


def test_api_servers_shows_a_killed_server_aside_since_its_death_and_back_once_it_returns(split_cluster):
    pytest.importorskip("starlette", reason="packmule[web] is not installed")
    queues, stores = split_cluster.extras["beanstalkds"], split_cluster.extras["memcacheds"]
    zk = split_cluster.extras["zookeeper"]
    with dashboard(split_cluster) as client:
        # Given the dashboard of a cluster whose servers are all up
        before = states_until(client, "every server up", lambda s: all(x["state"] == "up" for x in s.values()))
        assert {a: s["service"] for a, s in before.items()} == {
            queues[0].address: "beanstalkd", queues[1].address: "beanstalkd",
            stores[0].address: "memcached", stores[1].address: "memcached", zk.address: "ZooKeeper"}
        assert all(set(s) == {"service", "server", "state", "since", "back", "problem", "role"}
                   for s in before.values())
        assert before[zk.address]["role"] == "standalone"
        # When one beanstalkd and one memcached are killed
        killed_at = time.time()
        dead_queue, dead_store = kill_one_of_each(split_cluster)
        dead = {dead_queue.address, dead_store.address}
        # Then the API shows them aside since then, with the problem, and the others up
        aside = states_until(client, "the killed servers aside",
                             lambda s: all(s[a]["state"] == "aside" for a in dead))
        for address, state in aside.items():
            if address in dead:
                assert killed_at - 1 <= state["since"] <= time.time(), state
                assert state["problem"] and state["back"] is None, state
            else:
                assert state["state"] == "up" and state["since"] is None, state
        # When they are started again (same ports; beanstalkd on its binlog)
        back_from = time.time()
        dead_queue.start()
        dead_store.start()
        # Then the API shows them up again, back since they returned, no longer aside
        back = states_until(client, "the killed servers back",
                            lambda s: all(s[a]["state"] == "up" for a in dead))
        for address in dead:
            assert back_from - 1 <= back[address]["back"] <= time.time(), back[address]
            assert back[address]["since"] is None and back[address]["problem"] == "", back[address]
