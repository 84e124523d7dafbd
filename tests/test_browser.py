"""The dashboard in a real browser: Debian's headless Chromium, driven by
selenium, against a real uvicorn serving ``packmule.web`` on a loopback port,
on both backends.  On the local backend this test process is the driver: it
runs the jobs' coordinator and serves the dashboard itself.  On the beanstalk
backend the cluster fixtures start beanstalkd, memcached, ZooKeeper and a
``packmule worker``; this process serves the dashboard of that cluster.

Pages must update live: each test marks the page's window (``window.__marker``)
once it loaded and checks the mark is still there at the end, so a page that
reloads itself fails.  The browser is missing -> skipped with the reason, or
failed under PACKMULE_REQUIRE_CLUSTER=1 (CI)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from conformance.harness import Harness, beanstalk_harness, local_harness
from tests.browser import WAIT, browser_fixture, require_browser, served, wait_until  # noqa: F401 (a fixture)
from tests.web_runners import Gated

SETTLE = 2.0  # s the done count of a cancelled run must stay put


@dataclass
class Stack:
    """A backend with workers, and the dashboard of it served from this process."""

    harness: Harness
    url: str

    @property
    def backend(self) -> Any:
        return self.harness.backend


@pytest.fixture(scope="module", params=["local", "beanstalk"])
def stack(request: pytest.FixtureRequest) -> Iterator[Stack]:
    require_browser()
    from packmule._driver.watcher import Watcher
    from packmule.web import create_app

    harness = local_harness() if request.param == "local" else beanstalk_harness(concurrency=2)
    with harness as h, served(create_app(Watcher(h.backend))) as url:
        yield Stack(h, url)


def mark_page(driver: Any) -> None:
    driver.execute_script("window.__marker = 1")


def page_was_not_reloaded(driver: Any) -> bool:
    return bool(driver.execute_script("return window.__marker === 1"))


def run_row(driver: Any, name: str) -> dict[str, str]:
    """What the runs page shows of a run: its cells' texts and its bar's value and max."""
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.CSS_SELECTOR, f'table#runs tr.run[data-run="{name}"]')
    bar = row.find_element(By.CSS_SELECTOR, "progress.bar")
    shown = {cell: row.find_element(By.CSS_SELECTOR, f".{cell}").text.strip()
             for cell in ("progress-text", "state", "failed")}
    shown.update(value=bar.get_attribute("value") or "", max=bar.get_attribute("max") or "")
    return shown


def text_of(driver: Any, css: str) -> str:
    from selenium.webdriver.common.by import By

    return str(driver.find_element(By.CSS_SELECTOR, css).text.strip())


def test_the_runs_page_shows_a_run_reach_complete_without_a_reload(stack, browser, tmp_path):
    # Given a run of 12 jobs held at a gate, and the runs page open on it
    gate = tmp_path / "gate"
    runner = Gated(backend=stack.backend)
    runner.enqueue_each("held", range(12), str(gate))
    browser.get(stack.url + "/")
    before = wait_until(browser, lambda: run_row(browser, runner.name), f"the runs page lists run {runner.name}")
    assert before["progress-text"] == "0.0 / 12.0" and before["state"] != "complete"
    mark_page(browser)
    # When its jobs are let through
    gate.touch()
    # Then, without a reload, its bar fills and its row says it is complete
    final = {"progress-text": "12.0 / 12.0", "state": "complete", "failed": "0", "value": "12", "max": "12"}
    wait_until(browser, lambda: run_row(browser, runner.name) == final,
               f"run {runner.name}'s row to show {final}")
    assert page_was_not_reloaded(browser)
    assert runner.update_progress() == "12.0 / 12.0"


def test_cancel_on_a_running_runs_page_stops_it_and_the_page_says_so(stack, browser):
    # Given a run of 600 short naps under way, its page open
    runner = Gated(backend=stack.backend)
    runner.enqueue_each("nap", range(600), 0.05)
    browser.get(f"{stack.url}/runs/{runner.name}")
    wait_until(browser, lambda: int(text_of(browser, "#done") or 0) > 0, f"run {runner.name}'s page to show jobs done")
    mark_page(browser)
    # When Cancel is clicked
    from selenium.webdriver.common.by import By

    browser.find_element(By.CSS_SELECTOR, "button#cancel").click()
    with contextlib.suppress(Exception):  # a page may ask to confirm
        browser.switch_to.alert.accept()
    # Then the page says the run is cancelled, without a reload
    wait_until(browser, lambda: text_of(browser, "#state") == "cancelled", f"run {runner.name}'s page to say cancelled")
    assert page_was_not_reloaded(browser)
    # and the run stops: its done count comes to rest short of its total, and stays there
    counts: list[int] = []

    def at_rest() -> bool:
        counts.append(Gated(runner.name, backend=stack.backend).update_progress().done)
        return len(counts) > 1 and counts[-1] == counts[-2]

    wait_until(browser, at_rest, f"run {runner.name}'s done count to stop rising (read: {counts})", poll=SETTLE)
    progress = Gated(runner.name, backend=stack.backend).update_progress()
    assert progress.done < progress.total == 600, f"the cancelled run went on to {progress}"


@pytest.fixture
def split_stack() -> Iterator[Stack]:
    """Two beanstalkd, two memcached and a ZooKeeper (no worker), and their dashboard."""
    require_browser()
    from packmule._driver.watcher import Watcher
    from packmule.web import create_app

    with beanstalk_harness(concurrency=0, beanstalkds=2, memcacheds=2) as h, \
            served(create_app(Watcher(h.backend))) as url:
        yield Stack(h, url)


def server_rows(driver: Any) -> dict[str, dict[str, str]]:
    """What the Queue page's servers table shows: address -> its cells' texts."""
    from selenium.webdriver.common.by import By

    rows = driver.find_elements(By.CSS_SELECTOR, "table#servers tr.server-state")
    return {row.get_attribute("data-server"): {cell: row.find_element(By.CSS_SELECTOR, f".{cell}").text.strip()
                                               for cell in ("service", "state", "since", "back", "role", "problem")}
            for row in rows}


def servers_shown(driver: Any, check: Callable[[dict[str, dict[str, str]]], bool]) -> Callable[[], Any]:
    """A condition for ``wait_until``: the servers table's rows, once ``check(rows)`` holds."""
    def look() -> dict[str, dict[str, str]] | None:
        rows = server_rows(driver)
        return rows if check(rows) else None
    return look


def test_the_queue_page_shows_a_killed_server_aside_then_back_without_a_reload(split_stack, browser):
    queues, stores = split_stack.harness.extras["beanstalkds"], split_stack.harness.extras["memcacheds"]
    zk = split_stack.harness.extras["zookeeper"]
    # Given the Queue page of a cluster whose five servers are up
    browser.get(split_stack.url + "/queue")
    services = {queues[0].address: "beanstalkd", queues[1].address: "beanstalkd", stores[0].address: "memcached",
                stores[1].address: "memcached", zk.address: "ZooKeeper"}
    rows = wait_until(browser, servers_shown(browser, lambda r: {a: x["service"] for a, x in r.items()} == services
                                             and all(x["state"] == "up" for x in r.values())),
                      "the servers table to list the five servers, up")
    assert rows[zk.address]["role"] == "standalone"
    mark_page(browser)
    # When one beanstalkd and one memcached are killed
    dead = {queues[1].address, stores[1].address}
    queues[1].kill()
    stores[1].kill()
    # Then, without a reload, their rows say aside, since when and why; the others stay up
    rows = wait_until(browser, servers_shown(browser, lambda r: all(r[a]["state"] == "aside" for a in dead)),
                      "the killed servers' rows to say aside")
    for address, row in rows.items():
        if address in dead:
            assert row["since"].endswith(" ago)") and row["problem"], row
        else:
            assert row["state"] == "up" and row["since"] == "", row
    # When they are started again
    queues[1].start()
    stores[1].start()
    # Then their rows say up again, back since a moment ago
    rows = wait_until(browser, servers_shown(browser, lambda r: all(r[a]["state"] == "up" for a in dead)),
                      "the restarted servers' rows to say up")
    for address in dead:
        assert rows[address]["back"].endswith(" ago)") and rows[address]["since"] == "", rows[address]
    assert page_was_not_reloaded(browser)


@pytest.fixture
def example_env(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> Iterator[Stack]:
    """The stack's backend named by the environment, as the example page finds it."""
    from packmule.backends import _choice

    for var, value in stack.harness.env.items():
        monkeypatch.setenv(var, value)
    yield stack
    if stack.harness.backend.name != "local":  # a local one is a client of the harness's coordinator
        _choice.get_backend().close()


def test_the_example_pages_progress_element_reaches_101_of_101(example_env, browser):
    from selenium.webdriver.common.by import By

    from packmule.examples import web_page

    # Given the example web app (a page that starts a SleepyRunner run and embeds its bar), with short naps
    app = web_page.make_app(nap_seconds=0.1)
    with served(app) as url:
        browser.get(url + "/")
        mark_page(browser)
        # When Start is clicked
        browser.find_element(By.CSS_SELECTOR, "button#start").click()
        # Then the embedded <packmule-progress> shows the run's bar reach exactly 101.0 / 101.0
        shown = ".packmule-progress-text"
        wait_until(browser, lambda: text_of(browser, f"packmule-progress {shown}") not in ("", "101.0 / 101.0"),
                   "the embedded progress element to show the run under way")
        wait_until(browser, lambda: text_of(browser, f"packmule-progress {shown}") == "101.0 / 101.0",
                   "the embedded progress element to show 101.0 / 101.0")
        assert page_was_not_reloaded(browser)
        bar = browser.find_element(By.CSS_SELECTOR, "packmule-progress progress")
        assert bar.get_attribute("value") == bar.get_attribute("max") == "101"


def test_the_browser_is_debians_chromium_not_a_downloaded_one(browser):
    import psutil

    from tests.browser import CHROMEDRIVER

    driver = psutil.Process(browser.service.process.pid)
    assert driver.exe() == os.path.realpath(CHROMEDRIVER)
    browsers = [child.exe() for child in driver.children()]  # /usr/bin/chromium runs Debian's build in /usr/lib
    assert browsers and all(exe.startswith("/usr/lib/chromium/") for exe in browsers), browsers
    assert os.environ["SE_MANAGER_PATH"] and not os.path.exists(os.environ["SE_MANAGER_PATH"])


def test_the_schedules_page_shows_a_tick_fire_and_its_run_complete_without_a_reload(stack, browser):
    from datetime import datetime, timedelta, timezone

    from conformance import scheduled_more
    from packmule._model.scheduled import DECLARED
    from packmule.scheduling import Scheduler

    key = "Crashy.tick"
    now = [datetime(2033, 3, 1, 8, 0, 0, 500_000, tzinfo=timezone.utc)]
    ledger = stack.backend.ledger
    raw, token = ledger.read(f"schedule:{key}:last")
    if raw is not None:
        ledger.swap(f"schedule:{key}:last", token, None, 0)
    scheduler = Scheduler(stack.backend, {key: DECLARED[key]}, clock=lambda: now[0])
    scheduler.run_pass()  # (first sight: the schedule is noted for the dashboard; nothing fires)
    # Given the schedules page open on a schedule that has not fired yet
    browser.get(stack.url + "/schedules")
    row = f'table#schedules tr.schedule[data-key="{key}"]'
    wait_until(browser, lambda: text_of(browser, row + " .kind") == "every 1s", f"the schedules page lists {key}")
    mark_page(browser)
    # When its next tick fires
    now[0] += timedelta(seconds=1)
    scheduler.run_pass()
    (run,) = scheduler.queued
    scheduled_more.Crashy(run, backend=stack.backend).wait(timeout=WAIT)
    # Then, without a reload, the page shows the tick, its run complete, and one more fired
    wait_until(browser, lambda: text_of(browser, row + " .run") == f"{run} 1.0 / 1.0",
               f"the schedules page to show {run} complete")
    assert text_of(browser, row + " .last") == "2033-03-01T08:00:01+00:00"
    assert int(text_of(browser, row + " .fired")) >= 1
    link = browser.find_element("css selector", row + " .run a")
    assert link.get_attribute("href").endswith("/runs/" + run.replace(":", "%3A"))
    assert page_was_not_reloaded(browser)
