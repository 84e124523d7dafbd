"""A ZooKeeper ensemble on loopback for tests (a helper, not a fixture)::

    with ZooKeeperEnsemble(tmp_path) as zk:      # 3 members, ready once one leads
        zk.address                                # '127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3'
        zk.leader().kill()                        # SIGKILL, by PID
        zk.wait_for_leader()                      # the two others elect one

How to run one is in /work/shared/SERVICES.md (QuorumPeerMain, a ``myid`` file
and the same ``server.N`` lines in each member's zoo.cfg).
"""

from __future__ import annotations

import os
import tempfile
import time
from types import TracebackType

from .servers import READY_TIMEOUT, ZOOKEEPER_CLASSPATH, Server, ZooKeeper, free_port, zookeeper_mode


class ZooKeeperMember(ZooKeeper):
    """One member of a :class:`ZooKeeperEnsemble`: QuorumPeerMain, its ``myid``,
    the ensemble's ``server.N`` lines.  Once the ensemble has started, a (re)started
    member is ready only when it serves requests (it has joined a leader)."""

    name = "zookeeper-member"

    def __init__(self, tmpdir: str | os.PathLike[str], myid: int, port: int, peers: list[str]) -> None:
        super().__init__(tmpdir)
        self.myid, self.port, self.peers = myid, port, peers
        self.joined = False  # set by the ensemble once it has a leader

    def command(self) -> list[str]:
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        (data / "myid").write_text(f"{self.myid}\n")
        config = self.dir / "zoo.cfg"
        config.write_text(
            f"tickTime=500\ninitLimit=10\nsyncLimit=5\ndataDir={data}\nclientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\nadmin.enableServer=false\nminSessionTimeout=1000\n"
            "4lw.commands.whitelist=ruok,srvr\n" + "".join(f"{peer}\n" for peer in self.peers)
        )
        return [
            "java", "-Xmx256m", "-XX:+UseSerialGC", "-cp", ZOOKEEPER_CLASSPATH,
            "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(config),
        ]

    def ready(self) -> bool:
        if not self.joined:  # alone, a member has no quorum: its port accepting is enough
            return Server.ready(self)
        return zookeeper_mode(self.port) in ("leader", "follower")

    @property
    def mode(self) -> str:
        return zookeeper_mode(self.port) if self.proc is not None else ""


class ZooKeeperEnsemble:
    """A ``size``-member ZooKeeper ensemble on 127.0.0.1 (six free ports for the
    quorum and election links of 3 members, and a client port each), ready once
    it has a leader and every member serves.  ``members`` are Servers (kill,
    restart... by PID); ``address`` is what ``PACKMULE_ZOOKEEPER`` takes."""

    name = "zookeeper-ensemble"

    def __init__(self, tmpdir: str | os.PathLike[str] | None = None, size: int = 3) -> None:
        self._own_tmp: tempfile.TemporaryDirectory[str] | None = None
        if tmpdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix="packmule-zookeeper-ensemble-")
            tmpdir = self._own_tmp.name
        peers = [f"server.{n}=127.0.0.1:{free_port()}:{free_port()}" for n in range(1, size + 1)]
        self.members = [ZooKeeperMember(tmpdir, n, free_port(), peers) for n in range(1, size + 1)]

    @property
    def address(self) -> str:
        return ",".join(member.address for member in self.members)

    def start(self) -> None:
        """Start every member that is not running; return once there is a leader
        and every running member serves."""
        for member in self.members:
            if member.proc is None:
                member.joined = False  # (the first ones alone have no quorum)
                member.start()
        self.wait_for_leader()
        for member in self.members:
            member.joined = True

    def wait_for_leader(self, timeout: float = READY_TIMEOUT) -> ZooKeeperMember:
        """The leader, once there is one and every running member serves."""
        deadline = time.monotonic() + timeout
        while True:
            modes = {member: member.mode for member in self.members if member.proc is not None}
            leaders = [member for member, mode in modes.items() if mode == "leader"]
            if len(leaders) == 1 and all(mode in ("leader", "follower") for mode in modes.values()):
                return leaders[0]
            if time.monotonic() > deadline:
                logs = "\n".join(f"{m.address}: {m.stderr_tail(5)}" for m in self.members)
                raise RuntimeError(f"the ZooKeeper ensemble had no leader within {timeout:g} s "
                                   f"(modes {[modes.get(m) for m in self.members]}); logs:\n{logs}")
            time.sleep(0.1)

    def leader(self) -> ZooKeeperMember:
        return self.wait_for_leader()

    def followers(self) -> list[ZooKeeperMember]:
        leader = self.wait_for_leader()
        return [member for member in self.members if member is not leader and member.proc is not None]

    def member_at(self, address: str) -> ZooKeeperMember:
        return next(member for member in self.members if member.address == address)

    def stop(self) -> None:
        for member in self.members:
            member.stop()

    def kill(self) -> None:
        for member in self.members:
            member.kill()

    def close(self) -> None:
        for member in self.members:
            member.close()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self) -> ZooKeeperEnsemble:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<ZooKeeperEnsemble {' '.join(repr(m) for m in self.members)}>"
