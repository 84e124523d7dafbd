"""The example project ``packmule.examples.django_shop`` as README starts it - ``setup``,
then ``runserver`` (a real WSGI server, in a subprocess on a free loopback port) -
driven by Debian's headless Chromium: the Reprice button starts a run on commit,
the run's ``<packmule-progress>`` bar reaches 101.0 / 101.0, the continuation
wrote the summary row exactly once, and the admin's runs page (staff) lists the
run complete.  On the local backend (the server's process starts the workers) and
on a beanstalk cluster served by the example's ``packmule_worker``; on a file
SQLite and on PostgreSQL."""

from __future__ import annotations

import re
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from conformance.harness import beanstalk_harness, stop_worker
from tests.browser import browser_fixture, free_port, require_browser, wait_until  # noqa: F401 (a fixture)
from tests.django_project.pytest_fixtures import ROOT

EXAMPLE = [sys.executable, "-m", "packmule.examples.django_shop"]
WAIT = 60.0
PRODUCTS = 100


@dataclass
class Shop:
    url: str
    admin_password: str
    db: dict[str, str]  # SHOP_DB or SHOP_PG

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        """A query on the example's database, from this process."""
        if "SHOP_DB" in self.db:
            import sqlite3

            with sqlite3.connect(self.db["SHOP_DB"]) as conn:
                return list(conn.execute(sql))
        import psycopg

        address, _, name = self.db["SHOP_PG"].partition("/")
        host, _, port = address.partition(":")
        with psycopg.connect(host=host, port=int(port), user="postgres", dbname=name) as conn:
            return list(conn.execute(sql))


@pytest.fixture(scope="module", params=["local", "beanstalk"])
def backend_env(request: pytest.FixtureRequest) -> Iterator[dict[str, str]]:
    """The example's PACKMULE_* variables: none (its setting: local), or a beanstalk cluster's."""
    if request.param == "local":
        yield {}
        return
    with beanstalk_harness(concurrency=0) as h:
        yield dict(h.env)


@pytest.fixture(params=["sqlite", "pg"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    if request.param == "sqlite":
        return {"SHOP_DB": str(tmp_path / "django_shop.sqlite3")}
    import psycopg

    server = request.getfixturevalue("postgres")
    name = f"shop_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(host="127.0.0.1", port=server.port, user="postgres", dbname="postgres",
                         autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return {"SHOP_PG": f"127.0.0.1:{server.port}/{name}"}


def example_env(extra: dict[str, str]) -> dict[str, str]:
    """A fresh shell's environment (no DJANGO_SETTINGS_MODULE, no PACKMULE_*) plus ``extra``."""
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith(("PACKMULE_", "DJANGO_"))}
    return {**env, "PYTHONPATH": str(ROOT), "SHOP_PAUSE": "0.02", **extra}


def wait_for_page(url: str, server: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        assert server.poll() is None, f"the example's server exited with {server.returncode}"
        try:
            with urllib.request.urlopen(url, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            assert time.monotonic() < deadline, f"{url} did not answer within {WAIT:g} s"
            time.sleep(0.2)


@pytest.fixture
def shop(backend_env: dict[str, str], database: dict[str, str], tmp_path: Path) -> Iterator[Shop]:
    """The example started with README's two commands (and, on a cluster, its worker)."""
    env = example_env({**backend_env, **database})
    setup = subprocess.run([*EXAMPLE, "setup"], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=WAIT, stdin=subprocess.DEVNULL)
    assert setup.returncode == 0, setup.stderr
    password = re.search(r"admin / (\S+)", setup.stdout)
    assert password is not None and f"{PRODUCTS} products" in setup.stdout, setup.stdout
    port = free_port()
    log = (tmp_path / "server.log").open("wb")
    procs = [subprocess.Popen([*EXAMPLE, "runserver", "--noreload", f"127.0.0.1:{port}"], cwd=tmp_path, env=env,
                              stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)]
    if backend_env:
        procs.append(subprocess.Popen([*EXAMPLE, "packmule_worker", "--concurrency", "4", "--log-level", "WARNING"],
                                      cwd=tmp_path, env=env, stdin=subprocess.DEVNULL))
    try:
        wait_for_page(f"http://127.0.0.1:{port}/", procs[0])
        yield Shop(f"http://127.0.0.1:{port}", password.group(1), database)
    finally:
        for proc in reversed(procs):
            stop_worker(proc)  # (SIGTERM, then SIGKILL after 20 s)
        log.close()


def text(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text.strip())


def test_the_shops_reprice_run_reaches_101_of_101_and_writes_its_summary_once(shop: Shop, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    # Given the shop's page, When Reprice is clicked (the run is queued when its transaction commits)
    browser.get(shop.url + "/")
    assert f"{PRODUCTS} products" in text(browser, "h1")
    browser.find_element(By.CSS_SELECTOR, "button#reprice").click()
    wait_until(browser, lambda: "/runs/reprice-" in browser.current_url, "the run's page")
    name = browser.current_url.rstrip("/").rsplit("/", 1)[1]
    # Then its <packmule-progress> bar reaches exactly 101.0 / 101.0: 1 + 100 jobs, the continuation in the root's
    wait_until(browser, lambda: text(browser, "packmule-progress .packmule-progress-text") == "101.0 / 101.0",
               "the run's bar to show 101.0 / 101.0")
    bar = browser.find_element(By.CSS_SELECTOR, "packmule-progress progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == "101"
    # and the continuation wrote the run's summary row once, over every product repriced by 5 %
    summaries = shop.rows(f"SELECT products, total_cents FROM django_shop_summary WHERE run = '{name}'")
    expected = sum(100 * i * 105 // 100 for i in range(1, PRODUCTS + 1))
    assert summaries == [(PRODUCTS, expected)]
    assert shop.rows("SELECT SUM(price_cents) FROM django_shop_product") == [(expected,)]
    assert shop.rows("SELECT COUNT(*) FROM django_shop_summary") == [(1,)]


def test_the_admin_lists_the_shops_run_complete_for_staff(shop: Shop, browser: Any) -> None:
    from selenium.webdriver.common.by import By

    browser.delete_all_cookies()
    browser.get(shop.url + "/")
    browser.find_element(By.CSS_SELECTOR, "button#reprice").click()
    wait_until(browser, lambda: "/runs/reprice-" in browser.current_url, "the run's page")
    name = browser.current_url.rstrip("/").rsplit("/", 1)[1]
    # an anonymous visitor is sent to the admin's login page; the admin logs in
    browser.get(shop.url + "/admin/packmule/")
    assert "/admin/login/" in browser.current_url
    browser.find_element(By.NAME, "username").send_keys("admin")
    browser.find_element(By.NAME, "password").send_keys(shop.admin_password)
    browser.find_element(By.CSS_SELECTOR, "input[type=submit]").click()
    wait_until(browser, lambda: browser.current_url.endswith("/admin/packmule/"), "the admin's runs page")
    row = f'tr[data-run="{name}"]'
    # the row updates in place (no reload) until the run is complete
    wait_until(browser, lambda: text(browser, f"{row} .packmule-progress-text") == "101.0 / 101.0",
               "the admin's row to show 101.0 / 101.0")
    wait_until(browser, lambda: text(browser, f"{row} .packmule-state") == "complete", "the run complete")
