"""Each ZooKeeper member's state, for ``packmule status`` and the dashboard.

kazoo moves a session from a dead member to a live one by itself, so nothing on
the lock path ever sets a member aside: its state is what a probe finds, made
when the states are asked for and then by ``Health``'s prober (with its
backoff) for a member that failed one, which remembers since when it is down
and when it came back.
"""

from __future__ import annotations

import socket

from ..base import ServerState
from ._pool import Health, Servers

SERVICE = "ZooKeeper"
SRVR_TIMEOUT = 1.0  # s to wait for a member's answer to `srvr` (none: it is up, its role unknown)
NOT_SERVING = "not currently serving requests"  # ZooKeeper's answer while it has no quorum
MAX_REPLY = 8192


class MemberHealth(Health):
    """``Health`` whose probe is a TCP connection and ``srvr``: a member that
    takes the connection is up (its ``Mode:`` line, when 4lw ``srvr`` is allowed,
    gives its role), unless it answers that it is not serving requests."""

    def __init__(self, servers: Servers, connect_timeout: float) -> None:
        super().__init__(servers, SERVICE, b"srvr", connect_timeout)
        self._roles: dict[int, str] = {}
        self._problems: dict[int, str] = {}

    def probe(self, index: int) -> bool:
        try:
            sock = socket.create_connection(self.servers.addresses[index], timeout=self._connect_timeout)
        except OSError as exc:
            self._problems[index] = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return False
        reply = b""
        with sock:
            try:
                sock.settimeout(min(self._connect_timeout, SRVR_TIMEOUT))
                sock.sendall(self.ping)
                while len(reply) < MAX_REPLY and (chunk := sock.recv(4096)):
                    reply += chunk
            except OSError:
                pass  # it took the connection and said nothing (more): up, its role unknown
        text = reply.decode(errors="replace")
        if NOT_SERVING in text:
            self._problems[index] = "it is not serving requests (no quorum)"
            return False
        self._roles[index] = next((line.split(":", 1)[1].strip() for line in text.splitlines()
                                   if line.startswith("Mode:")), "")
        return True

    def server_states(self) -> list[ServerState]:
        """Every member that looks up probed now; then what is known of each."""
        for index in self.live():
            if not self.probe(index):
                self.set_aside(index, self._problems.get(index, "it did not answer a probe"))
        return [state._replace(role=self._roles.get(i, "")) if state.state == "up" else state
                for i, state in enumerate(self.states())]
