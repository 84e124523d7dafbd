"""The Django app's configuration: the PACKMULE setting and the environment
(which wins), the system checks, the hooks it installs, and the refusals of an
in-memory SQLite database."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.test import override_settings

import packmule
from packmule._core.hooks import WORKER_ENV, WORKER_SETUP_VAR
from packmule._driver import on_commit
from packmule.contrib.django import checks, conf, worker
from packmule.testing import backend_for_test
from tests.django_project.pytest_fixtures import django_env, manage


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in [v for v in os.environ if v.startswith("PACKMULE_") or v == "WEB_CONCURRENCY"]:
        monkeypatch.delenv(var)


def ids(messages: list[Any]) -> list[str]:
    return [m.id for m in messages]


# --- the setting and the environment -----------------------------------------------
def test_the_setting_fills_the_environment_where_it_is_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACKMULE_TUBE", "from-the-environment")
    put = conf.export({"BACKEND": "beanstalk", "TUBE": "from-the-setting", "INSECURE": True,
                       "BEANSTALKD": ["10.0.0.5:11300", "10.0.0.6:11300"], "RUNNERS_MODULE": "jobs"})
    try:
        assert os.environ["PACKMULE_TUBE"] == "from-the-environment"  # the environment wins
        assert os.environ["PACKMULE_BACKEND"] == "beanstalk"
        assert os.environ["PACKMULE_INSECURE"] == "1"
        assert os.environ["PACKMULE_BEANSTALKD"] == "10.0.0.5:11300,10.0.0.6:11300"
        assert sorted(put) == ["PACKMULE_BACKEND", "PACKMULE_BEANSTALKD", "PACKMULE_INSECURE"]
    finally:
        for var in put:
            del os.environ[var]


@pytest.mark.parametrize("setting, says", [
    ({"PACKMULE_SECRET": "x"}, "write 'SECRET'"),
    ({"secret": "x"}, "no variable name"),
    ({"SECRET": {"a": 1}}, "give a str"),
    ({"RUNNERS_MODULE": "my.jobs"}, "give a module name"),
])
def test_a_bad_setting_is_refused_saying_why(setting: dict[str, Any], says: str) -> None:
    with override_settings(PACKMULE=setting), pytest.raises(ImproperlyConfigured, match=says):
        conf.runners_module(conf.packmule_setting())
        conf.variables(conf.packmule_setting())


# --- the checks ---------------------------------------------------------------------
def test_a_cluster_backend_without_a_secret_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    with override_settings(PACKMULE={"BACKEND": "beanstalk"}):
        assert ids(checks.check_secret()) == ["packmule.E001"]
        monkeypatch.setenv("PACKMULE_SECRET", "s3cret")  # the environment's counts
        assert checks.check_secret() == []
    with override_settings(PACKMULE={"BACKEND": "beanstalk", "INSECURE": True}):
        assert checks.check_secret() == []
    with override_settings(PACKMULE={}):
        assert checks.check_secret() == []  # local: a secret of its own


def test_the_local_backend_under_a_server_of_several_processes_is_a_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    with override_settings(PACKMULE={}):
        assert checks.check_local_backend() == []
        monkeypatch.setenv("WEB_CONCURRENCY", "4")
        (warning,) = checks.check_local_backend()
        assert warning.id == "packmule.W002" and "invisible to the others" in warning.msg
        assert "packmule_worker" in warning.hint
    with override_settings(PACKMULE={"BACKEND": "beanstalk", "SECRET": "x"}):
        assert checks.check_local_backend() == []


def test_gunicorn_with_several_workers_is_a_server_of_several_processes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["/usr/bin/gunicorn", "-w", "4", "mysite.wsgi"])
    assert checks.multiprocess_server() == "gunicorn --workers 4"
    monkeypatch.setattr("sys.argv", ["/usr/bin/gunicorn", "--workers=1", "mysite.wsgi"])
    assert checks.multiprocess_server() is None


def test_an_in_memory_sqlite_database_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.conf import settings

    assert checks.check_database() == []
    monkeypatch.setitem(settings.DATABASES, "mem", {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"})
    (error,) = checks.check_database()
    assert error.id == "packmule.E003" and "'mem'" in error.msg


def test_manage_py_check_shows_the_checks() -> None:
    run = manage("check", env=django_env(DJANGO_TEST_PACKMULE='{"BACKEND": "beanstalk"}'))
    assert run.returncode == 1
    assert "packmule.E001" in run.stderr
    assert manage("check").returncode == 0


# --- what the app installs ----------------------------------------------------------
def test_the_app_installs_its_hooks_at_ready() -> None:
    assert on_commit._defer is not None
    assert worker.env_for_workers in WORKER_ENV
    env = worker.env_for_workers()
    assert conf.SETUP_TARGET in env[WORKER_SETUP_VAR].split(",")
    assert '"default"' in env[conf.DATABASES_VAR]


def test_without_the_app_an_on_commit_enqueue_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(on_commit, "_defer", None)

    class Shop(packmule.Runner):
        def sell(self) -> None: ...

    with pytest.raises(RuntimeError, match="packmule.contrib.django"):
        Shop("x").enqueue_on_commit("sell")


def test_the_test_backend_refuses_an_in_memory_sqlite_database(monkeypatch: pytest.MonkeyPatch) -> None:
    from django.conf import settings

    monkeypatch.setitem(settings.DATABASES["default"], "NAME", "file:memorydb_default?mode=memory&cache=shared")
    with pytest.raises(ImproperlyConfigured, match=r"in-memory SQLite.*TEST'\]\['NAME'\]"), backend_for_test(1):
        pass


def test_a_local_worker_whose_setup_fails_is_not_replaced(monkeypatch: pytest.MonkeyPatch) -> None:
    from packmule.backends.local import LocalBackend

    monkeypatch.setenv("DJANGO_SETTINGS_MODULE", "tests.django_project.broken_settings")  # (the workers' only)
    backend = LocalBackend(workers=1)
    try:
        backend.ensure_workers()
        first = backend._procs[0]
        assert first.wait(30) == 78  # its setup failed: DJANGO_SETTINGS_MODULE's settings do not load
        time.sleep(1.5)  # (longer than the supervisor takes to replace a worker)
        assert backend._procs == [first] and backend.worker_pids() == []
    finally:
        backend.close(grace=0)
