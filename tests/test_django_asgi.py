"""packmule's ASGI dashboard beside a Django project (``packmule.contrib.django.asgi``):
requests under the prefix reach the dashboard with the Django user of their session
as ``request.user`` for the ``allow`` hook; the others reach Django."""

from __future__ import annotations

import json
import uuid
from typing import Any

import httpx
import pytest
from asgiref.sync import async_to_sync
from django.core.asgi import get_asgi_application
from django.test import Client

import packmule
from packmule.contrib.django.asgi import with_dashboard

pytestmark = [pytest.mark.django_db, pytest.mark.packmule(workers=1)]
WAIT = 60.0


class Crate(packmule.Runner):
    """(Defined in the test module: travels by value.)"""

    def count(self, item: str) -> str:
        return item


@pytest.fixture
def pending_run(packmule_backend: Any) -> str:
    """A run with one job done and one waiting an hour: 1.0 / 2.0."""
    crate = Crate(f"crate-{uuid.uuid4().hex[:8]}")
    crate.enqueue("count", "now")
    packmule_backend.join(WAIT)
    crate.enqueue("count", "later", delay=3600)
    return crate.name


def session_of(user: Any) -> dict[str, str]:
    client = Client()
    client.force_login(user)
    return {"sessionid": client.cookies["sessionid"].value}


def ask(method: str, path: str, cookies: dict[str, str] | None = None, **kw: Any) -> httpx.Response:
    app = with_dashboard(get_asgi_application(), "/packmule")

    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                     cookies=cookies) as client:
            return await client.request(method, path, **kw)

    return async_to_sync(go)()


def test_staff_see_a_run_through_the_mounted_dashboard(pending_run: str, django_user_model: Any) -> None:
    staff = django_user_model.objects.create_user("staff", password="x", is_staff=True)
    answer = ask("GET", f"/packmule/api/runs/{pending_run}", session_of(staff))
    assert answer.status_code == 200 and json.loads(answer.content)["progress"] == "1.0 / 2.0"
    page = ask("GET", "/packmule/", session_of(staff))
    assert page.status_code == 200 and 'href="/packmule/workers"' in page.text  # links follow the prefix


@pytest.mark.parametrize("who", ["anonymous", "customer"])
def test_the_default_hook_hides_runs_from_users_who_are_not_staff(
        pending_run: str, django_user_model: Any, who: str) -> None:
    cookies = None
    if who == "customer":
        cookies = session_of(django_user_model.objects.create_user("customer", password="x"))
    assert ask("GET", f"/packmule/api/runs/{pending_run}", cookies).status_code == 404
    assert pending_run not in ask("GET", "/packmule/api/runs", cookies).text
    assert ask("POST", f"/packmule/api/runs/{pending_run}/cancel", cookies,
               headers={"X-PackMule": "1"}).status_code == 404
    assert Crate(pending_run).update_progress() == "1.0 / 2.0"


def test_an_allow_hook_reads_request_user(pending_run: str, django_user_model: Any) -> None:
    # Given a hook that lets staff view but only superusers act
    seen: list[tuple[str, str, str]] = []

    def allow(request: Any, run_name: str, action: str) -> bool:
        seen.append((request.user.username, run_name, action))
        return bool(request.user.is_staff and (action == "view" or request.user.is_superuser))

    staff = django_user_model.objects.create_user("staff", password="x", is_staff=True)
    app, cookies = with_dashboard(get_asgi_application(), "/packmule", allow=allow), session_of(staff)

    async def cancel() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://testserver",
                                     cookies=cookies) as client:
            return await client.post(f"/packmule/api/runs/{pending_run}/cancel", headers={"X-PackMule": "1"})

    # When staff (no superuser) POSTs cancel, Then it is refused, the hook having seen the Django user
    assert async_to_sync(cancel)().status_code == 403
    assert ("staff", pending_run, "cancel") in seen
    assert Crate(pending_run).update_progress() == "1.0 / 2.0"


def test_requests_outside_the_prefix_reach_django(db: None) -> None:
    answer = ask("GET", "/admin/login/")
    assert answer.status_code == 200 and "csrfmiddlewaretoken" in answer.text
