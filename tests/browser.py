"""Debian's Chromium driven by selenium, and an ASGI app served by a real uvicorn
on a loopback port: what the browser tests, scripts/screenshot.py and
benchmarks/bench_web.py share.

Nothing here downloads a browser.  selenium is given both paths (the browser,
``/usr/bin/chromium``, and its driver, ``/usr/bin/chromedriver``, from the Debian
packages ``chromium`` and ``chromium-driver``), so Selenium Manager, which would
fetch them, is never run; and ``SE_MANAGER_PATH`` names no file, so a selenium
that tried to run it would fail instead of downloading.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
SELENIUM_MANAGER_BARRED = "/nonexistent/selenium-manager-is-not-used"  # SE_MANAGER_PATH: no file there
INSTALL_HINT = "apt-get install -y chromium chromium-driver && pip install -e '.[web,browser]'"
SERVE_TIMEOUT = 30.0  # s uvicorn may take to answer, and to stop
WAIT = 60.0  # s any page or run may take to reach what a test waits for
WINDOW = (1280, 800)  # px: the browser window, and the screenshot's size


def browser_missing() -> str | None:
    """None if a headless Chromium can show the dashboard here, else what is
    missing and how to install it."""
    missing = [path for path in (CHROMIUM, CHROMEDRIVER) if not os.access(path, os.X_OK)]
    missing += [f"python package {name}" for name in ("selenium", "starlette", "uvicorn", "prometheus_client")
                if importlib.util.find_spec(name) is None]
    if not missing:
        return None
    return f"missing {', '.join(missing)}; install with: {INSTALL_HINT}"


def start_chromium(width: int = WINDOW[0], height: int = WINDOW[1]) -> Any:
    """A headless Chromium (a selenium ``WebDriver``); ``quit()`` it when done."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_MANAGER_PATH"] = SELENIUM_MANAGER_BARRED
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--disable-extensions", "--no-first-run", f"--window-size={width},{height}"):
        options.add_argument(arg)
    # executable_path given: selenium skips Selenium Manager (its debug log says so)
    service = Service(executable_path=CHROMEDRIVER, log_output=subprocess.DEVNULL)
    return webdriver.Chrome(options=options, service=service)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def served(app: Any, port: int | None = None) -> Iterator[str]:
    """Serve the ASGI ``app`` with uvicorn on 127.0.0.1 in a thread of this
    process; yields its base URL once it accepts connections, and stops it
    (waiting for the thread) afterwards."""
    import uvicorn

    port = port or free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan="off", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, name=f"uvicorn-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVE_TIMEOUT
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            raise RuntimeError(f"uvicorn did not start serving on 127.0.0.1:{port} within {SERVE_TIMEOUT:g} s")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(SERVE_TIMEOUT)


def require_browser() -> None:
    missing = browser_missing()
    if missing is None:
        return
    if os.environ.get("PACKMULE_REQUIRE_CLUSTER") == "1":
        pytest.fail(f"the browser tests cannot run: {missing} (PACKMULE_REQUIRE_CLUSTER=1: no skipping them)",
                    pytrace=False)
    pytest.skip(missing)


@pytest.fixture(scope="module", name="browser")
def browser_fixture() -> Iterator[Any]:
    require_browser()
    driver = start_chromium()
    try:
        yield driver
    finally:
        driver.quit()


def wait_until(driver: Any, condition: Callable[[], Any], message: str, timeout: float = WAIT,
               poll: float = 0.1) -> Any:
    """WebDriverWait for ``condition()`` to be truthy; elements replaced while it
    reads them (the page re-rendered) make it read again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=poll,
                         ignored_exceptions=(NoSuchElementException, StaleElementReferenceException)).until(
        lambda _: condition(), message)
