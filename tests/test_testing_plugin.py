"""``packmule.testing``, the pytest plugin: the ``packmule_backend`` fixture on
real worker processes.  Most tests use the fixture itself; the README's example
file is also run in a pytest process of its own, to see how that process ends
and what it leaves behind; and once on a real cluster, where the fixture steps
aside."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from packmule.backends import _choice, local

import packmule
from packmule._core import config as _config
from packmule.testing import BackendFixture, _Options, backend_for_test, steps_aside

HERE = Path(__file__).parent
EXAMPLE = HERE / "test_readme_testing_example.py"
WAIT = 30.0


class Probe(packmule.Runner):
    record_return_values = True
    max_retries = 0

    def pid(self):
        return os.getpid()

    def nap(self, seconds):
        time.sleep(seconds)

    def divide(self, a, b):
        return a / b

    def spread(self, count):
        self.enqueue_each("nap", [0.01] * count)

    def start_other(self, name):
        Probe(name).enqueue("nap", 0.3)


class Flaky(packmule.Runner):
    """``fail`` fails ``times`` times, then returns; its first retry waits 10 s unless delays are scaled."""

    record_return_values = True
    retry_delay = 10.0

    def fail(self, tally, times):
        with open(tally, "a+") as f:
            f.write("x")
            f.seek(0)
            attempt = len(f.read())
        if attempt <= times:
            raise ConnectionError(f"attempt {attempt}")
        return attempt


def _held(fixture: BackendFixture, count: int) -> None:
    deadline = time.monotonic() + WAIT
    while fixture.backend.queue.stats().reserved < count:
        assert time.monotonic() < deadline, f"workers did not take {count} jobs within {WAIT}s"
        time.sleep(0.01)


def _alive(pid: int, created: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.create_time() == created and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


# --- the backend a test gets ---------------------------------------------------------------
def test_a_runner_given_no_backend_uses_the_tests_backend_and_its_workers(packmule_backend):
    runner = Probe()
    ref = runner.enqueue("pid")
    packmule_backend.join(timeout=WAIT)
    assert runner.backend is packmule_backend.backend
    assert Probe(backend="local").backend is packmule_backend.backend
    assert runner.get_return_value(ref) in packmule_backend.worker_pids()
    assert packmule_backend.runs == [runner.name]


@pytest.mark.parametrize("expected", [
    2, pytest.param(1, marks=pytest.mark.packmule(workers=1)), pytest.param(3, marks=pytest.mark.packmule(workers=3)),
])
def test_the_marker_sets_how_many_workers_the_backend_starts(packmule_backend, expected):
    assert len(packmule_backend.worker_pids()) == expected


def test_the_marker_refuses_what_it_does_not_know():
    with pytest.raises(pytest.UsageError, match="workers=0"):
        _Options(pytest.mark.packmule(workers=0).mark)
    with pytest.raises(pytest.UsageError, match="unknown option.*worker_count"):
        _Options(pytest.mark.packmule(worker_count=2).mark)
    with pytest.raises(pytest.UsageError, match="delay_scale=2"):
        _Options(pytest.mark.packmule(delay_scale=2).mark)


def test_each_backend_is_fresh_and_stopped_at_once_with_nothing_left():
    # Given a test's backend whose workers are busy with long jobs of run 'same'
    with backend_for_test() as first:
        runner = Probe("same")
        runner.enqueue("nap", 60)
        runner.enqueue("nap", 60)
        _held(first, 2)
        processes = [psutil.Process(pid) for pid in [*first.worker_pids(), first.backend._coordinator.pid]]
        started = [(p.pid, p.create_time()) for p in processes]
        secret = first.backend.secret()
        stopping = time.monotonic()
    # When the test ends: its processes are gone, without a grace period
    stopped_after = time.monotonic() - stopping
    assert [pid for pid, created in started if _alive(pid, created)] == []
    assert stopped_after < local.STOP_GRACE
    assert local.ADDRESS_VAR not in os.environ and _config.DELAY_SCALE_VAR not in os.environ
    # Then the next backend knows nothing of that run, and has a secret of its own
    with backend_for_test() as second:
        assert Probe("same").update_progress() == "0.0 / 0.0"
        assert second.backend.secret() != secret
        assert not {pid for pid, _ in started} & set(second.worker_pids())


def test_a_test_without_the_fixture_sees_no_trace_of_the_plugin():
    assert _choice._scope is None
    assert _config.DELAY_SCALE_VAR not in os.environ and local.ADDRESS_VAR not in os.environ


def test_the_fixture_steps_aside_only_when_packmule_backend_names_another_backend():
    assert steps_aside({"PACKMULE_BACKEND": "beanstalk"})
    assert not steps_aside({"PACKMULE_BACKEND": "local"})
    assert not steps_aside({})


# --- join -------------------------------------------------------------------------------------
def test_join_raises_the_failure_with_method_arguments_and_remote_traceback(packmule_backend):
    Probe().enqueue("divide", 1, 0)
    with pytest.raises(packmule.JobFailed) as failed:
        packmule_backend.join(timeout=WAIT)
    assert (failed.value.method, failed.value.args_repr, failed.value.exc_type) == ("divide", "(1, 0)",
                                                                                     "ZeroDivisionError")
    # (Probe travelled by value: the worker still names this file and shows the line)
    assert f'File "{__file__}"' in str(failed.value) and "return a / b" in str(failed.value)


def test_join_raises_a_failure_while_other_jobs_still_run(packmule_backend):
    runner = Probe()
    runner.enqueue("nap", 60)
    runner.enqueue("divide", 1, 0)
    with pytest.raises(packmule.JobFailed, match="ZeroDivisionError"):
        packmule_backend.join(timeout=WAIT)  # not TimeoutError: it does not wait for the nap


def test_join_waits_for_the_jobs_that_jobs_enqueue(packmule_backend):
    runner = Probe()
    runner.enqueue("spread", 20)
    packmule_backend.join(timeout=WAIT)
    assert runner.update_progress() == "21.0 / 21.0"
    assert packmule_backend.backend.queue.stats()[:3] == (0, 0, 0)  # ready, reserved, delayed


def test_join_waits_for_runs_that_jobs_start_under_other_names(packmule_backend):
    Probe().enqueue("start_other", "other")
    packmule_backend.join(timeout=WAIT)
    assert Probe("other").update_progress() == "1.0 / 1.0"


def test_join_times_out_saying_what_still_runs(packmule_backend):
    Probe("sleepy").enqueue("nap", 60)
    with pytest.raises(TimeoutError, match=r"run 'sleepy' at 0\.0 / 1\.0"):
        packmule_backend.join(timeout=0.2)


def test_join_can_wait_without_raising_and_failures_lists_them_all(packmule_backend):
    runner = Probe()
    runner.enqueue_each("divide", [1, 2], 0)
    packmule_backend.join(timeout=WAIT, raise_failures=False)
    assert sorted(f.args_repr for f in packmule_backend.failures()) == ["(1, 0)", "(2, 0)"]
    assert runner.update_progress().failed == 2


# --- retries ---------------------------------------------------------------------------------
def test_a_job_that_fails_twice_is_retried_at_once_and_takes_three_attempts(packmule_backend, tmp_path):
    runner = Flaky()
    ref = runner.enqueue("fail", str(tmp_path / "tally"), 2)
    packmule_backend.join(timeout=5)  # unscaled, the retries would wait 10 s + 20 s
    assert runner.get_return_value(ref) == 3
    assert packmule_backend.attempts(ref) == 3


@pytest.mark.packmule(delay_scale=1)
def test_delay_scale_1_keeps_the_documented_backoff(packmule_backend, tmp_path):
    ref = Flaky().enqueue("fail", str(tmp_path / "tally"), 1)
    with pytest.raises(TimeoutError):
        packmule_backend.join(timeout=1)
    assert packmule_backend.backend.queue.stats().delayed == 1  # its retry waits its 10 s
    assert packmule_backend.attempts(ref) == 1


def test_attempts_counts_raises_and_the_return(packmule_backend, tmp_path):
    failing = Flaky(max_retries=1).enqueue("fail", str(tmp_path / "a"), 5)
    first_time = Flaky().enqueue("fail", str(tmp_path / "b"), 0)
    packmule_backend.join(timeout=WAIT, raise_failures=False)
    assert (packmule_backend.attempts(failing), packmule_backend.attempts(first_time)) == (2, 1)


# --- the README's example file, run as a user runs it -------------------------------------
WATCH = '''"""Records each test's outcome and duration, when it finished, and the
processes under this pytest process while it ran."""
import json, os, time
import psutil, pytest

def _write(record):
    with open(os.environ["WATCH_OUT"], "a") as f:
        f.write(json.dumps(record) + "\\n")

@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    _write({"pids": [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]})
    yield

def pytest_runtest_logreport(report):
    if report.when == "call":
        _write({"test": report.nodeid.split("::")[-1], "outcome": report.outcome, "duration": report.duration})

def pytest_runtest_logfinish(nodeid):
    _write({"finished_at": time.time()})
'''

FAILING = '''from test_shop import Shop

def test_a_price_job_that_raises(packmule_backend):
    Shop("shop").enqueue("price", -5)
    packmule_backend.join(timeout=60)
'''


def _run_pytest(folder: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, str, list[dict], float]:
    """pytest in a process of its own, in ``folder``: its exit code, output, the
    watch records, and how long after its last test finished it exited."""
    (folder / "watch_plugin.py").write_text(WATCH)
    watch = folder / "watch.jsonl"
    env = dict(env if env is not None else {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")})
    env["WATCH_OUT"] = str(watch)
    with open(folder / "output.txt", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-p", "watch_plugin", "-p", "no:cacheprovider",
                                 "-o", "console_output_style=classic", *args], cwd=folder, env=env,
                                stdout=out, stderr=subprocess.STDOUT)
        try:
            proc.wait(180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            pytest.fail("the pytest process did not end within 180s")
    exited = time.time()
    records = [json.loads(line) for line in watch.read_text().splitlines()]
    last = max(r["finished_at"] for r in records if "finished_at" in r)
    return proc.returncode, (folder / "output.txt").read_text(), records, exited - last


def test_the_readme_shows_the_example_file_verbatim():
    assert EXAMPLE.read_text() in (HERE.parent / "README.md").read_text()


def test_the_readme_example_passes_ends_at_once_and_leaves_no_process(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "test_shop.py")
    code, output, records, exit_after = _run_pytest(tmp_path, "test_shop.py")
    assert code == 0, output
    assert "5 passed" in output
    assert exit_after < 2.0, f"pytest exited {exit_after:.2f}s after its last test"
    started = [tuple(pid) for r in records for pid in r.get("pids", [])]
    assert len(started) >= 5 * 2  # each test ran its coordinator and its workers
    assert [pid for pid, created in started if _alive(pid, created)] == []


def test_a_test_whose_job_raises_fails_with_its_exception_and_traceback_at_once(tmp_path):
    shutil.copy(EXAMPLE, tmp_path / "test_shop.py")
    (tmp_path / "test_fails.py").write_text(FAILING)
    code, output, records, _ = _run_pytest(tmp_path, "test_fails.py")
    assert code == 1, output
    assert "ValueError: a price cannot be negative: -5" in output
    assert "--- remote traceback ---" in output and 'raise ValueError(f"a price cannot be negative' in output
    [report] = [r for r in records if r.get("test") == "test_a_price_job_that_raises"]
    assert report["outcome"] == "failed"
    assert report["duration"] < 10, "join raised long after the job failed (its timeout is 60 s)"


def test_the_readme_example_passes_on_a_real_cluster_where_the_fixture_steps_aside(tmp_path):
    from conformance.harness import beanstalk_harness, job_processes, start_worker

    shutil.copy(EXAMPLE, tmp_path / "test_shop.py")
    with beanstalk_harness(concurrency=0) as cluster:
        worker = start_worker(cluster, 8)  # it cannot import test_shop: its runners come by value
        try:
            code, output, records, _ = _run_pytest(tmp_path, "test_shop.py", env=cluster.extras["env"])
        finally:  # its first test's 30 s naps are of no use: stop it now, by PID
            for pid in [*job_processes([worker.pid]), worker.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            worker.wait()
    assert code == 0, output
    assert "5 passed" in output
    assert all(r["pids"] == [] for r in records if "pids" in r)  # the fixture started no process
