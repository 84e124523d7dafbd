"""``serve``: the dashboard on uvicorn, in the foreground or in a daemon thread."""

from __future__ import annotations

import ipaddress
import threading
import time
from typing import TYPE_CHECKING

import uvicorn

from packmule._core import config as _config
from packmule.web._app import create_app

if TYPE_CHECKING:
    from packmule._driver.watcher import Watcher

START_TIMEOUT = 10.0  # s a background server may take to start listening
STOP_TIMEOUT = 10.0  # s Dashboard.stop() waits for the server to end


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address (or ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, token: str | None) -> None:
    """Refuse to serve off loopback without a token."""
    if not token and not is_loopback(host):
        raise ValueError(f"refusing to serve the dashboard on {host}, which is not a loopback address, without "
                         "a token: pass --token (or set PACKMULE_DASHBOARD_TOKEN), or bind to 127.0.0.1")


class Dashboard(str):
    """The base URL of a dashboard served in the background (a ``str``), with ``stop()``."""

    server: uvicorn.Server
    thread: threading.Thread

    def stop(self) -> None:
        """Stop serving: open event streams end, the port is free on return."""
        self.server.should_exit = True
        self.thread.join(STOP_TIMEOUT)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(STOP_TIMEOUT)


def serve(host: str = "127.0.0.1", port: int = 8765, *, token: str | None = None, watcher: Watcher | None = None,
          background: bool = False) -> str:
    """Serve the dashboard (``create_app(watcher, token=token)``) on ``host:port``;
    returns its base URL.  ``token`` None: ``PACKMULE_DASHBOARD_TOKEN``.  A host that
    is not loopback needs a token (ValueError otherwise).  ``background=True``: serve
    from a daemon thread and return once it listens (a :class:`Dashboard`, which can
    ``stop()``); port 0 picks a free one.  Otherwise serve until interrupted."""
    token = token or _config.dashboard_token()
    check_exposure(host, token)
    app = create_app(watcher, token=token, loopback_hosts_only=not token)  # (open: loopback names only)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=1)
    server = uvicorn.Server(config)
    if not background:
        server.run()
        return f"http://{_netloc(host, port)}"
    thread = threading.Thread(target=server.run, name=f"packmule-dashboard-{port}", daemon=True)
    thread.start()
    deadline = time.monotonic() + START_TIMEOUT
    while not server.started:
        if not thread.is_alive():
            raise OSError(f"the dashboard could not listen on {host}:{port} (in use? see the error above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the dashboard did not start listening on {host}:{port} within {START_TIMEOUT}s")
        time.sleep(0.01)
    bound = server.servers[0].sockets[0].getsockname()[1] if port == 0 else port
    url = Dashboard(f"http://{_netloc(host, bound)}")
    url.server, url.thread = server, thread
    return url


def _netloc(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host and not host.startswith("[") else f"{host}:{port}"
