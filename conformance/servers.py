"""Real beanstalkd, memcached and ZooKeeper servers for tests (helpers, not fixtures).

Each server runs on 127.0.0.1 on a free port, with its data (and its stderr
log) in a directory of the caller's, and is stopped by the PID this module
started, never by name::

    with Beanstalkd(tmp_path) as server:
        server.address      # '127.0.0.1:PORT'
        server.kill()       # SIGKILL
        server.restart()    # same port, same data dir (the binlog survives)

How to start each one is in /work/shared/SERVICES.md.  A ZooKeeper ensemble
(several members, each a Server) is in ``ensemble.py``; PostgreSQL (the Django
tests' database) in ``postgres.py``.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from types import TracebackType

ZOOKEEPER_JAR = "/usr/share/java/zookeeper.jar"
ZOOKEEPER_CLASSPATH = f"/etc/zookeeper/conf:{ZOOKEEPER_JAR}:/usr/share/java/slf4j-simple.jar"
INSTALL_HINT = "apt-get install -y beanstalkd memcached zookeeper"
READY_TIMEOUT = 30.0  # s a server may take to accept connections (ZooKeeper's JVM is the slow one)
STOP_GRACE = 5.0  # s between SIGTERM and SIGKILL


def servers_installed() -> str | None:
    """None if every server can be started here, else what is missing and how to install it."""
    missing = [name for name in ("beanstalkd", "memcached", "java") if shutil.which(name) is None]
    if not os.path.exists(ZOOKEEPER_JAR):
        missing.append(ZOOKEEPER_JAR)
    if not missing:
        return None
    return f"missing {', '.join(missing)}; install with: {INSTALL_HINT}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Server:
    """One server process on 127.0.0.1:``port``; subclasses say how to run it."""

    name = "server"

    def __init__(self, tmpdir: str | os.PathLike[str] | None = None) -> None:
        self._own_tmp: tempfile.TemporaryDirectory[str] | None = None
        if tmpdir is None:
            self._own_tmp = tempfile.TemporaryDirectory(prefix=f"packmule-{self.name}-")
            tmpdir = self._own_tmp.name
        self.dir = Path(tmpdir) / f"{self.name}-{os.getpid()}-{time.monotonic_ns()}"
        self.dir.mkdir(parents=True)
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None

    # --- what subclasses provide --------------------------------------------------------
    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        """True once the server serves requests (default: it accepts a connection)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0):
                return True
        except OSError:
            return False

    # --- lifecycle ------------------------------------------------------------------------
    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not running")
        return self.proc.pid

    def start(self) -> None:
        """Start: the first time on a free port (retried if another process takes
        it first); after ``stop()`` or ``kill()``, on the same port with the same data."""
        if self.port:
            self._launch()
            return
        for attempt in range(3):
            self.port = free_port()
            try:
                self._launch()
                return
            except RuntimeError:
                if attempt == 2:
                    raise

    def restart(self, kill: bool = False) -> None:
        """Stop (SIGTERM, or SIGKILL with ``kill=True``) and start again: same port, same data."""
        self.kill() if kill else self.stop()
        self.start()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a grace period; waits for the process to end."""
        proc, self.proc = self.proc, None
        if proc is not None:
            end_process(proc)

    def kill(self) -> None:
        """SIGKILL; waits for the process to end."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
        if proc is not None:
            proc.wait()

    def close(self) -> None:
        """Stop the server and remove a data directory this object made itself."""
        self.stop()
        if self._own_tmp is not None:
            self._own_tmp.cleanup()
            self._own_tmp = None

    def __enter__(self) -> Server:
        self.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.proc is not None else "stopped"
        return f"<{type(self).__name__} {self.address} {state}>"

    # --- helpers --------------------------------------------------------------------------
    @property
    def log_path(self) -> Path:
        return self.dir / f"{self.name}.log"

    def stderr_tail(self, lines: int = 20) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:]) or "(empty log)"

    def _launch(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                self.command(), cwd=self.dir, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True,  # a Ctrl-C meant for pytest does not hit the server first
            )
        atexit.register(_stop_at_exit, self.proc)
        deadline = time.monotonic() + READY_TIMEOUT
        while not self.ready():
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(
                    f"{self.name} on {self.address} exited with status {code} before accepting "
                    f"connections; its log ({self.log_path}) ends with:\n{self.stderr_tail()}"
                )
            if time.monotonic() > deadline:
                self.kill()
                raise RuntimeError(
                    f"{self.name} on {self.address} did not accept connections within "
                    f"{READY_TIMEOUT:g} s; its log ({self.log_path}) ends with:\n{self.stderr_tail()}"
                )
            time.sleep(0.05)


def end_process(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM, grace: float = STOP_GRACE) -> bool:
    """Send ``sig`` to a process this one started, give it ``grace`` seconds to
    end, then SIGKILL it; waits for it to end.  True if it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.send_signal(sig)
    try:
        proc.wait(grace)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True


def _stop_at_exit(proc: subprocess.Popen[bytes]) -> None:
    """A safety net for a test run that dies before its fixtures stop their servers."""
    if proc.poll() is None:
        proc.kill()
        proc.wait()


class Beanstalkd(Server):
    """beanstalkd with a binlog in its data dir, so queued jobs survive ``restart()``."""

    name = "beanstalkd"

    def __init__(self, tmpdir: str | os.PathLike[str] | None = None, max_job_size: int | None = None) -> None:
        super().__init__(tmpdir)
        self.max_job_size = max_job_size

    def command(self) -> list[str]:
        binlog = self.dir / "binlog"
        binlog.mkdir(exist_ok=True)
        cmd = ["beanstalkd", "-l", "127.0.0.1", "-p", str(self.port), "-b", str(binlog)]
        if self.max_job_size is not None:
            cmd += ["-z", str(self.max_job_size)]
        return cmd


class Memcached(Server):
    """memcached with 64 MB, no UDP; as root it runs as the ``memcache`` user."""

    name = "memcached"

    def command(self) -> list[str]:
        cmd = ["memcached", "-l", "127.0.0.1", "-p", str(self.port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            cmd += ["-u", _existing_user("memcache", "nobody")]
        return cmd


class ZooKeeper(Server):
    """A standalone ZooKeeper 3.8 with the zoo.cfg of SERVICES.md (tickTime 500 ms,
    so sessions of 1 to 10 s; admin server off)."""

    name = "zookeeper"

    def command(self) -> list[str]:
        data = self.dir / "data"
        data.mkdir(exist_ok=True)
        config = self.dir / "zoo.cfg"
        config.write_text(
            "tickTime=500\n"
            f"dataDir={data}\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"
            "minSessionTimeout=1000\n"
            "4lw.commands.whitelist=ruok,srvr\n"
        )
        return [
            "java", "-Xmx256m", "-XX:+UseSerialGC", "-cp", ZOOKEEPER_CLASSPATH,
            "org.apache.zookeeper.server.ZooKeeperServerMain", str(config),
        ]

    def ready(self) -> bool:
        """Accepting connections is not enough: ``srvr`` must say it serves requests."""
        return zookeeper_mode(self.port) == "standalone"


def zookeeper_srvr(port: int, timeout: float = 1.0) -> str:
    """A ZooKeeper's answer to ``srvr`` ('' if it does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
            sock.sendall(b"srvr")
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
    except OSError:
        return ""
    return reply.decode(errors="replace")


def zookeeper_mode(port: int) -> str:
    """'leader', 'follower', 'standalone', or '' (down, or not serving requests)."""
    for line in zookeeper_srvr(port).splitlines():
        if line.startswith("Mode: "):
            return line[len("Mode: "):].strip()
    return ""


def _existing_user(*names: str) -> str:
    for name in names:
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise RuntimeError(f"none of the users {names} exists; memcached refuses to run as root without one")


class Proxy:
    """A TCP forwarder on 127.0.0.1 in front of a server, to make an outage that
    loses no data: ``cut()`` drops every connection and refuses new ones until
    ``resume()``.  Threads only; stopped by ``close()``."""

    def __init__(self, target: str) -> None:
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.port = free_port()
        self._conns: list[socket.socket] = []
        self._listener: socket.socket | None = None
        self._lock = threading.Lock()  # (a connection accepted while cut() runs is closed, not kept)
        self.resume()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def resume(self) -> None:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", self.port))
        listener.listen(64)
        with self._lock:
            self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()

    def cut(self) -> None:
        with self._lock:
            listener, self._listener = self._listener, None
            conns, self._conns = self._conns, []
        if listener is not None:
            with contextlib.suppress(OSError):  # wakes the accept() of _accept: close() alone leaves
                listener.shutdown(socket.SHUT_RDWR)  # it blocked, and the port still accepting
            listener.close()
        self._drop(conns)

    @staticmethod
    def _drop(conns: list[socket.socket]) -> None:
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
            conn.close()

    close = cut

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return  # cut
            try:
                server = socket.create_connection(self.target)
            except OSError:
                client.close()
                continue
            with self._lock:  # (cut meanwhile: a client that got through while the others
                kept = self._listener is listener  # were cut would keep its session alive)
                if kept:
                    self._conns += [client, server]
            if not kept:
                self._drop([client, server])
                return
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pipe, args=(a, b), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
