"""The beanstalk backend's own behaviour and its fault tests, against real
beanstalkd, memcached and ZooKeeper (started on loopback ports, stopped by PID)
and real ``packmule worker`` processes.  The shared semantics are proven by the
conformance suite; this file holds what only a cluster has: server restarts,
missing workers, worker signals, the command line."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import packmule
from conformance.faulty import Faulty
from conformance.harness import Harness, beanstalk_harness, start_worker, stop_worker
from conformance.runners import Flaky, Plain, Worky, lines

WAIT = 60


@pytest.fixture
def cluster():  # type: ignore[no-untyped-def]
    """A fresh cluster with one 2-process worker, for tests that break things."""
    with beanstalk_harness(concurrency=2) as h:
        yield h


@pytest.fixture
def idle_cluster():  # type: ignore[no-untyped-def]
    """A fresh cluster with no worker."""
    with beanstalk_harness(concurrency=0) as h:
        yield h


def _cli(h: Harness, *args: str, timeout: float = WAIT) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "packmule", *args], env=h.extras["env"], cwd=h.extras["root"],
                          capture_output=True, text=True, timeout=timeout)


def _started(path: str, count: int = 1) -> None:
    deadline = time.monotonic() + WAIT
    while len(lines(path)) < count:
        assert time.monotonic() < deadline, "jobs did not start"
        time.sleep(0.02)


def test_beanstalkd_restarted_mid_run_keeps_queued_jobs_and_the_run_completes(cluster, tmp_path):
    # Given a run of 20 slow jobs, some running
    runner = Worky(backend=cluster.backend)
    path = str(tmp_path / "pids")
    runner.enqueue("sleeper_fan", path, 20, 0.2)
    _started(path, 2)
    # When beanstalkd is killed and started again on its binlog
    cluster.extras["beanstalkd"].restart(kill=True)
    # Then the workers reconnect and the run completes exactly
    assert runner.wait(timeout=WAIT) == "21.0 / 21.0"
    assert runner.get_return_value() == sum(range(20))


def test_beanstalkd_restarted_between_a_count_and_its_put_still_queues_the_continuation_it_completed(cluster,
                                                                                                   tmp_path):
    # Given another run whose job waits to be retried (so that the queue is
    # never quiet), and a continuation whose only input's worker has counted it
    # (completing the continuation's inputs) and is about to queue the continuation
    waiting = Flaky(backend=cluster.backend, retry_delay=600)
    tries = str(tmp_path / "tries")
    waiting.enqueue("fail_times", tries, 1)
    deadline = time.monotonic() + WAIT
    while cluster.backend.queue.stats().delayed < 1:
        assert time.monotonic() < deadline, "the job to retry was not delayed"
        time.sleep(0.02)
    runner = Faulty(backend=cluster.backend)
    path, go = str(tmp_path / "input"), tmp_path / "go"
    runner.enqueue("fan_busy", path, False, str(go))
    _started(path + ".paused")
    # When beanstalkd restarts then: the put fails, and the input comes back
    # from the binlog with its value stored
    cluster.extras["beanstalkd"].restart()
    go.touch()
    # Then the input, delivered again, queues the continuation
    assert runner.wait(timeout=WAIT) == "2.0 / 2.0"
    assert runner.get_return_value() == 5


def test_memcached_restarted_mid_run_makes_wait_raise_run_state_lost(cluster, tmp_path):
    runner = Worky(backend=cluster.backend)
    path = str(tmp_path / "pids")
    runner.enqueue("sleeper_fan", path, 20, 0.5)
    _started(path)
    cluster.extras["memcached"].restart(kill=True)
    started = time.monotonic()
    with pytest.raises(packmule.RunStateLost):
        runner.wait(timeout=WAIT)
    assert time.monotonic() - started < WAIT


def test_zookeeper_stopped_makes_lock_raise_backend_unavailable_while_jobs_go_on(cluster):
    cluster.extras["zookeeper"].stop()
    runner = Plain(backend=cluster.backend, record_return_values=True)
    with pytest.raises(packmule.BackendUnavailable, match="PACKMULE_ZOOKEEPER"), runner.lock("needs-zk", timeout=5):
        pass
    jobs = runner.enqueue_each("work", range(5))
    assert runner.deferred_result("work", jobs) == [0, 1, 2, 3, 4]


def test_a_forged_body_put_straight_into_the_tube_is_buried_unrun(cluster, tmp_path):
    import pickle

    import greenstalk

    marker = tmp_path / "ran"
    host, port = cluster.extras["beanstalkd"].address.split(":")

    class Boom:
        def __reduce__(self):  # type: ignore[no-untyped-def]
            return (open, (str(marker), "w"))

    with greenstalk.Client((host, int(port)), use="conformance", encoding=None) as raw:
        raw.put(b"\x01" * 32 + pickle.dumps(Boom()))
    deadline = time.monotonic() + WAIT
    while cluster.backend.queue.stats().buried == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert not marker.exists()


def test_waiting_with_no_worker_raises_no_workers_within_seconds(idle_cluster):
    runner = Plain(backend=idle_cluster.backend)
    jobs = runner.enqueue_each("work", range(3))
    started = time.monotonic()
    with pytest.raises(packmule.NoWorkers, match="packmule worker"):
        runner.deferred_result("work", jobs)
    assert time.monotonic() - started < 15
    with pytest.raises(packmule.NoWorkers):
        runner.wait()


def test_a_worker_started_late_serves_what_was_queued(idle_cluster):
    runner = Plain(backend=idle_cluster.backend, record_return_values=True)
    jobs = runner.enqueue_each("work", range(4))
    worker = start_worker(idle_cluster, 1)
    try:
        assert runner.deferred_result("work", jobs) == [0, 1, 2, 3]
    finally:
        assert stop_worker(worker) == 0


def test_sigterm_drains_running_jobs_then_exits_zero(idle_cluster, tmp_path):
    worker = start_worker(idle_cluster, 1)
    runner = Worky(backend=idle_cluster.backend)
    path = str(tmp_path / "pids")
    ref = runner.enqueue("pid_then_sleep", path, 1.0, "finished")
    _started(path)
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(WAIT) == 0
    assert runner.get_return_value(ref) == "finished"  # it finished before the worker left
    assert len(lines(path)) == 1  # and ran once


def test_a_second_sigint_stops_at_once_and_the_job_goes_back(idle_cluster, tmp_path):
    worker = start_worker(idle_cluster, 1)
    runner = Worky(backend=idle_cluster.backend)
    path = str(tmp_path / "pids")
    ref = runner.enqueue("pid_then_sleep", path, 30.0, "slow")
    _started(path)
    worker.send_signal(signal.SIGINT)
    time.sleep(0.3)
    worker.send_signal(signal.SIGINT)
    assert worker.wait(10) != 0
    stats = idle_cluster.backend.queue.stats()
    assert stats.ready + stats.reserved == 1  # handed back (reserved until its dead consumer is noticed)
    with pytest.raises(packmule.NotReady):
        runner.get_return_value(ref)


def test_max_jobs_per_child_recycles_worker_processes(idle_cluster, tmp_path):
    worker = start_worker(idle_cluster, 1, "--max-jobs-per-child", "2")
    try:
        runner = Worky(backend=idle_cluster.backend, record_return_values=True)
        path = str(tmp_path / "pids")
        for i in range(6):  # one at a time, so each child counts exactly
            runner.deferred_result("total", [runner.enqueue("pid_then_sleep_item", i, path, 0.0)])
        assert len(set(lines(path))) >= 3
    finally:
        stop_worker(worker)


def test_max_memory_per_child_recycles_a_bloated_worker_process(idle_cluster):
    from conformance.runners import Hog

    worker = start_worker(idle_cluster, 1, "--max-memory-per-child", "100")
    try:
        runner = Hog(backend=idle_cluster.backend)
        bloated = runner.deferred_result("first", [runner.enqueue("hog", 150)])
        deadline = time.monotonic() + WAIT
        while runner.deferred_result("first", [runner.enqueue("pid")]) == bloated:
            assert time.monotonic() < deadline, "the bloated process was not recycled"
            time.sleep(0.5)
    finally:
        assert stop_worker(worker) == 0


def test_a_worker_whose_servers_vanish_says_so_and_recovers(idle_cluster, tmp_path):
    log = tmp_path / "worker.log"
    env = dict(idle_cluster.extras["env"])
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "packmule", "worker", "-c", "1"], env=env,
                                  cwd=idle_cluster.extras["root"], stderr=out, stdin=subprocess.DEVNULL)
    try:
        time.sleep(1.5)
        idle_cluster.extras["beanstalkd"].stop()
        time.sleep(2.5)
        assert worker.poll() is None, "the worker exited"
        assert "retrying" in log.read_text() and idle_cluster.extras["beanstalkd"].address in log.read_text()
        idle_cluster.extras["beanstalkd"].start()
        runner = Plain(backend=idle_cluster.backend, record_return_values=True)
        assert runner.deferred_result("work", [runner.enqueue("work", 7)]) == [7]
    finally:
        stop_worker(worker)


def test_the_worker_logs_a_line_per_job_state_change_with_run_and_job(idle_cluster, tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "w") as out:
        worker = subprocess.Popen([sys.executable, "-m", "packmule", "worker", "-c", "1", "--log-level", "INFO"],
                                  env=idle_cluster.extras["env"], cwd=idle_cluster.extras["root"], stderr=out,
                                  stdin=subprocess.DEVNULL)
    try:
        runner = Flaky(backend=idle_cluster.backend, max_retries=1)
        ok, bad = runner.enqueue("ok", 1), runner.enqueue("always", "logged")
        runner.wait(timeout=WAIT)
    finally:
        stop_worker(worker)
    text = log.read_text()
    assert f"run {runner.name} job {ok.id} ok: done" in text
    assert f"run {runner.name} job {bad.id} always: retrying" in text
    assert f"run {runner.name} job {bad.id} always: failed" in text
    assert "WARNING" in text and "always fails: logged" in text


def test_status_lists_progress_and_failures(cluster):
    runner = Flaky(backend=cluster.backend, max_retries=0)
    runner.enqueue("parent", ["fine", "bad-status"])
    runner.wait(timeout=WAIT)
    out = _cli(cluster, "status", runner.name)
    assert out.returncode == 0, out.stderr
    assert "3.0 / 3.0" in out.stdout and "failed 2" in out.stdout
    assert "ValueError: always fails: bad-status" in out.stdout


def test_progress_command_prints_and_watches(cluster):
    runner = Plain(backend=cluster.backend)
    runner.enqueue_each("work", range(3))
    runner.wait(timeout=WAIT)
    assert _cli(cluster, "progress", runner.name).stdout.strip() == "3.0 / 3.0"
    watched = _cli(cluster, "progress", runner.name, "--watch")
    assert watched.returncode == 0 and "3.0 / 3.0" in watched.stdout


def test_the_backend_refuses_to_start_without_a_secret(cluster):
    env = {k: v for k, v in cluster.extras["env"].items() if k != "PACKMULE_SECRET"}
    out = subprocess.run([sys.executable, "-m", "packmule", "worker", "-c", "1"], env=env, capture_output=True,
                         text=True, timeout=WAIT, cwd=cluster.extras["root"])
    assert out.returncode == 2 and "PACKMULE_SECRET" in out.stderr


@pytest.mark.parametrize("variable", ["PACKMULE_BEANSTALKD", "PACKMULE_MEMCACHED"])
def test_an_unreachable_server_is_named_with_its_variable(cluster, variable):
    from packmule.backends.beanstalk import BeanstalkBackend

    from conformance.servers import free_port

    closed = f"127.0.0.1:{free_port()}"
    backend = BeanstalkBackend.from_env({**cluster.env, variable: closed})
    try:
        with pytest.raises(packmule.BackendUnavailable, match=f"{closed}.*{variable}"):
            Plain(backend=backend).enqueue("work")
    finally:
        backend.close()


def test_env_var_switches_backend_without_code_change(cluster):
    code = ("import packmule\n"
            "from conformance.runners import SleepyRunner\n"
            "r = SleepyRunner('switch-test')\n"
            "print(type(r.backend).__name__, r.run(5) >= 0, r.update_progress())\n")
    out = subprocess.run([sys.executable, "-c", code], env=cluster.extras["env"], cwd=cluster.extras["root"],
                         capture_output=True, text=True, timeout=WAIT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["BeanstalkBackend", "True", "5.0", "/", "5.0"]


def test_job_processes_are_children_of_the_worker(cluster):
    assert len(cluster.worker_pids()) == 2
    assert all(pid != os.getpid() for pid in cluster.worker_pids())


def test_workers_with_another_secret_make_wait_raise_naming_the_secret(idle_cluster):
    # Given the only worker has another PACKMULE_SECRET than this process
    right = idle_cluster.extras["env"]
    idle_cluster.extras["env"] = dict(right, PACKMULE_SECRET="not-the-drivers-secret")
    try:
        worker = start_worker(idle_cluster, 1)
    finally:
        idle_cluster.extras["env"] = right
    try:
        runner = Plain(backend=idle_cluster.backend)
        jobs = runner.enqueue_each("work", range(3))
        # Then waiting says why nothing runs, within seconds, in wait and in deferred_result
        started = time.monotonic()
        with pytest.raises(packmule.SecretMismatch, match="PACKMULE_SECRET") as err:
            runner.wait(timeout=WAIT)
        assert time.monotonic() - started < 15
        assert "signature" in str(err.value) and isinstance(err.value, packmule.NoWorkers)
        with pytest.raises(packmule.SecretMismatch):
            runner.deferred_result("work", jobs)
        status = _cli(idle_cluster, "status", runner.name)
        assert "REFUSED" in status.stdout and "PACKMULE_SECRET" in status.stdout
    finally:
        stop_worker(worker)


def test_an_enqueue_that_cannot_reach_beanstalkd_leaves_the_counts_as_they_were(cluster):
    runner = Plain(backend=cluster.backend)
    runner.enqueue("work", 1)
    assert runner.wait(timeout=WAIT) == "1.0 / 1.0"
    # When beanstalkd is down, an enqueue raises and counts nothing
    cluster.extras["beanstalkd"].kill()
    with pytest.raises(packmule.BackendUnavailable, match="PACKMULE_BEANSTALKD"):
        runner.enqueue_each("work", range(10))
    with pytest.raises(packmule.BackendUnavailable):
        runner.enqueue("work", 2)
    assert runner.update_progress() == "1.0 / 1.0"
    # Then, once it is back, later jobs complete the run at exact counts
    cluster.extras["beanstalkd"].start()
    runner.enqueue("work", 3)
    progress = runner.wait(timeout=WAIT)
    assert (progress.done, progress.total, progress.failed) == (2, 2, 0)


def test_a_blocking_deferred_result_rides_out_a_store_outage(cluster, tmp_path):
    # Given a driver that reaches memcached through a proxy (the workers do not)
    from packmule.backends.beanstalk import BeanstalkBackend

    from conformance.servers import Proxy

    proxy = Proxy(cluster.extras["memcached"].address)
    driver = BeanstalkBackend.from_env(dict(cluster.env, PACKMULE_MEMCACHED=proxy.address))
    try:
        runner = Worky(backend=driver, record_return_values=True)
        path = str(tmp_path / "pids")
        jobs = runner.enqueue_each("pid_then_sleep_item", range(6), path, 1.5)
        _started(path)
        # When the store is out of its reach for a few seconds while it waits
        proxy.cut()
        threading.Timer(3.0, proxy.resume).start()
        started = time.monotonic()
        # Then it waits the outage out and returns the values in order
        assert runner.deferred_result("collect", jobs) == list(range(6))
        assert time.monotonic() - started >= 3.0
    finally:
        proxy.close()
        driver.close()
