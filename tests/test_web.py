"""The web dashboard (``packmule.web``) served by a real uvicorn on a free
loopback port, read over the socket with httpx, on the local backend and on a
real beanstalk cluster: the JSON API agrees with ``update_progress()``, the
event stream ends at the run's last count, ``/metrics`` counts every job once,
and the guards (token, cross-site, the allow hook) hold."""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("starlette", reason="packmule[web] is not installed")  # (CI installs it)

import httpx  # noqa: E402
import uvicorn  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.routing import Mount  # noqa: E402

import packmule  # noqa: E402
import packmule.web  # noqa: E402
from conformance.harness import Harness, beanstalk_harness, local_harness  # noqa: E402
from conformance.runners import Flaky  # noqa: E402
from conformance.servers import free_port  # noqa: E402
from packmule._driver.watcher import Watcher
from packmule._model.registry import BEAT  # noqa: E402
from packmule.examples.sleepy import SleepyRunner  # noqa: E402

WAIT = 60.0  # s: the longest any run or poll here may take before the test fails
STREAM_WAIT = 20.0  # s for the event stream of a 1 s run to end
METRICS_WAIT = 10.0  # s for the workers' next beats to publish their counts
PROGRESS = re.compile(r"\d+\.0 / \d+\.0\Z")
TOKEN = "s3cret-token"
HEADERS = {"X-PackMule": "1"}
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", params=["local", "beanstalk"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    factory = local_harness if request.param == "local" else beanstalk_harness
    with factory() as h:
        yield h


@pytest.fixture(scope="module")
def local() -> Iterator[Harness]:
    with local_harness() as h:
        yield h


@contextlib.contextmanager
def served(h: Harness, **options: Any) -> Iterator[httpx.Client]:
    """``packmule.web.serve`` in the background on a free port, and a client of it."""
    url = packmule.web.serve(port=0, background=True, watcher=Watcher(h.backend), **options)
    try:
        with httpx.Client(base_url=url, timeout=WAIT) as client:
            yield client
    finally:
        url.stop()  # type: ignore[attr-defined]


@contextlib.contextmanager
def uvicorn_serving(app: Any) -> Iterator[httpx.Client]:
    """Any ASGI app on a real uvicorn in a daemon thread on a free loopback port."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + WAIT
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start listening"
        time.sleep(0.01)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
            yield client
    finally:
        server.should_exit = True
        thread.join(WAIT)


@pytest.fixture(scope="module")
def dashboard(harness: Harness) -> Iterator[httpx.Client]:
    with served(harness) as client:
        yield client


def sleepy(h: Harness, naps: int, nap_seconds: float) -> SleepyRunner:
    """A SleepyRunner run of ``naps`` naps of 0 or ``nap_seconds`` s, started (not waited for)."""
    runner = SleepyRunner(f"web-{uuid.uuid4().hex[:10]}", backend=h.backend)
    runner.nap_seconds = nap_seconds
    runner.run_async(naps)
    return runner


def run_json(client: httpx.Client, name: str) -> dict[str, Any]:
    answer = client.get(f"/api/runs/{name}")
    assert answer.status_code == 200, answer.text
    data: dict[str, Any] = answer.json()
    return data


def until(what: str, check: Any, timeout: float = WAIT) -> Any:
    """Poll ``check()`` until it returns something true; fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        got = check()
        if got:
            return got
        assert time.monotonic() < deadline, f"waited {timeout}s for {what}"
        time.sleep(0.05)


def done_total(client: httpx.Client) -> float:
    answer = client.get("/metrics")
    assert answer.status_code == 200
    for family in text_string_to_metric_families(answer.text):
        for sample in family.samples:
            if sample.name == "packmule_jobs_done_total":
                return float(sample.value)
    raise AssertionError(f"no packmule_jobs_done_total in /metrics:\n{answer.text}")


# --- the API tells what update_progress() tells ----------------------------------------------------------
def test_api_progress_is_the_update_progress_string_during_and_after_a_run(harness, dashboard):
    # Given a run going on
    runner = sleepy(harness, naps=40, nap_seconds=0.05)
    seen = []
    # When the API is read between two reads of update_progress(), until the run is complete
    deadline = time.monotonic() + WAIT
    while True:
        before = runner.update_progress()
        api = run_json(dashboard, runner.name)
        after = runner.update_progress()
        # Then each API value has update_progress()'s form and lies between the reads around it
        assert PROGRESS.match(api["progress"]), api
        assert api["progress"] == f"{float(api['done'])} / {float(api['total'])}"
        assert before.done <= api["done"] <= after.done and before.total <= api["total"] <= after.total, \
            (before, api["progress"], after)
        seen.append(api["progress"])
        if after.complete:
            break
        assert time.monotonic() < deadline, f"the run did not complete: {after}"
        time.sleep(0.02)
    # And once complete, it is exactly update_progress(), with the return value's repr
    final = run_json(dashboard, runner.name)
    assert final["progress"] == str(runner.update_progress()) == "41.0 / 41.0"
    assert final["complete"] is True and final["state"] == "complete"
    assert final["value"] == repr(runner.get_return_value())
    assert len(set(seen)) > 1, f"the API never showed the run in progress: {seen}"


def test_event_stream_sends_changes_and_ends_with_the_complete_count(harness, dashboard):
    runner = sleepy(harness, naps=30, nap_seconds=0.05)
    events = []
    deadline = time.monotonic() + STREAM_WAIT
    with dashboard.stream("GET", f"/api/runs/{runner.name}/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        for line in stream.iter_lines():  # (a quiet stream still sends a comment every 15 s)
            assert time.monotonic() < deadline, f"the event stream did not end; its events: {events}"
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    # the stream closed by itself after its last event
    assert events, "no event"
    last = events[-1]
    assert last["progress"] == "31.0 / 31.0" == str(runner.update_progress())
    assert last["complete"] is True
    assert all(not e["complete"] for e in events[:-1])
    dones = [e["done"] for e in events]
    assert dones == sorted(dones) and len(set(dones)) == len(dones), f"not one event per change: {dones}"


def settled_done_total(client: httpx.Client) -> float:
    """packmule_jobs_done_total once a whole beat has passed without it changing (what
    earlier tests' jobs add is published by the workers' beats, a little later)."""
    deadline = time.monotonic() + METRICS_WAIT
    last = done_total(client)
    while True:
        time.sleep(BEAT + 0.5)
        now = done_total(client)
        if now == last:
            return now
        assert time.monotonic() < deadline, f"packmule_jobs_done_total kept changing: {last} -> {now}"
        last = now


def test_metrics_parse_and_done_total_rises_by_exactly_the_jobs_of_a_run(harness, dashboard):
    before = settled_done_total(dashboard)
    runner = sleepy(harness, naps=20, nap_seconds=0.0)
    jobs = runner.wait(timeout=WAIT).total
    # the workers publish their counts every beat: poll until the whole run is counted
    until("packmule_jobs_done_total to rise", lambda: done_total(dashboard) >= before + jobs, METRICS_WAIT)
    time.sleep(BEAT + 0.5)  # one more beat: a count published twice would show now
    assert done_total(dashboard) == before + jobs


def test_run_api_lists_a_failure_with_its_method_arguments_exception_and_traceback(harness, dashboard):
    runner = Flaky(f"web-fail-{uuid.uuid4().hex[:8]}", backend=harness.backend, max_retries=0)
    runner.enqueue("always", "tag-42")
    until("the failing run to complete", lambda: runner.update_progress().complete)
    data = run_json(dashboard, runner.name)
    assert data["state"] == "failed" and data["failed"] == 1
    [failure] = data["failures"]
    assert failure["method"] == "always" and "tag-42" in str(failure["args"])
    assert failure["exc_type"].endswith("ValueError") and "always fails: tag-42" in failure["message"]
    assert "raise ValueError" in failure["traceback"]


def test_api_servers_lists_each_server_of_the_backend_up(harness, dashboard):
    answer = dashboard.get("/api/servers")
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    if harness.backend.name == "local":
        assert answer.json() == []  # (no servers: the coordinator is a process of this one)
        return
    listed = {(s["service"], s["server"], s["state"]) for s in answer.json()}
    assert listed == {("beanstalkd", harness.extras["beanstalkd"].address, "up"),
                      ("memcached", harness.extras["memcached"].address, "up"),
                      ("ZooKeeper", harness.extras["zookeeper"].address, "up")}
    # (a dead server, its time set aside and its return: tests/test_server_states_shown.py)


def test_unknown_run_answers_404_json(dashboard):
    for path in ("/api/runs/no-such-run", "/api/runs/no-such-run/events"):
        answer = dashboard.get(path)
        assert answer.status_code == 404 and "error" in answer.json()


# --- cancel and forget -------------------------------------------------------------------------------------
def test_cancel_is_post_only_with_the_header_from_this_site_and_cancels(local):
    with served(local) as client:
        runner = sleepy(local, naps=100, nap_seconds=0.5)
        path = f"/api/runs/{runner.name}/cancel"
        assert client.get(path).status_code == 405
        assert client.post(path).status_code == 403  # no X-PackMule header: a cross-site form
        evil = client.post(path, headers={**HEADERS, "Origin": "http://evil.example"})
        assert evil.status_code == 403
        assert run_json(client, runner.name)["state"] == "running"
        same_site = client.post(path, headers={**HEADERS, "Origin": str(client.base_url).rstrip("/")})
        assert same_site.status_code == 200, same_site.text
        assert same_site.json()["run"]["state"] == "cancelled"
        assert run_json(client, runner.name)["state"] == "cancelled"
        with pytest.raises(packmule.Cancelled):
            runner.get_return_value()


def test_forget_removes_the_run(local):
    with served(local) as client:
        runner = sleepy(local, naps=5, nap_seconds=0.0)
        runner.wait(timeout=WAIT)
        path = f"/api/runs/{runner.name}/forget"
        assert client.get(path).status_code == 405
        assert client.post(path).status_code == 403
        assert client.post(path, headers=HEADERS).status_code == 200
        assert client.get(f"/api/runs/{runner.name}").status_code == 404
        assert SleepyRunner(runner.name, backend=local.backend).update_progress() == "0.0 / 0.0"


# --- the token ---------------------------------------------------------------------------------------------
BEARER = {"Authorization": f"Bearer {TOKEN}"}
PROTECTED = ["/", "/runs/{name}", "/workers", "/queue", "/api/runs", "/api/runs/{name}",
             "/api/runs/{name}/events", "/api/workers", "/api/queue", "/metrics", "/static/progress.js",
             "/schedules", "/api/schedules"]


def test_with_a_token_every_page_api_call_stream_and_metrics_needs_it(local):
    runner = sleepy(local, naps=3, nap_seconds=0.0)
    runner.wait(timeout=WAIT)  # (complete: its event stream ends after one event)
    with served(local, token=TOKEN) as client:
        for template in PROTECTED:
            path = template.format(name=runner.name)
            assert client.get(path).status_code == 401, path
            assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401, path
            assert client.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        cancel = f"/api/runs/{runner.name}/cancel"
        assert client.post(cancel, headers=HEADERS).status_code == 401


def test_token_in_the_query_once_sets_an_httponly_strict_cookie(local):
    with served(local, token=TOKEN) as client:
        first = client.get(f"/?token={TOKEN}")
        assert first.status_code == 200
        cookie = first.headers["set-cookie"]
        assert cookie.startswith(f"packmule_token={TOKEN};") and "HttpOnly" in cookie
        assert "SameSite=Strict" in cookie
        assert client.get("/api/runs").status_code == 200  # the client sends the cookie back
        client.cookies.clear()
        assert client.get("/api/runs").status_code == 401


def test_an_open_dashboard_answers_only_requests_for_a_loopback_name(local):
    # A page of another site whose name resolves to 127.0.0.1 (DNS rebinding) sends
    # its own name as Host: an open dashboard must not answer it, nor act for it.
    runner = sleepy(local, naps=2, nap_seconds=0.0)
    runner.wait(timeout=WAIT)
    with served(local) as client:
        for host in ("127.0.0.1", "localhost:8765", "[::1]:80"):
            assert client.get("/api/runs", headers={"Host": host}).status_code == 200, host
        for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example"):
            assert client.get("/api/runs", headers={"Host": host}).status_code == 403, host
            forget = client.post(f"/api/runs/{runner.name}/forget", headers={**HEADERS, "Host": host})
            assert forget.status_code == 403, host
        assert client.get(f"/api/runs/{runner.name}").status_code == 200
    with served(local, token=TOKEN) as client:  # with a token, any name may reach it
        assert client.get("/api/runs", headers={"Host": "dashboard.example", **BEARER}).status_code == 200


def test_serve_refuses_a_non_loopback_host_without_a_token():
    with pytest.raises(ValueError, match="--token"):
        packmule.web.serve("0.0.0.0", free_port(), background=True)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    return subprocess.run([sys.executable, "-m", "packmule", "dashboard", *args], env={**base, **env}, cwd=ROOT,
                          capture_output=True, text=True, timeout=WAIT)


def test_dashboard_command_off_loopback_without_a_token_exits_naming_the_token_option():
    port = free_port()
    done = _cli("--host", "0.0.0.0", "--port", str(port), env={"PACKMULE_BACKEND": "beanstalk"})
    assert done.returncode == 2 and "--token" in done.stderr, done.stderr
    assert "PACKMULE_DASHBOARD_TOKEN" in done.stderr


def test_dashboard_command_on_the_local_backend_says_to_serve_from_the_driver():
    done = _cli("--port", str(free_port()), env={})
    assert done.returncode == 2
    assert "PACKMULE_DASHBOARD_PORT" in done.stderr and "packmule.web.serve" in done.stderr, done.stderr


# --- the allow hook ----------------------------------------------------------------------------------------
def _allow(request: Any, name: str, action: str) -> bool:
    return not name.startswith("web-hidden") and not (name.startswith("web-guarded") and action != "view")


def test_allow_hook_hides_a_run_from_the_list_its_api_page_and_stream(local):
    hidden = SleepyRunner(f"web-hidden-{uuid.uuid4().hex[:6]}", backend=local.backend)
    shown = SleepyRunner(f"web-shown-{uuid.uuid4().hex[:6]}", backend=local.backend)
    for runner in (hidden, shown):
        runner.run_async(2)
        runner.wait(timeout=WAIT)
    app = packmule.web.create_app(Watcher(local.backend), allow=_allow)
    with uvicorn_serving(app) as client:
        until("the shown run to be listed", lambda: shown.name in [r["name"] for r in client.get("/api/runs").json()])
        assert hidden.name not in [r["name"] for r in client.get("/api/runs").json()]
        for path in (f"/api/runs/{hidden.name}", f"/api/runs/{hidden.name}/events", f"/runs/{hidden.name}"):
            assert client.get(path).status_code == 404, path
        assert client.post(f"/api/runs/{hidden.name}/forget", headers=HEADERS).status_code == 404
        assert client.get(f"/api/runs/{shown.name}").status_code == 200


def test_allow_hook_forbids_an_action_on_a_run_it_lets_be_seen(local):
    guarded = SleepyRunner(f"web-guarded-{uuid.uuid4().hex[:6]}", backend=local.backend)
    guarded.run_async(2)
    guarded.wait(timeout=WAIT)
    app = packmule.web.create_app(Watcher(local.backend), allow=_allow)
    with uvicorn_serving(app) as client:
        assert client.get(f"/api/runs/{guarded.name}").status_code == 200
        for action in ("cancel", "forget"):
            answer = client.post(f"/api/runs/{guarded.name}/{action}", headers=HEADERS)
            assert answer.status_code == 403, action
        assert guarded.update_progress() == "3.0 / 3.0"  # not forgotten


# --- embedding -----------------------------------------------------------------------------------------------
def test_mounted_under_a_prefix_it_serves_its_api_script_and_prefixed_links(local):
    runner = sleepy(local, naps=2, nap_seconds=0.0)
    runner.wait(timeout=WAIT)
    app = Starlette(routes=[Mount("/prefix", app=packmule.web.create_app(Watcher(local.backend)))])
    with uvicorn_serving(app) as client:
        runs = client.get("/prefix/api/runs")
        assert runs.status_code == 200 and isinstance(runs.json(), list)
        one = client.get(f"/prefix/api/runs/{runner.name}")
        assert one.status_code == 200 and one.json()["progress"] == str(runner.update_progress())
        script = client.get("/prefix/static/progress.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "customElements.define('packmule-progress'" in script.text
        page = client.get("/prefix/")
        assert 'const ROOT = "/prefix";' in page.text and 'href="/prefix/workers"' in page.text
        assert client.get("/api/runs").status_code == 404  # nothing outside the prefix


def test_example_web_page_starts_a_run_that_its_mounted_api_follows_to_the_end(local):
    from packmule.examples.web_page import make_app

    with uvicorn_serving(make_app(nap_seconds=0.0)) as client:
        page = client.get("/")
        assert '<script src="/packmule/static/progress.js">' in page.text and "packmule-progress" in page.text
        assert client.post("/start").status_code == 403  # no header: no cross-site starts
        started = client.post("/start", headers=HEADERS)
        name = started.json()["name"]
        final = until("the example's run to complete",
                      lambda: (d := client.get(f"/packmule/api/runs/{name}").json()).get("complete") and d)
        assert final["progress"] == "101.0 / 101.0"


# --- the pages hold the DOM contract's anchors -------------------------------------------------------------
def test_pages_hold_the_elements_their_scripts_and_the_browser_tests_use(local):
    with served(local) as client:
        runs = client.get("/").text
        for anchor in ('<table id="runs">', 'id="filter"', "tr.className = 'run'", "tr.dataset.run",
                       "tr.dataset.generation", 'class="name"', 'class="bar"', 'class="progress-text"',
                       'class="failed', 'class="rate', 'class="eta', 'class="state"'):
            assert anchor in runs, anchor
        run = client.get("/runs/some-run").text
        for anchor in ('id="progress-text"', '<progress id="bar"', 'id="state"', 'id="done"', 'id="total"',
                       'id="failed"', 'id="rate"', 'id="eta"', 'id="value"', '<ul id="failures">',
                       "li.className = 'failure'", 'class="method"', 'class="args"', 'class="exc"',
                       'pre class="traceback"', 'button id="cancel"', 'button id="forget"',
                       "'X-PackMule': '1'", 'const NAME = "some-run";'):
            assert anchor in run, anchor
        assert '<table id="workers">' in client.get("/workers").text
        queue = client.get("/queue").text
        for anchor in ('<table id="queue">', '<table id="servers">', "tr.className = 'server-state'",
                       "tr.dataset.server", "tr.dataset.state", "'/api/servers'"):
            assert anchor in queue, anchor
        assert client.get("/runs/bad%20name").status_code == 404


def test_run_page_escapes_what_it_embeds():
    from packmule.web._pages import render

    page = render("run", '/p"</script><b>', "x")
    assert "</script><b>" not in page.split("<script>", 1)[1].rsplit("</script>", 1)[0]


# --- the driver serves it (local backend) ------------------------------------------------------------------
DRIVER = """
import sys
from packmule.examples.sleepy import SleepyRunner
runner = SleepyRunner("web-driver", record_return_values=True)
runner.nap_seconds = 0.0
runner.run_async(10)
print(runner.wait(timeout=60), flush=True)
sys.stdin.read()  # serve until the test closes stdin
"""


def test_dashboard_port_variable_makes_the_driver_serve_its_local_runs():
    port = free_port()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")},
           "PACKMULE_DASHBOARD_PORT": str(port), "PACKMULE_WORKERS": "2"}
    with subprocess.Popen([sys.executable, "-c", DRIVER], env=env, cwd=ROOT, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as child:
        assert child.stdout is not None and child.stdin is not None and child.stderr is not None
        try:
            final = child.stdout.readline().strip()  # (the child's wait has a deadline)
            assert final == "11.0 / 11.0", final
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=WAIT) as client:
                assert run_json(client, "web-driver")["progress"] == final
        finally:
            child.stdin.close()
            try:
                child.wait(WAIT)
            except subprocess.TimeoutExpired:
                child.kill()
        stderr = child.stderr.read()
    assert stderr.count(f"dashboard at http://127.0.0.1:{port}/") == 1, stderr  # the driver only, once
    assert "not served" not in stderr, stderr


def test_importing_packmule_imports_nothing_of_the_web_extra():
    code = ("import sys, packmule, packmule.cli\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn', 'prometheus_client') "
            "or m.startswith('packmule.web')]\n"
            "assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr


# --- schedules and delayed jobs -------------------------------------------------------------------------------
def test_api_schedules_lists_a_schedule_with_its_last_tick_its_run_and_the_metrics_count_its_ticks(harness, dashboard):
    from datetime import datetime, timedelta, timezone

    from conformance import scheduled_more
    from packmule._model.scheduled import DECLARED
    from packmule.scheduling import Scheduler

    key = "Crashy.tick"
    clock_now = [datetime(2032, 6, 1, 12, 0, 0, 500_000, tzinfo=timezone.utc)]
    scheduler = Scheduler(harness.backend, {key: DECLARED[key]}, clock=lambda: clock_now[0])
    ledger = harness.backend.ledger
    raw, token = ledger.read(f"schedule:{key}:last")
    if raw is not None:
        ledger.swap(f"schedule:{key}:last", token, None, 0)
    scheduler.run_pass()  # (first sight: it notes the schedule in the store, for the dashboard)
    clock_now[0] += timedelta(seconds=1)
    scheduler.run_pass()
    (run_name,) = scheduler.queued
    assert run_name == "Crashy.tick:20320601T120001Z"
    scheduled_more.Crashy(run_name, backend=harness.backend).wait(timeout=WAIT)
    (entry,) = [e for e in dashboard.get("/api/schedules").json() if e["key"] == key]
    assert entry["kind"] == "every 1s" and entry["misfire"] == "skip"
    assert entry["last_tick"] == "2032-06-01T12:00:01+00:00" and entry["last_run"] == run_name
    assert entry["state"] == "1.0 / 1.0" and entry["fired"] >= 1
    assert datetime.fromisoformat(entry["next"]) > datetime.now(timezone.utc)
    fired = {s.labels["schedule"]: s.value for f in text_string_to_metric_families(dashboard.get("/metrics").text)
             for s in f.samples if s.name == "packmule_schedule_ticks_fired_total"}
    assert fired[key] == entry["fired"]


def test_api_run_shows_how_many_delayed_jobs_have_not_run_yet(harness, dashboard):
    from conformance.runners import Timed

    runner = Timed(f"web-{uuid.uuid4().hex[:10]}", backend=harness.backend)
    runner.enqueue_each("echo", range(3), delay=1.5)
    runner.enqueue("echo", "now")
    assert run_json(dashboard, runner.name)["delayed"] == 3
    runner.wait(timeout=WAIT)
    data = run_json(dashboard, runner.name)
    assert data["delayed"] == 0 and data["progress"] == "4.0 / 4.0"
