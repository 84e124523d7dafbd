"""A screenshot of the dashboard's runs page, for README: docs/dashboard.png.

    python scripts/screenshot.py [--out docs/dashboard.png]

Starts a few runs on a local backend of this process (two complete, one whose
jobs partly failed, one running), serves the dashboard from this process with
uvicorn on a loopback port, and photographs the runs page (1280x800) in
Debian's headless Chromium, as the browser tests drive it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # tests.browser, tests.web_runners
os.environ.setdefault("PACKMULE_WORKERS", "2")

from packmule.backends._choice import get_backend  # noqa: E402

from packmule._driver.watcher import Watcher  # noqa: E402
from packmule.web import create_app  # noqa: E402
from tests.browser import WINDOW, browser_missing, served, start_chromium  # noqa: E402
from tests.web_runners import Gated  # noqa: E402

WAIT = 120.0  # s the runs, or the page, may take


def start_runs(backend: object) -> Gated:
    """The runs the picture shows; returns the one left running."""
    done = Gated("nightly-report", backend=backend)
    done.enqueue_each("noop", range(240))
    done.wait(timeout=WAIT)
    thumbs = Gated("thumbnails-2026-11", backend=backend)
    thumbs.enqueue_each("nap", range(60), 0.01)
    thumbs.wait(timeout=WAIT)
    failing = Gated("import-customers", backend=backend)
    failing.enqueue_each("fails_if_odd", range(36))
    failing.wait(timeout=WAIT)
    running = Gated("reindex-search", backend=backend)
    running.enqueue_each("nap", range(500), 0.08)
    return running


def wait_for(condition: object, what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise SystemExit(f"gave up after {WAIT:g} s waiting for {what}")
        time.sleep(0.1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "docs" / "dashboard.png"))
    out = Path(ap.parse_args().out)
    missing = browser_missing()
    if missing:
        raise SystemExit(missing)
    from selenium.webdriver.common.by import By

    backend = get_backend("local")
    try:
        running = start_runs(backend)
        wait_for(lambda: running.update_progress().done >= 120, "the running run to be under way")
        with served(create_app(Watcher(backend))) as url:
            browser = start_chromium()
            try:  # the page itself 1280x800, whatever the window's frame takes
                size = {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False}
                browser.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", size)
                browser.get(url + "/")
                rows = 'table#runs tr.run[data-run="reindex-search"] .rate'
                wait_for(lambda: len(browser.find_elements(By.CSS_SELECTOR, "table#runs tr.run")) >= 4
                         and browser.find_element(By.CSS_SELECTOR, rows).text.strip() not in ("", "-", "—"),
                         "the runs page to list the four runs, the running one with its rate")
                time.sleep(1.5)  # a second poll, so rate and ETA have settled
                out.parent.mkdir(parents=True, exist_ok=True)
                if not browser.get_screenshot_as_file(str(out)):
                    raise SystemExit(f"Chromium did not write {out}")
            finally:
                browser.quit()
        running.cancel()
    finally:
        backend.close()
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
