"""The dashboard's guards, as ASGI middleware (pure ASGI, so event streams pass
through unbuffered).

- Token: with a token set, every request (page, API call, event stream, metrics,
  script) must carry it, as ``Authorization: Bearer T``, as the cookie
  ``packmule_token``, or once as ``?token=T`` (the answer then sets that cookie:
  HttpOnly, SameSite=Strict).  Otherwise 401.
- Open (no token) on loopback, as ``serve`` runs it: the ``Host`` a request names
  must be a loopback one too, else 403 - a page of another site whose name was
  made to resolve to 127.0.0.1 (DNS rebinding) reads and acts as same-origin.
- Unsafe methods (POST: cancel, forget) must carry ``X-PackMule: 1`` - a header a
  cross-site form cannot send and a cross-site script cannot send without a CORS
  preflight this app never grants - and, when the browser says where the request
  comes from (``Origin``), come from this same host.  Otherwise 403.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from http.cookies import SimpleCookie
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

COOKIE = "packmule_token"
SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
ACTION_HEADER = "x-packmule"


def _headers(scope: Scope) -> dict[str, str]:
    return {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}


def _same(given: str | None, token: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), token.encode())


async def _refuse(send: Send, status: int, message: str, extra: tuple[tuple[bytes, bytes], ...] = ()) -> None:
    body = json.dumps({"error": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *extra]})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Token and cross-site checks in front of ``app`` (see the module docstring)."""

    def __init__(self, app: ASGIApp, token: str | None, loopback_hosts_only: bool = False) -> None:
        self.app, self.token, self.loopback_hosts_only = app, token, loopback_hosts_only

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        if self.loopback_hosts_only and not _loopback_host(headers.get("host", "")):
            await _refuse(send, 403, f"Host {headers.get('host', '')!r} is not a loopback name: this dashboard "
                                     "runs without a token, so it answers only requests for 127.0.0.1, ::1 or "
                                     "localhost (serve it with a token to reach it by another name)")
            return
        send_cookie = False
        if self.token is not None:
            scheme, _, bearer = headers.get("authorization", "").partition(" ")
            cookie = SimpleCookie()
            try:
                cookie.load(headers.get("cookie", ""))
            except Exception:  # a malformed cookie header counts as none
                cookie = SimpleCookie()
            from_cookie = cookie[COOKIE].value if COOKIE in cookie else None
            from_query = dict(parse_qsl(scope.get("query_string", b"").decode("latin-1"))).get("token")
            if not ((scheme.lower() == "bearer" and _same(bearer.strip(), self.token))
                    or _same(from_cookie, self.token)):
                if not _same(from_query, self.token):
                    await _refuse(send, 401, "a token is required: send 'Authorization: Bearer <token>' or "
                                             "open the page once with ?token=<token>",
                                  ((b"www-authenticate", b'Bearer realm="packmule"'),))
                    return
                send_cookie = True
        if scope["method"] not in SAFE_METHODS:
            problem = self._cross_site(headers)
            if problem:
                await _refuse(send, 403, problem)
                return
        if not send_cookie:
            await self.app(scope, receive, send)
            return
        path = scope.get("root_path", "") or "/"
        set_cookie = f"{COOKIE}={self.token}; Path={path}; HttpOnly; SameSite=Strict".encode("latin-1")

        async def send_with_cookie(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message, headers=[*message.get("headers", []), (b"set-cookie", set_cookie)])
            await send(message)

        await self.app(scope, receive, send_with_cookie)

    @staticmethod
    def _cross_site(headers: dict[str, Any]) -> str | None:
        """Why an unsafe request may come from another site, or None."""
        if headers.get(ACTION_HEADER) != "1":
            return "this action needs the header 'X-PackMule: 1' (the dashboard's pages send it)"
        origin = headers.get("origin")
        if origin is not None and urlsplit(origin).netloc.lower() != headers.get("host", "").lower():
            return f"cross-site request refused: Origin {origin!r} is not this host"
        return None


def _loopback_host(host: str) -> bool:
    """Whether a ``Host`` header (``name[:port]``, ``[v6]:port``) names this machine's loopback."""
    try:
        name = urlsplit("//" + host).hostname or ""
        return name == "localhost" or ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False
