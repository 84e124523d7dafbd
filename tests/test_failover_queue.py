"""Queue failover (issue 17): with two beanstalkd servers, one killed (``kill -9``)
is not an outage.  New jobs go to the live one, workers keep serving it, and
the jobs queued on the dead one run, once each in the counts, when it is back
on its binlog.  Real servers and real ``packmule worker`` processes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import greenstalk
import pytest
from packmule.backends.base import Put

import packmule
from conformance.harness import Harness, beanstalk_harness, start_worker, stop_worker
from conformance.runners import Gated, Worky
from conformance.servers import Beanstalkd
from packmule._driver import waiting
from packmule._driver.waiting import STALLED_AFTER
from packmule._model import census
from packmule._worker.engine import UNREACHABLE_BURY

WAIT = 60


@pytest.fixture
def cluster() -> Iterator[Harness]:
    """Two beanstalkd servers and one 2-process worker."""
    with beanstalk_harness(concurrency=2, beanstalkds=2) as h:
        yield h


@pytest.fixture
def idle_cluster() -> Iterator[Harness]:
    """Two beanstalkd servers and no worker."""
    with beanstalk_harness(concurrency=0, beanstalkds=2) as h:
        yield h


def _servers(h: Harness) -> list[Beanstalkd]:
    servers: list[Beanstalkd] = h.extras["beanstalkds"]
    return servers


def _ready_on(server: Beanstalkd, tube: str = "conformance") -> int:
    """The ready jobs of ``tube`` on ``server``, asked directly (not through packmule)."""
    with greenstalk.Client(("127.0.0.1", server.port), encoding=None) as client:
        try:
            return int(client.stats_tube(tube)["current-jobs-ready"])
        except greenstalk.NotFoundError:
            return 0


def _until(check: Any, what: str, within: float = WAIT) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


class Listener:
    """A socket on a killed server's port that notes the first line each
    client sends, then hangs up: a beanstalkd connection begins ``use <tube>``,
    the prober's check ``list-tube-used`` (which so finds the server still down)."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_server(("127.0.0.1", port))
        self.first_lines: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return  # closed
            with conn:
                conn.settimeout(5)
                self.first_lines.append(conn.makefile("rb").readline().split(b" ")[0].strip())

    def close(self) -> None:
        self.sock.close()


def _spread(h: Harness, runner: Worky, method: str, **kwargs: Any) -> list[packmule.JobRef]:
    """Queue blocks of 4 jobs (each ``enqueue_each`` call starts a shard of its
    own) until each server was preferred by at least 3 (6 blocks at least): with
    2 worker processes each holding one, a server still has one ready."""
    refs: list[packmule.JobRef] = []
    addresses = [s.address for s in _servers(h)]
    while len(refs) < 24 or min(sum(ref.server == a for ref in refs) for a in addresses) < 12:
        assert len(refs) < 400, "the shards never reached both servers"
        refs += runner.enqueue_each(method, range(4), **kwargs)
    return refs


def _kill_one_holding_ready_jobs(h: Harness) -> tuple[Beanstalkd, Beanstalkd]:
    """kill -9 the server with the most ready jobs (there must be some); (killed, live)."""
    victim, live = sorted(_servers(h), key=_ready_on, reverse=True)
    assert _ready_on(victim) > 0
    victim.kill()
    return victim, live


def _drained(h: Harness, runner: Worky) -> packmule.Progress:
    """The run's progress once what the live server holds is done and stays done."""
    queue = h.backend.queue
    _until(lambda: not any(s.ready or s.reserved or s.delayed for s in queue.stats_by_server().values()),
           "the live server's jobs did not run")
    time.sleep(1.0)  # (a job running a moment ago has committed)
    return runner.update_progress()


# --- runs -----------------------------------------------------------------------------------------------
def test_runs_started_after_one_beanstalkd_is_killed_all_complete(cluster: Harness, tmp_path: Any) -> None:
    # Given two beanstalkd servers, one killed for good
    _servers(cluster)[0].kill()
    # When 10 runs of 20 no-op jobs are started (a root job that fans out)
    runners = [Worky(backend=cluster.backend) for _ in range(10)]
    for i, runner in enumerate(runners):
        runner.enqueue("sleeper_fan", str(tmp_path / f"pids{i}"), 20, 0)
    # Then every one completes, with exact counts
    for runner in runners:
        assert runner.wait(timeout=WAIT) == "21.0 / 21.0"
        assert runner.get_return_value() == sum(range(20))


def test_a_run_with_jobs_on_a_killed_beanstalkd_completes_exactly_once_it_restarts_on_its_binlog(
        cluster: Harness, tmp_path: Any) -> None:
    # Given a run of slow jobs queued on both servers, being served and waited for
    runner = Worky(backend=cluster.backend)
    refs = _spread(cluster, runner, "pid_then_sleep_item", path=str(tmp_path / "pids"), seconds=0.3)
    waited: list[object] = []
    waiter = threading.Thread(target=_wait_into, args=(Worky(runner.name, backend=cluster.backend), waited))
    waiter.start()
    # When the server with ready jobs is killed, and the live one's jobs have run
    victim, _ = _kill_one_holding_ready_jobs(cluster)
    down = _drained(cluster, runner)
    # Then the run waits for the jobs the dead server holds: the wait does not
    # take the empty live queue for a stalled run
    assert down.failed == 0 and 0 < down.done < down.total == len(refs)
    time.sleep(STALLED_AFTER + 2)
    assert waiter.is_alive() and not waited
    # and when the server starts again on its binlog, the run completes, each job counted once
    victim.start()
    waiter.join(WAIT)
    assert waited == [f"{len(refs)}.0 / {len(refs)}.0"]
    assert runner.deferred_result("total", refs) == sum(range(4)) * (len(refs) // 4)
    assert runner.update_progress() == f"{len(refs)}.0 / {len(refs)}.0"


def _stranded(h: Harness, tmp_path: Any) -> tuple[Worky, Beanstalkd]:
    """A run of jobs queued on both servers, then the one with ready jobs killed for good: (run, killed)."""
    runner = Worky(backend=h.backend)
    _spread(h, runner, "pid_then_sleep_item", path=str(tmp_path / "pids"), seconds=0.3)
    victim, _ = _kill_one_holding_ready_jobs(h)
    return runner, victim


def test_a_run_whose_jobs_a_beanstalkd_took_for_good_raises_run_state_lost_naming_it(
        cluster: Harness, tmp_path: Any, monkeypatch: Any) -> None:
    # Given a run of jobs queued on both servers (a wait rides out 3 s of outage here)
    monkeypatch.setattr(waiting, "OUTAGE_GRACE", 3.0)
    # When the server with ready jobs is killed for good, and the live one's jobs have run
    runner, victim = _stranded(cluster, tmp_path)
    # Then the wait ends, once the run has not moved for the grace, naming the server that has its jobs
    with pytest.raises(packmule.RunStateLost, match=f"remaining jobs are on {victim.address}"):
        runner.wait(timeout=WAIT)


def test_recounts_that_find_nothing_do_not_put_off_run_state_lost_for_jobs_on_a_dead_beanstalkd(
        cluster: Harness, tmp_path: Any, monkeypatch: Any) -> None:
    # Given a run whose remaining jobs are on a beanstalkd killed for good, the live one's jobs done
    monkeypatch.setattr(waiting, "OUTAGE_GRACE", 8.0)
    runner, victim = _stranded(cluster, tmp_path)
    _drained(cluster, runner)
    # When a wait begins: the run does not move, and the wait's recounts (after 3, 6, 12 s...) find nothing
    began = time.monotonic()
    with pytest.raises(packmule.RunStateLost, match=f"remaining jobs are on {victim.address}"):
        runner.wait(timeout=WAIT)
    # Then it gives up once the run has not moved for the grace: a recount that fixed nothing is no move
    # (it was: the grace counted from the last recount, 17 s here and 75 s with the real 30 s grace)
    assert time.monotonic() - began < waiting.OUTAGE_GRACE + 3


def test_a_run_stranded_on_a_dead_beanstalkd_raises_run_state_lost_while_the_live_one_stays_busy(
        cluster: Harness, tmp_path: Any, monkeypatch: Any) -> None:
    # Given a run whose remaining jobs are on a beanstalkd killed for good, the live one's jobs done
    # (a wait rides out 3 s of outage here)
    monkeypatch.setattr(waiting, "OUTAGE_GRACE", 3.0)
    runner, victim = _stranded(cluster, tmp_path)
    _drained(cluster, runner)
    # When the live one stays busy with other work (as a cluster does with other runs): a job delayed past the wait
    cluster.backend.queue.put_many([Put("another-run", b"not run in this test", 60, delay=600)])
    assert cluster.backend.queue.stats().delayed == 1
    # Then the wait still ends, naming the dead server: the run's own keys say its remaining jobs can only be
    # there (it was: the wait looked only at the whole queue, and went on until its timeout)
    with pytest.raises(packmule.RunStateLost, match=f"remaining jobs are on {victim.address}"):
        runner.wait(timeout=30)


def _run_preferring(backend: Any, server: str, tmp_path: Any) -> Worky:
    """A new run of 4 jobs (no worker runs them) whose shard prefers ``server``."""
    while True:
        runner = Worky(backend=backend)
        if runner.enqueue_each("pid_then_sleep_item", range(4), str(tmp_path / "pids"), 0)[0].server == server:
            return runner


def test_jobs_queued_on_the_live_beanstalkd_in_place_of_a_dead_one_are_not_taken_for_lost(
        idle_cluster: Harness, tmp_path: Any) -> None:
    backend = idle_cluster.backend
    victim, live = _servers(idle_cluster)
    # Given a run queued on a beanstalkd that is then killed for good
    before = _run_preferring(backend, victim.address, tmp_path)
    victim.kill()
    # When another run whose shard prefers the dead server is queued: on the live one
    after = _run_preferring(backend, victim.address, tmp_path)
    assert _ready_on(live) >= 1 and before._pm_gen and after._pm_gen  # (its 4 jobs are one bundle)
    # Then only the first run's keys say that its remaining jobs are all on the dead server: the put on the
    # live one marked its shard first
    assert census.remaining_on(backend, before.name, before._pm_gen, [victim.address]) == [victim.address]
    assert census.remaining_on(backend, after.name, after._pm_gen, [victim.address]) == []


def test_a_run_stranded_on_a_dead_beanstalkd_raises_while_jobs_of_a_run_lost_to_a_dead_memcached_are_deferred(
        tmp_path: Any, monkeypatch: Any) -> None:
    monkeypatch.setattr(waiting, "OUTAGE_GRACE", 3.0)
    # (the worker buries the jobs of runs whose store server is away after 3 s, not 60)
    with beanstalk_harness(concurrency=2, beanstalkds=2, memcacheds=2,
                           worker_env={"PACKMULE_DELAY_SCALE": str(3 / UNREACHABLE_BURY)}) as h:
        # Given a run whose state is on a memcached killed for good: its jobs are deferred, in the tube
        gate, dead_store = str(tmp_path / "gate"), h.extras["memcacheds"][1]
        lost = Gated("on-the-dead-store", backend=h.backend)
        while True:
            lost.enqueue_each("wait_for", range(4), gate)
            if h.backend.store.holder(lost._pm_gen) == dead_store.address:  # type: ignore[arg-type]
                break
            lost.forget()
        dead_store.kill()
        open(gate, "w").close()
        _until(lambda: h.backend.queue.stats().delayed, "the lost run's jobs were not deferred")
        # and a run with jobs on both beanstalkd, the one without the deferred jobs then killed for good
        runner = Worky(backend=h.backend)
        _spread(h, runner, "pid_then_sleep_item", path=str(tmp_path / "pids"), seconds=0.3)
        by_server = h.backend.queue.stats_by_server()
        # (the one without deferred jobs, if one is: under load the lost run's jobs may be on both)
        victim = min(_servers(h), key=lambda s: (by_server[s.address].delayed > 0, -by_server[s.address].ready))
        assert by_server[victim.address].ready
        victim.kill()
        # Then its wait ends naming the dead beanstalkd, though the lost run's jobs keep the live one busy
        # (its keys tell that its remaining jobs can only be on the dead one), whether they are still
        # deferred or already buried
        with pytest.raises(packmule.RunStateLost, match=f"remaining jobs are on {victim.address}"):
            runner.wait(timeout=30)
        # and the lost run's jobs are kept: buried once its store server has been away too long, never deleted
        _until(lambda: h.backend.queue.stats().buried, "the lost run's jobs were not buried")


def _wait_into(runner: Worky, out: list[object]) -> None:
    try:
        out.append(runner.wait(timeout=WAIT))
    except Exception as exc:
        out.append(exc)


def test_runs_started_while_a_beanstalkd_is_down_complete_before_it_returns(cluster: Harness, tmp_path: Any) -> None:
    # Given a run with jobs on a server that was killed while the run went on
    first = Worky(backend=cluster.backend)
    refs = _spread(cluster, first, "pid_then_sleep_item", path=str(tmp_path / "pids"), seconds=0.3)
    victim, _ = _kill_one_holding_ready_jobs(cluster)
    # When new runs are started while it is down
    runners = [Worky(backend=cluster.backend) for _ in range(5)]
    for i, runner in enumerate(runners):
        runner.enqueue("sleeper_fan", str(tmp_path / f"new{i}"), 20, 0)
    # Then they complete without it, with exact counts
    for runner in runners:
        assert runner.wait(timeout=WAIT) == "21.0 / 21.0"
    assert first.update_progress().done < len(refs)
    # (and the first run completes once the server is back)
    victim.start()
    assert first.wait(timeout=WAIT) == f"{len(refs)}.0 / {len(refs)}.0"


def test_the_worker_serves_the_live_beanstalkd_while_the_other_is_down_and_goes_back_when_it_returns(
        idle_cluster: Harness) -> None:
    # Given jobs queued on both servers while no worker runs, then one server killed
    runner = Worky(backend=idle_cluster.backend)
    refs = _spread(idle_cluster, runner, "item")
    victim, live = _servers(idle_cluster)
    victim.kill()
    on_live = sum(ref.server == live.address for ref in refs)
    # When a worker starts
    worker = start_worker(idle_cluster, 2)
    try:
        # Then it runs exactly the live server's jobs, and those only
        _until(lambda: runner.update_progress().done == on_live, "the live server's jobs did not run")
        time.sleep(1.0)
        assert runner.update_progress() == f"{on_live}.0 / {len(refs)}.0"
        assert list(idle_cluster.backend.queue.stats_by_server()) == [live.address]
        # and when the killed server is back on its binlog, it runs the jobs queued there before the kill
        victim.start()
        assert runner.wait(timeout=WAIT) == f"{len(refs)}.0 / {len(refs)}.0"
        assert runner.deferred_result("collect", refs) == [i for _ in range(len(refs) // 4) for i in range(4)]
    finally:
        stop_worker(worker)


# --- the queue itself -----------------------------------------------------------------------------------
def test_put_many_puts_a_down_servers_share_on_the_live_one(idle_cluster: Harness) -> None:
    # Given two servers, one killed
    queue = idle_cluster.backend.queue
    victim, live = _servers(idle_cluster)
    victim.kill()
    # When jobs with 40 shard keys are put
    shards = [f"job-{i}" for i in range(40)]
    queue.put_many([Put(shard, shard.encode(), 60) for shard in shards])
    # Then all are on the live server, those that prefer the dead one too
    assert _ready_on(live) == 40
    assert 0 < sum(queue.server_for(shard) == victim.address for shard in shards) < 40
    assert [s.state for s in queue.health.states()] == ["aside", "up"]


def test_a_set_aside_beanstalkd_is_not_asked_until_it_is_probed_back(idle_cluster: Harness) -> None:
    # Given a killed server, set aside by a put, with a socket on its port that
    # hangs up on whoever connects (so the prober finds it still down)
    queue = idle_cluster.backend.queue
    victim, live = _servers(idle_cluster)
    victim.kill()
    queue.put_many([Put("a", b"job", 60)])
    listener = Listener(victim.port)
    try:
        # When jobs are put, reserved, acked and counted
        for i in range(10):
            queue.put_many([Put(f"job-{i}-{j}", b"x", 60) for j in range(10)])
            queue.ack_many([job.handle for job in queue.reserve_many(5, 0)])
            queue.stats()
        time.sleep(1.0)
        # Then no client connection tried it; only the prober did
        assert listener.first_lines and set(listener.first_lines) == {b"list-tube-used"}
        assert not queue.health.up(0)
    finally:
        listener.close()


def test_put_many_goes_back_to_a_server_once_it_is_probed_back(idle_cluster: Harness) -> None:
    # Given a server that was killed and set aside, then started again
    queue = idle_cluster.backend.queue
    victim, live = _servers(idle_cluster)
    victim.kill()
    queue.put_many([Put("a", b"job", 60)])
    assert not queue.health.up(0)
    victim.start()
    # When its prober has found it back
    _until(lambda: queue.health.up(0), "the server was not probed back", within=10)
    # Then the jobs that prefer it go to it again
    shards = [f"job-{i}" for i in range(40)]
    queue.put_many([Put(shard, shard.encode(), 60) for shard in shards])
    assert _ready_on(victim) == sum(queue.server_for(shard) == victim.address for shard in shards) > 0


def test_put_many_with_every_beanstalkd_down_raises_backend_unavailable_naming_them(
        idle_cluster: Harness) -> None:
    # Given both servers killed
    queue = idle_cluster.backend.queue
    servers = _servers(idle_cluster)
    for server in servers:
        server.kill()
    # When jobs are put, then the error names both servers and the variable
    match = rf"{servers[0].address}.*{servers[1].address}.*PACKMULE_BEANSTALKD"
    with pytest.raises(packmule.BackendUnavailable, match=match):
        queue.put_many([Put(f"job-{i}", b"x", 60) for i in range(10)])
    assert [s.state for s in queue.health.states()] == ["aside", "aside"]
    # and once one is started again, the next put tries it anyway, and it is back
    servers[1].start()
    queue.put_many([Put(f"job-{i}", b"x", 60) for i in range(10)])
    assert _ready_on(servers[1]) == 10
    assert queue.health.up(1)


def test_a_body_too_big_is_refused_before_anything_is_queued_while_one_beanstalkd_is_down(
        idle_cluster: Harness) -> None:
    queue = idle_cluster.backend.queue
    victim, live = _servers(idle_cluster)
    victim.kill()
    jobs = [Put(f"small-{i}", b"fine", 60) for i in range(10)] + [Put("big", b"x" * 70_000, 60)]
    with pytest.raises(ValueError, match=r"70000 bytes.*65535.*-z"):
        queue.put_many(jobs)
    assert _ready_on(live) == 0


def test_max_body_is_the_live_servers_while_one_is_down(idle_cluster: Harness) -> None:
    # Given one server killed before this thread connected to it: max_body still answers
    queue = idle_cluster.backend.queue
    _servers(idle_cluster)[1].kill()
    assert queue.max_body == 65535
    assert queue.uncounted() == [_servers(idle_cluster)[1].address]
    # When the other dies too (found by a put), then max_body raises, naming the variable
    _servers(idle_cluster)[0].kill()
    with pytest.raises(packmule.BackendUnavailable):
        queue.put_many([Put("a", b"x", 60)])
    with pytest.raises(packmule.BackendUnavailable, match="PACKMULE_BEANSTALKD"):
        queue.max_body  # noqa: B018 - the property is the call


def test_reserve_many_serves_the_live_beanstalkd_and_goes_back_to_the_other_when_it_returns(
        idle_cluster: Harness) -> None:
    # Given jobs on both servers, one then killed
    queue = idle_cluster.backend.queue
    victim, live = _servers(idle_cluster)
    shards = [f"job-{i}" for i in range(20)]
    queue.put_many([Put(shard, shard.encode(), 60) for shard in shards])
    on_victim = {s.encode() for s in shards if queue.server_for(s) == victim.address}
    victim.kill()
    # When a consumer reserves, then it gets the live server's jobs, and no error
    got = []
    deadline = time.monotonic() + 10
    while len(got) < len(shards) - len(on_victim) and time.monotonic() < deadline:
        got += queue.reserve_many(5, 0.2)
    assert {job.body for job in got} == {s.encode() for s in shards} - on_victim
    assert queue.reserve_many(5, 0.2) == []
    assert set(queue.stats_by_server()) == {live.address} and queue.uncounted() == [victim.address]
    # and once the killed server is back on its binlog, it gets that server's jobs too
    victim.start()
    deadline = time.monotonic() + 15
    while len(got) < len(shards) and time.monotonic() < deadline:
        got += queue.reserve_many(5, 0.2)
    assert sorted(job.body for job in got) == sorted(s.encode() for s in shards)
    queue.ack_many([job.handle for job in got])


def test_acting_on_a_reservation_of_a_dead_beanstalkd_is_ignored(idle_cluster: Harness) -> None:
    queue = idle_cluster.backend.queue
    victim, live = _servers(idle_cluster)
    queue.put_many([Put(f"job-{i}", b"x", 60) for i in range(20)])
    jobs = []
    deadline = time.monotonic() + 10
    while {job.server for job in jobs} != {victim.address, live.address} and time.monotonic() < deadline:
        jobs += queue.reserve_many(2, 0.2)
    victim.kill()
    for job in jobs:  # lapsed with its server, or acked
        queue.touch(job.handle)
    queue.ack_many([job.handle for job in jobs])
    assert queue.uncounted() == [victim.address]
    assert queue.stats().reserved == 0


def test_reserve_many_with_every_beanstalkd_down_raises_backend_unavailable(idle_cluster: Harness) -> None:
    queue = idle_cluster.backend.queue
    for server in _servers(idle_cluster):
        server.kill()
    with pytest.raises(packmule.BackendUnavailable, match="PACKMULE_BEANSTALKD"):
        queue.reserve_many(5, 0.2)
    with pytest.raises(packmule.BackendUnavailable, match="PACKMULE_BEANSTALKD"):
        queue.stats()
