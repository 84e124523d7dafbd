"""Two memcached servers, one killed for good: a dead store server costs the
runs whose state it held, and nothing else (issue 17).  Real servers and real
``packmule worker`` processes; the servers are stopped by PID."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap
import time

import pytest

import packmule
from conformance.harness import beanstalk_harness
from conformance.runners import Gated, Plain
from packmule._driver import waiting
from packmule._driver.run_state import current_gen
from packmule._driver.watcher import Watcher

WAIT = 60
_names = itertools.count()


@pytest.fixture
def two_stores():  # type: ignore[no-untyped-def]
    with beanstalk_harness(concurrency=2, memcacheds=2) as h:
        yield h


def _home(runner: packmule.Runner) -> str | None:
    return runner.backend.store.holder(runner._pm_gen) if runner._pm_gen else None


def _gated_runs(h, gate: str, each: int) -> dict[str, list[Gated]]:  # type: ignore[no-untyped-def]
    """Runs of ``each`` gated jobs, until each store server holds two of them: server -> its runs."""
    by_home: dict[str, list[Gated]] = {server.address: [] for server in h.extras["memcacheds"]}
    while min(map(len, by_home.values())) < 2:
        runner = Gated(f"gated-{next(_names)}", backend=h.backend)
        runner.enqueue_each("wait_for", range(each), gate)
        by_home[_home(runner)].append(runner)  # type: ignore[index]
    return by_home


def test_a_dead_store_server_costs_only_the_runs_it_held(two_stores, tmp_path, monkeypatch):
    # Given runs whose state is on each of two memcached servers, their jobs held at a gate
    monkeypatch.setattr(waiting, "OUTAGE_GRACE", 3.0)
    gate = str(tmp_path / "gate")
    live, dead = two_stores.extras["memcacheds"]
    by_home = _gated_runs(two_stores, gate, 20)
    # When one server is killed for good, and the gate opens
    dead.kill()
    open(gate, "w").close()
    # Then the runs on the live server complete with exact counts
    for runner in by_home[live.address]:
        assert runner.wait(timeout=WAIT) == "20.0 / 20.0"
        assert runner.update_progress().failed == 0
    # and each run on the dead one raises RunStateLost naming it
    for runner in by_home[dead.address]:
        with pytest.raises(packmule.RunStateLost, match=dead.address):
            runner.wait(timeout=WAIT)


def test_runs_started_after_a_store_server_died_all_complete_on_the_live_one(two_stores):
    # Given two memcached servers, one killed for good
    live, dead = two_stores.extras["memcacheds"]
    dead.kill()
    # When 10 runs of 20 jobs are started after the kill (the operator's probe)
    runners = []
    for n in range(10):
        runner = Plain(f"after-{n}", backend=two_stores.backend)
        runner.enqueue_each("work", range(20))
        runners.append(runner)
    # Then all 10 complete with exact counts, their state on the live server
    assert [r.wait(timeout=WAIT) for r in runners] == ["20.0 / 20.0"] * 10
    assert [r.update_progress().failed for r in runners] == [0] * 10
    assert {_home(r) for r in runners} == {live.address}
    states = {s.server: s.state for s in two_stores.backend.server_states() if s.service == "memcached"}
    assert states == {live.address: "up", dead.address: "aside"}


def test_the_dashboard_registry_survives_a_dead_store_server(two_stores):
    # Given two memcached servers, one killed for good
    _, dead = two_stores.extras["memcacheds"]
    dead.kill()
    # When runs start and the workers beat
    runner = Plain("registered-after", backend=two_stores.backend)
    runner.enqueue_each("work", range(5))
    assert runner.wait(timeout=WAIT) == "5.0 / 5.0"
    watcher = Watcher(two_stores.backend)
    # Then the registry lists the run and the workers again (written afresh on the live server)
    deadline = time.monotonic() + WAIT
    while not (watcher.workers() and any(r.name == "registered-after" for r in watcher.runs())):
        assert time.monotonic() < deadline, "the registry was not written again on the live server"
        time.sleep(0.1)
    assert watcher.run("registered-after").progress == "5.0 / 5.0"


def test_runs_spread_evenly_over_the_live_servers(two_stores):
    # Given two memcached servers, both up
    backend = two_stores.backend
    counts = {server.address: 0 for server in two_stores.extras["memcacheds"]}
    # When 200 runs start
    for n in range(200):
        runner = Plain(f"spread-{n}", backend=backend)
        runner.enqueue("work", n)
        counts[_home(runner)] += 1  # type: ignore[index]
    # Then each server holds about half of them (binomial(200, 1/2): 70..130 fails once in 10**7)
    assert all(70 <= c <= 130 for c in counts.values()), counts


DISAGREEING = textwrap.dedent("""
    import sys, packmule
    from conformance.runners import Gated, Plain
    name, gate = sys.argv[1], sys.argv[2]
    runner = Gated(name)
    runner.enqueue_each("wait_for", range(10), gate)
    print("joined", runner._pm_gen, flush=True)
    sys.stdin.readline()  # (the test cuts this process's way to the run's server)
    for fresh in (Gated(name), runner):
        try:
            fresh.enqueue_each("wait_for", range(10), gate)
            print("enqueued", fresh._pm_gen, flush=True)
        except packmule.BackendUnavailable as exc:
            print("refused", exc.server, flush=True)
    other = Plain(name + "-elsewhere")
    other.enqueue_each("work", range(7))
    print("other", other.backend.store.holder(other._pm_gen), flush=True)
""")


def test_processes_that_disagree_about_a_store_server_never_split_a_run(two_stores, tmp_path):
    # Given a run whose state is on the second memcached server, which one
    # process (a driver) reaches through a proxy, and the others directly;
    # every process names the servers by the same labels
    from conformance.servers import Proxy

    one, two = two_stores.extras["memcacheds"]
    env = two_stores.extras["env"]
    assert env["PACKMULE_MEMCACHED"] == f"m1={one.address},m2={two.address}"
    backend = two_stores.backend
    gate = str(tmp_path / "gate")
    proxy = Proxy(two.address)
    try:
        name = None
        for n in range(100):
            runner = Gated(f"split-{n}", backend=backend)
            runner.enqueue_each("wait_for", range(20), gate)
            if _home(runner) == two.address:
                name = runner.name
                break
        assert name is not None
        gen = runner._pm_gen
        child_env = dict(env, PACKMULE_MEMCACHED=f"m1={one.address},m2={proxy.address}")
        with subprocess.Popen([sys.executable, "-c", DISAGREEING, name, gate], env=child_env,
                              cwd=two_stores.extras["root"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) as child:
            try:
                assert child.stdout.readline().split() == ["joined", gen]  # (it joined the same generation)
                # When its way to that server is cut (the others still see it up)
                proxy.cut()
                child.stdin.write("go\n")
                child.stdin.flush()
                out = [child.stdout.readline().split() for _ in range(3)]
                assert child.wait(timeout=WAIT) == 0, child.stderr.read()[-3000:]
            finally:
                if child.poll() is None:
                    child.kill()
        # Then it neither starts another generation nor adds to this one: both enqueues are refused,
        # naming the server it cannot reach, and its runs elsewhere go on
        assert out == [["refused", proxy.address], ["refused", proxy.address], ["other", one.address]]
        assert current_gen(backend, name) == gen
        # and the run completes with exact counts: its 20 jobs and the 10 the other process added before the cut
        open(gate, "w").close()
        assert runner.wait(timeout=WAIT) == "30.0 / 30.0"
        assert runner.update_progress().failed == 0
        assert Plain(name + "-elsewhere", backend=backend).wait(timeout=WAIT) == "7.0 / 7.0"
    finally:
        proxy.close()
