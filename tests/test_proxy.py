"""The test fixtures' TCP proxy (``conformance.servers.Proxy``): an outage it
makes must be whole, or a test of what an outage does passes or fails by luck
(a lock holder whose connection, accepted just as its proxy was cut, lived on
kept its ZooKeeper session and its lock: the expiry test failed 2 runs in 4)."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import threading
import time

from conformance.servers import Proxy


def _alive(sock: socket.socket) -> bool:
    """Whether the connection still carries data both ways (within 5 s)."""
    try:
        sock.settimeout(5)
        sock.sendall(b"ping")
        return sock.recv(4) == b"ping"
    except OSError:
        return False


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(4096):
                self.request.sendall(data)


def _echo(listener: socket.socket) -> socketserver.ThreadingTCPServer:
    """Echo on every connection ``listener`` takes from now on; ``shutdown()`` ends it."""
    server = socketserver.ThreadingTCPServer(listener.getsockname(), _Echo, bind_and_activate=False)
    server.socket.close()  # (the one it made: it serves ``listener``)
    server.socket, server.daemon_threads = listener, True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def test_a_connection_the_proxy_accepted_just_before_a_cut_does_not_get_through_after_it() -> None:
    # Given a server whose accept queue is full, so that the proxy's own connect to it waits
    target = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target.bind(("127.0.0.1", 0))
    target.listen(0)
    port = target.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    proxy = Proxy(f"127.0.0.1:{port}")
    try:
        # and a client the proxy has accepted, its connect to the server under way
        client = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        time.sleep(0.2)
        # When the proxy is cut, and then the server takes connections again
        proxy.cut()
        echo = _echo(target)
        # Then the client does not get through (its connect completes after the cut)
        assert not _alive(client)
        client.close()
        # and after resume() a new client does
        proxy.resume()
        again = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        assert _alive(again)
        again.close()
        echo.shutdown()
    finally:
        proxy.close()
        filler.close()
        target.close()
