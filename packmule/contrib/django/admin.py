"""packmule's runs in Django's admin: staff only, under WSGI and ASGI alike.

With ``django.contrib.admin`` installed, the admin imports this module and it adds
to ``admin.site`` (``add_to(site)`` does it for a site of your own):

- ``<admin>/packmule/``: the runs, newest first, with their state and progress,
  updated live (the page polls ``<admin>/packmule/api/runs`` once a second);
- ``<admin>/packmule/runs/<name>/``: one run's bar (``<packmule-progress>``),
  counts, return value and failures, and its Cancel and Forget buttons (POST,
  with Django's CSRF token);
- a "packmule: Runs" row on the admin's index.

Every view goes through ``AdminSite.admin_view``: a user who is not active staff
is sent to the admin's login page, and POSTs need the CSRF token.  What is shown
comes from ``packmule._driver.watcher.Watcher``, as on the dashboard.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin import AdminSite
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseNotAllowed, HttpResponseRedirect, JsonResponse
from django.template.response import TemplateResponse
from django.urls import URLPattern, URLResolver, include, path, reverse

from packmule.contrib.django import views

__all__ = ["LIMIT", "add_to", "admin_urls"]

LIMIT = 200  # runs the admin's list shows (the dashboard shows up to 1,000)
ACTIONS = ("cancel", "forget")


def _url(site: AdminSite, view: str, *args: str) -> str:
    return str(reverse(f"{site.name}:{view}", args=args, current_app=site.name))


def _context(site: AdminSite, request: HttpRequest, title: str, **extra: Any) -> dict[str, Any]:
    request.current_app = site.name
    return {**site.each_context(request), "title": title, "subtitle": None,
            "runs_url": _url(site, "packmule_runs"), "base_url": _url(site, "packmule_runs").rstrip("/"), **extra}


def _runs_page(site: AdminSite) -> Callable[[HttpRequest], HttpResponse]:
    def runs(request: HttpRequest) -> HttpResponse:
        name_filter = request.GET.get("name", "")
        infos = views.watcher().runs(name_filter, LIMIT)
        rows = [(info, _url(site, "packmule_run", info.name)) for info in infos]
        return TemplateResponse(request, "packmule/admin/runs.html",
                                _context(site, request, "packmule runs", rows=rows, name_filter=name_filter))
    return runs


def _run_page(site: AdminSite) -> Callable[[HttpRequest, str], HttpResponse]:
    def run(request: HttpRequest, name: str) -> HttpResponse:
        info = views.visible_run(request, name, None)
        if info is None:
            raise Http404(f"no run named {name!r}")
        w = views.watcher()
        actions = [(action, _url(site, "packmule_act", name, action)) for action in ACTIONS]
        return TemplateResponse(request, "packmule/admin/run.html", _context(
            site, request, f"packmule run {name}", info=info, failures=w.failures(info), value=w.value_repr(info),
            actions=actions))
    return run


def _act(site: AdminSite) -> Callable[[HttpRequest, str, str], HttpResponse]:
    def act(request: HttpRequest, name: str, action: str) -> HttpResponse:
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if action not in ACTIONS or views.visible_run(request, name, None) is None:
            raise Http404(f"no run named {name!r}, or no action {action!r}")
        getattr(views.watcher(), action)(name)
        messages.success(request, f"run {name}: {'cancelled' if action == 'cancel' else 'forgotten'}")
        if action == "forget":
            return HttpResponseRedirect(_url(site, "packmule_runs"))
        return HttpResponseRedirect(_url(site, "packmule_run", name))
    return act


def _runs_json(request: HttpRequest) -> HttpResponse:
    infos = views.watcher().runs(request.GET.get("name", ""), LIMIT)
    return JsonResponse([info.as_dict() for info in infos], safe=False)


def admin_urls(site: AdminSite) -> list[URLPattern | URLResolver]:
    """The packmule URLs of ``site``, each behind ``site.admin_view`` (active staff, CSRF)."""
    guard = site.admin_view
    return [
        path("", guard(_runs_page(site)), name="packmule_runs"),
        path("runs/<str:name>/", guard(_run_page(site)), name="packmule_run"),
        path("runs/<str:name>/<str:action>", guard(_act(site)), name="packmule_act"),
        path("api/runs", guard(_runs_json), name="packmule_runs_json"),
        *views.progress_urls(wrap=guard),
    ]


def _index_entry(site: AdminSite) -> dict[str, Any]:
    url = _url(site, "packmule_runs")
    model = {"name": "Runs", "object_name": "Run", "admin_url": url, "add_url": None, "view_only": True,
             "perms": {"add": False, "change": False, "delete": False, "view": True}}
    return {"name": "packmule", "app_label": "packmule", "app_url": url, "has_module_perms": True,
            "models": [model]}


def add_to(site: AdminSite) -> None:
    """Add packmule's pages to ``site`` (its URLs, first, and a row on its index); once."""
    if getattr(site, "_packmule", False):
        return
    site._packmule = True
    get_urls, get_app_list = site.get_urls, site.get_app_list

    def urls() -> list[URLPattern | URLResolver]:
        return [path("packmule/", include(admin_urls(site))), *get_urls()]

    def app_list(request: HttpRequest, app_label: str | None = None) -> list[Any]:
        apps = list(get_app_list(request, app_label))
        if app_label is None and site.has_permission(request):
            apps = sorted([*apps, _index_entry(site)], key=lambda app: str(app["name"]).lower())
        return apps

    site.get_urls = urls
    site.get_app_list = app_list


add_to(admin.site)
