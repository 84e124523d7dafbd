"""``manage.py packmule_worker`` and the other commands of the Django app, as
processes: a worker whose Django setup fails stops at once naming the variable
(it never restarts children that die), ``--reload`` restarts the workers when a
``.py`` file changes, and the CLI's commands read the project's settings."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from conformance.harness import Harness, beanstalk_harness, stop_worker
from tests.django_project.pytest_fixtures import MANAGE, ROOT, SETTINGS, django_env, manage
from tests.django_project.shop.runners import Shop

SETUP = "packmule.contrib.django.worker:setup"
AT_ONCE = 30.0  # s: far less than a supervisor restarting children would loop for


def packmule_worker(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    run = subprocess.run([sys.executable, "-m", "packmule", "worker", "--concurrency", "1"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=AT_ONCE * 2, stdin=subprocess.DEVNULL)
    return run, time.monotonic() - started


def test_a_worker_without_django_settings_module_exits_at_once_naming_it() -> None:
    env = django_env(PACKMULE_WORKER_SETUP=SETUP)
    del env["DJANGO_SETTINGS_MODULE"]
    run, took = packmule_worker(env)
    assert run.returncode == 2 and took < AT_ONCE
    assert "DJANGO_SETTINGS_MODULE is not set" in run.stderr
    assert "no worker process started" in run.stderr


def test_a_worker_whose_settings_fail_to_import_exits_at_once_naming_the_variable() -> None:
    run, took = packmule_worker(django_env(PACKMULE_WORKER_SETUP=SETUP,
                                           DJANGO_SETTINGS_MODULE="tests.django_project.broken_settings"))
    assert run.returncode == 2 and took < AT_ONCE
    assert "DJANGO_SETTINGS_MODULE='tests.django_project.broken_settings'" in run.stderr
    assert "broken on purpose" in run.stderr


def test_django_admin_packmule_worker_without_settings_exits_non_zero_at_once() -> None:
    # (Django's own dispatch answers: without settings it knows no app's commands)
    env = django_env()
    del env["DJANGO_SETTINGS_MODULE"]
    run = subprocess.run([sys.executable, "-m", "django", "packmule_worker"], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=AT_ONCE, stdin=subprocess.DEVNULL)
    assert run.returncode != 0
    assert "No Django settings specified" in run.stderr


def test_manage_py_packmule_worker_with_broken_settings_exits_non_zero_at_once() -> None:
    run = manage("packmule_worker", env=django_env(DJANGO_SETTINGS_MODULE="tests.django_project.broken_settings"),
                 timeout=AT_ONCE)
    assert run.returncode != 0
    assert "broken on purpose" in run.stderr


@pytest.fixture(scope="module")
def cluster() -> Iterator[Harness]:
    """A beanstalk cluster served by a plain ``packmule worker`` made a Django one
    by PACKMULE_WORKER_SETUP (its children import the shop's runners through the app)."""
    with beanstalk_harness(concurrency=1, worker_env={"PACKMULE_WORKER_SETUP": SETUP,
                                                      "DJANGO_SETTINGS_MODULE": SETTINGS}) as h:
        yield h


def test_the_status_and_progress_commands_read_the_projects_settings(cluster: Harness) -> None:
    shop = Shop("status-of-the-shop", backend=cluster.backend)
    shop.enqueue("out_of_stock", "socks")  # (it raises: status lists its failure)
    shop.wait(timeout=30)
    setting = {k[len("PACKMULE_"):]: v for k, v in cluster.env.items()}
    env = django_env(DJANGO_TEST_PACKMULE=json.dumps(setting))  # the PACKMULE setting, no PACKMULE_* variable
    progress = manage("packmule_progress", "status-of-the-shop", env=env)
    assert progress.returncode == 0, progress.stderr
    assert progress.stdout.strip() == "1.0 / 1.0"
    status = manage("packmule_status", "status-of-the-shop", env=env)
    assert "run status-of-the-shop" in status.stdout and "failed 1" in status.stdout, status.stdout + status.stderr
    assert "LookupError: out of stock: socks" in status.stdout
    assert "queue (beanstalk)" in status.stdout


def test_reload_restarts_the_worker_when_a_py_file_of_the_project_changes(cluster: Harness) -> None:
    probe = Path(ROOT, "tests", "django_project", "_reload_probe.py")
    env = django_env(**cluster.env)
    proc = subprocess.Popen([sys.executable, MANAGE, "packmule_worker", "--reload", "--concurrency", "1",
                             "--grace", "5"], cwd=ROOT, env=env, stdin=subprocess.DEVNULL)
    try:
        first = _worker_child(proc)
        probe.write_text("CHANGED = 1\n")
        deadline = time.monotonic() + 30
        while _worker_child(proc) in (first, None):
            assert time.monotonic() < deadline, "--reload did not restart the worker after a file changed"
            time.sleep(0.2)
        assert proc.poll() is None
    finally:
        probe.unlink(missing_ok=True)
        assert stop_worker(proc) == 0


def _worker_child(proc: subprocess.Popen[bytes]) -> int | None:
    """The pid of the worker the reloader runs (its child), once it serves; None meanwhile."""
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        children = psutil.Process(proc.pid).children()
        if children and len(children[0].children()) >= 1:  # (the worker's own child: it serves)
            return children[0].pid
        time.sleep(0.1)
    return None


def test_the_dashboard_command_is_the_clis_with_the_projects_settings() -> None:
    # off loopback without a token the CLI refuses to serve (exit 2), saying why; local: it says where to serve
    refused = manage("packmule_dashboard", "--host", "0.0.0.0", timeout=AT_ONCE)
    assert refused.returncode == 2 and "token" in refused.stderr
    local = manage("packmule_dashboard", timeout=AT_ONCE)
    assert local.returncode == 2 and "PACKMULE_DASHBOARD_PORT" in local.stderr
