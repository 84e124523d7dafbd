"""packmule's runs in Django's admin (``packmule.contrib.django.admin``): staff only,
the runs with their progress, a run's failures, Cancel and Forget by POST with the
CSRF token; through Django's WSGI handler and its ASGI handler, on the local
backend and on a beanstalk cluster served by ``manage.py packmule_worker``."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from asgiref.sync import async_to_sync
from django.test import AsyncClient, Client

import packmule

pytestmark = [pytest.mark.django_db, pytest.mark.packmule(workers=1)]
WAIT = 60.0
RUNS = "/admin/packmule/"


class Stock(packmule.Runner):
    """(Defined in the test module: travels by value.)"""

    max_retries = 0

    def count(self, item: str) -> str:
        return item

    def out_of_stock(self, item: str) -> None:
        raise LookupError(f"out of stock: {item}")


class Browser:
    """A Django test client over WSGI (``Client``) or ASGI (``AsyncClient``), used alike."""

    def __init__(self, kind: str, enforce_csrf_checks: bool = False) -> None:
        self.kind = kind
        self.client: Any = (Client if kind == "wsgi" else AsyncClient)(enforce_csrf_checks=enforce_csrf_checks)

    def _call(self, method: str, *args: Any, **kw: Any) -> Any:
        fn: Callable[..., Any] = getattr(self.client, method)
        return fn(*args, **kw) if self.kind == "wsgi" else async_to_sync(fn)(*args, **kw)

    def get(self, url: str) -> Any:
        return self._call("get", url)

    def post(self, url: str, data: dict[str, str] | None = None) -> Any:
        return self._call("post", url, data or {})

    def login(self, user: Any) -> None:
        self.client.force_login(user)


@pytest.fixture(params=["wsgi", "asgi"])
def web(request: pytest.FixtureRequest) -> Browser:
    return Browser(str(request.param))


@pytest.fixture
def staff(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("staff", password="x", is_staff=True)


@pytest.fixture
def customer(django_user_model: Any) -> Any:
    return django_user_model.objects.create_user("customer", password="x")


def run_name(kind: str) -> str:
    return f"{kind}-{uuid.uuid4().hex[:8]}"


def started_and_pending(mule: Any) -> str:
    """A run with two jobs done and one waiting an hour (delayed): running, 2.0 / 3.0."""
    stock = Stock(run_name("pending"))
    stock.enqueue_each("count", ["a", "b"])
    mule.join(WAIT)
    stock.enqueue("count", "later", delay=3600)
    return stock.name


def to_login(response: Any) -> bool:
    return response.status_code == 302 and "/admin/login/" in response["Location"]


@pytest.mark.parametrize("who", ["anonymous", "customer"])
def test_the_runs_pages_send_users_who_are_not_staff_to_the_login_page(
        mule: Any, web: Browser, customer: Any, who: str) -> None:
    name = started_and_pending(mule)
    if who == "customer":
        web.login(customer)
    for url in (RUNS, f"{RUNS}runs/{name}/", f"{RUNS}api/runs", f"{RUNS}api/runs/{name}"):
        assert to_login(web.get(url)), url
    for action in ("cancel", "forget"):
        assert to_login(web.post(f"{RUNS}runs/{name}/{action}"))
    assert Stock(name).update_progress() == "2.0 / 3.0"  # neither cancelled nor forgotten


def test_the_runs_page_lists_a_run_with_its_progress_and_state(mule: Any, web: Browser, staff: Any) -> None:
    name = started_and_pending(mule)
    web.login(staff)
    page = web.get(RUNS)
    assert page.status_code == 200
    row = re.search(rf'<tr data-run="{name}".*?</tr>', page.content.decode(), re.S)
    assert row is not None
    assert "2.0 / 3.0" in row.group(0) and "running" in row.group(0) and f"runs/{name}/" in row.group(0)


def test_the_runs_json_the_page_polls_gives_each_runs_progress(mule: Any, web: Browser, staff: Any) -> None:
    name = started_and_pending(mule)
    web.login(staff)
    runs = {run["name"]: run for run in json.loads(web.get(f"{RUNS}api/runs?name={name}").content)}
    assert list(runs) == [name]
    assert (runs[name]["progress"], runs[name]["done"], runs[name]["total"]) == ("2.0 / 3.0", 2, 3)
    one = json.loads(web.get(f"{RUNS}api/runs/{name}").content)  # what <packmule-progress> reads
    assert (one["progress"], one["state"]) == ("2.0 / 3.0", "running")
    assert web.get(f"{RUNS}api/runs/no-such-run").status_code == 404


def test_the_admin_index_links_to_the_runs(web: Browser, staff: Any) -> None:
    web.login(staff)
    page = web.get("/admin/").content.decode()
    assert f'href="{RUNS}"' in page and "packmule" in page


def test_the_run_page_shows_the_runs_failures(mule: Any, web: Browser, staff: Any) -> None:
    stock = Stock(run_name("failing"))
    stock.enqueue("count", "fine")
    stock.enqueue("out_of_stock", "left-handed-scissors")
    mule.join(WAIT, raise_failures=False)
    web.login(staff)
    page = web.get(f"{RUNS}runs/{stock.name}/")
    text = page.content.decode()
    assert page.status_code == 200
    assert "Failures (1)" in text and "LookupError" in text and "out of stock: left-handed-scissors" in text
    assert "out_of_stock" in text and 'src="/admin/packmule/static/progress.js"' in text
    assert f'<packmule-progress run="{stock.name}" api="/admin/packmule">' in text


def test_cancel_by_post_drops_the_runs_waiting_jobs(mule: Any, web: Browser, staff: Any) -> None:
    name = started_and_pending(mule)
    web.login(staff)
    answer = web.post(f"{RUNS}runs/{name}/cancel")
    assert answer.status_code == 302 and answer["Location"] == f"{RUNS}runs/{name}/"
    assert "cancelled" in web.get(f"{RUNS}runs/{name}/").content.decode()
    assert [run.state for run in packmule_runs(name)] == ["cancelled"]


def test_forget_by_post_removes_the_run(mule: Any, web: Browser, staff: Any) -> None:
    name = started_and_pending(mule)
    web.login(staff)
    answer = web.post(f"{RUNS}runs/{name}/forget")
    assert answer.status_code == 302 and answer["Location"] == RUNS
    assert Stock(name).update_progress() == "0.0 / 0.0"
    assert web.get(f"{RUNS}runs/{name}/").status_code == 404


def test_cancel_and_forget_refuse_a_get_and_a_post_without_the_csrf_token(
        mule: Any, web: Browser, staff: Any) -> None:
    name = started_and_pending(mule)
    guarded = Browser(web.kind, enforce_csrf_checks=True)
    guarded.login(staff)
    for action in ("cancel", "forget"):
        assert guarded.get(f"{RUNS}runs/{name}/{action}").status_code == 405
        assert guarded.post(f"{RUNS}runs/{name}/{action}").status_code == 403
    assert [run.state for run in packmule_runs(name)] == ["running"]


def test_a_post_with_the_pages_csrf_token_is_accepted(mule: Any, web: Browser, staff: Any) -> None:
    name = started_and_pending(mule)
    guarded = Browser(web.kind, enforce_csrf_checks=True)
    guarded.login(staff)
    page = guarded.get(f"{RUNS}runs/{name}/").content.decode()
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', page)
    assert token is not None
    answer = guarded.post(f"{RUNS}runs/{name}/cancel", {"csrfmiddlewaretoken": token.group(1)})
    assert answer.status_code == 302
    assert [run.state for run in packmule_runs(name)] == ["cancelled"]


def packmule_runs(name: str) -> list[Any]:
    from packmule.contrib.django.views import watcher

    return watcher().runs(name)
