"""packmule's ASGI dashboard beside a Django project, behind Django's logins (``packmule[web]``)::

    # asgi.py
    from django.core.asgi import get_asgi_application
    django_app = get_asgi_application()
    from packmule.contrib.django.asgi import with_dashboard

    def allow(request, run_name, action):          # request.user: the Django user of the request
        return request.user.is_staff and (action == "view" or request.user.is_superuser)

    application = with_dashboard(django_app, "/packmule", allow=allow)

Requests under the prefix go to ``packmule.web.create_app(allow=...)`` mounted
there (its pages and links follow the prefix); the others to Django.  Before the
dashboard sees a request, the user its session cookie names is loaded through
Django's auth (``scope["user"]``: ``request.user`` in the hook; ``AnonymousUser``
without a valid session).  ``allow`` defaults to ``staff_only``.  Under WSGI use
the admin's pages (``/admin/packmule/``) instead: they need no ASGI server.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.http.cookie import parse_cookie

import packmule.web

__all__ = ["staff_only", "user_of", "with_dashboard"]

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]


def staff_only(request: Any, run_name: str, action: str) -> bool:
    """The default ``allow``: active staff may view, cancel and forget every run."""
    user = request.user
    return bool(user.is_active and user.is_staff)


def _load_user(cookie: str | None) -> Any:
    from importlib import import_module

    from django.contrib.auth import get_user

    session = import_module(settings.SESSION_ENGINE).SessionStore(cookie)
    return get_user(SimpleNamespace(session=session))  # (get_user reads only request.session)


async def user_of(scope: dict[str, Any]) -> Any:
    """The Django user whose session cookie the ASGI ``scope`` carries (or ``AnonymousUser``)."""
    header = b"; ".join(value for name, value in scope.get("headers", []) if name == b"cookie")
    cookie = parse_cookie(header.decode("latin-1")).get(settings.SESSION_COOKIE_NAME)
    return await sync_to_async(_load_user)(cookie)


def with_dashboard(django_app: ASGIApp, prefix: str = "/packmule",
                   allow: Callable[[Any, str, str], Any] = staff_only) -> ASGIApp:
    """An ASGI app: ``prefix`` and below to packmule's dashboard, with the Django user
    loaded for ``allow``; everything else to ``django_app``."""
    prefix = "/" + prefix.strip("/")
    dashboard = packmule.web.create_app(allow=allow)

    async def application(scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not (path == prefix or path.startswith(prefix + "/")):
            await django_app(scope, receive, send)
            return
        root = scope.get("root_path", "") + prefix
        inner = dict(scope, root_path=root, path=path[len(prefix):] or "/", user=await user_of(scope))
        await dashboard(inner, receive, send)

    return application
