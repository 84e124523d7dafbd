"""``Runner.lock`` on a 3-member ZooKeeper ensemble (real members on loopback,
stopped by PID) when one member dies: the member a session is connected to, a
follower, or the leader, before a lock is taken or while it is held.  Several
real processes contend for one lock and append "enter"/"leave" lines to one
file (``O_APPEND``: the file's order is the order of the events), so an
overlap shows as two "enter" lines in a row.  Also: what locks.py does when
ZooKeeper stays out of reach for longer than the session timeout, and the
ledger's create-if-absent on two members of three.  The lock
tests of conformance/ and tests/ on a degraded ensemble, and each member's
state, are in test_zookeeper_members.py."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kazoo")

from packmule.backends.beanstalk import BeanstalkBackend  # noqa: E402
from packmule.backends.beanstalk.locks import SESSION_TIMEOUT  # noqa: E402

from conformance.harness import Harness, beanstalk_harness  # noqa: E402
from conformance.runners import Worky, lines  # noqa: E402  (lines: a file's words)
from conformance.servers import Proxy  # noqa: E402
from conformance.test_backend_contract import overlapping, run_together  # noqa: E402
from conformance.test_ledger_contract import _creator  # noqa: E402
from packmule._core.errors import BackendUnavailable  # noqa: E402

SPAWN = multiprocessing.get_context("spawn")
WAIT = 120  # s: far beyond what any wait here needs


@pytest.fixture(scope="module")
def cluster() -> Iterator[Harness]:
    """beanstalkd, memcached, a 3-member ZooKeeper ensemble and a 2-process worker."""
    with beanstalk_harness(concurrency=2, zookeepers=3) as h:
        yield h


@pytest.fixture
def ensemble(cluster: Harness) -> Iterator[Any]:
    """The ensemble, every member running and one of them the leader; members a
    test killed are started again after it."""
    zk = cluster.extras["zookeeper"]
    zk.start()
    yield zk
    zk.start()


@pytest.fixture
def backend(cluster: Harness) -> Iterator[BeanstalkBackend]:
    """A backend of this test's own (its own ZooKeeper sessions)."""
    made = BeanstalkBackend.from_env(cluster.env)
    yield made
    made.close()


def member_of(backend: BeanstalkBackend, ensemble: Any) -> Any:
    """The member that ``backend``'s (one) connected session talks to."""
    clients = [c for c in backend.locks._sessions if c.state == "CONNECTED"]
    assert len(clients) == 1, clients
    host, port = clients[0]._connection._socket.getpeername()[:2]
    return ensemble.member_at(f"{host}:{port}")


def pick(target: str, ensemble: Any, mine: Any) -> Any:
    if target == "connected":
        return mine
    if target == "leader":
        return ensemble.leader()
    return next(m for m in ensemble.followers() if m is not mine)  # a follower nobody here talks to


# --- what the processes do --------------------------------------------------------------------
def events(path: str) -> list[list[str]]:
    """The lines of ``path``, split into words."""
    try:
        with open(path) as f:
            return [line.split() for line in f.read().splitlines()]
    except FileNotFoundError:
        return []


def note(path: str, event: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{os.getpid()} {event} {time.monotonic():.6f}\n".encode())
    finally:
        os.close(fd)


def contend(env: dict[str, str], name: str, rounds: int, path: str, go: str) -> None:
    """Connect, wait for ``go`` to exist, then enter the lock ``rounds`` times (50 ms inside)."""
    backend = BeanstalkBackend.from_env(env)
    try:
        with backend.lock(name + "-warmup", WAIT):
            note(path + ".ready", "ready")
        while not os.path.exists(go):
            time.sleep(0.01)
        for _ in range(rounds):
            with backend.lock(name, WAIT):
                note(path, "enter")
                time.sleep(0.05)
                note(path, "leave")
    finally:
        backend.close()


def try_lock(env: dict[str, str], name: str, timeout: float, out: Any) -> None:
    backend = BeanstalkBackend.from_env(env)
    try:
        with backend.lock(name, timeout):
            out.put("entered")
    except TimeoutError:
        out.put("timed out")
    finally:
        backend.close()


@pytest.fixture
def contenders(cluster: Harness, tmp_path: Path) -> Iterator[Any]:
    """Start ``count`` contending processes (ready to go once ``go`` exists)."""
    procs: list[Any] = []

    def start(name: str, count: int, rounds: int) -> tuple[str, Path]:
        path, go = str(tmp_path / "sections"), tmp_path / "go"
        procs.extend(SPAWN.Process(target=contend, args=(cluster.env, name, rounds, path, str(go)))
                     for _ in range(count))
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + WAIT
        while len(events(path + ".ready")) < count:
            assert all(p.exitcode in (None, 0) for p in procs), "a contender died"
            assert time.monotonic() < deadline, "the contenders did not connect"
            time.sleep(0.05)
        return path, go

    start.procs = procs  # type: ignore[attr-defined]
    yield start
    for proc in procs:
        proc.kill()
        proc.join()


def finish(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(WAIT)
        assert proc.exitcode == 0, f"a contender ended with {proc.exitcode}"


def sections(path: str) -> list[tuple[int, float, float]]:
    """(pid, entered, left) of each section, asserting that none overlaps another:
    in the file, every "enter" is followed by the "leave" of the same process."""
    noted = events(path)
    assert len(noted) % 2 == 0, noted[-3:]
    out = []
    for (pid, enter, t0), (pid2, leave, t1) in zip(noted[::2], noted[1::2], strict=True):
        assert (enter, leave, pid2) == ("enter", "leave", pid), f"two holders at once: {noted}"
        out.append((int(pid), float(t0), float(t1)))
    assert all(a[2] <= b[1] for a, b in zip(out, out[1:], strict=False))
    return out


# --- a member killed ---------------------------------------------------------------------------
@pytest.mark.parametrize("target", ["connected", "follower", "leader"])
def test_a_lock_held_across_a_member_kill_stays_held_once_and_every_contender_gets_it(
    target: str, ensemble: Any, backend: BeanstalkBackend, contenders: Any,
) -> None:
    # Given this process holding the lock, and 4 processes waiting for it
    name = f"held-{target}-{os.urandom(4).hex()}"
    with backend.lock(name, WAIT):
        path, go = contenders(name, 4, 3)
        note(path, "enter")
        go.touch()
        # When a member dies (SIGKILL) while the lock is held and contended
        victim = pick(target, ensemble, member_of(backend, ensemble))
        victim.kill()
        ensemble.wait_for_leader()
        # Then nobody else enters for twice the session timeout
        time.sleep(2 * SESSION_TIMEOUT + 1)
        note(path, "leave")
    # and once it is released every contender enters, 3 times, one at a time
    finish(contenders.procs)
    held = sections(path)
    assert held[0][0] == os.getpid() and held[0][2] - held[0][1] > 2 * SESSION_TIMEOUT
    assert sorted(pid for pid, _, _ in held[1:]) == sorted(p.pid for p in contenders.procs for _ in range(3))


@pytest.mark.parametrize("target", ["connected", "follower", "leader"])
def test_after_a_member_was_killed_contenders_still_exclude_each_other(
    target: str, ensemble: Any, backend: BeanstalkBackend, contenders: Any,
) -> None:
    # Given a member killed (the one this process's session talks to, a follower, or the leader)
    with backend.lock("warmup", WAIT):
        victim = pick(target, ensemble, member_of(backend, ensemble))
    victim.kill()
    ensemble.wait_for_leader()
    # When this process and 4 others contend for one lock, 5 times each
    name = f"after-{target}-{os.urandom(4).hex()}"
    path, go = contenders(name, 4, 5)
    go.touch()
    for _ in range(5):
        with backend.lock(name, WAIT):
            note(path, "enter")
            time.sleep(0.05)
            note(path, "leave")
    # Then the sections never overlap, and each process had all of its own
    finish(contenders.procs)
    held = sections(path)
    assert sorted(pid for pid, _, _ in held) == sorted([os.getpid(), *(p.pid for p in contenders.procs)] * 5)


def test_a_run_of_locked_jobs_completes_exactly_when_the_leader_dies_mid_run(
    cluster: Harness, ensemble: Any, tmp_path: Path,
) -> None:
    # Given a run of 200 jobs that each increment a file's counter under self.lock
    runner = Worky(backend=cluster.backend)
    path = str(tmp_path / "counter")
    jobs = runner.enqueue_each("locked_increment", range(200), path)
    deadline = time.monotonic() + WAIT
    # (one read per look: a job rewrites the file under its lock, and a second read may find it empty)
    while not (seen := lines(path)) or int(seen[-1]) < 10:
        assert time.monotonic() < deadline, "the jobs did not start"
        time.sleep(0.01)
    # When the leader is killed mid-run
    ensemble.leader().kill()
    # Then the run completes, and no increment was lost to two holders at once
    assert runner.deferred_result("total", jobs) == sum(range(200))
    assert lines(path) == ["200"]


def test_of_processes_claiming_ledger_registers_at_once_exactly_one_wins_each_with_the_leader_killed(
    cluster: Harness, ensemble: Any, backend: BeanstalkBackend,
) -> None:
    # Given an ensemble whose leader was killed (SIGKILL): two members of three left
    ensemble.leader().kill()
    ensemble.wait_for_leader()
    # When 4 processes create the same 30 ledger registers at once (create-if-absent)
    names = [f"ensemble-claim{i}-{os.urandom(4).hex()}" for i in range(30)]
    tags = [f"process {n}".encode() for n in range(4)]
    reports = run_together(_creator, [(cluster.env, names, tag) for tag in tags])
    assert overlapping([spans for *_, spans in reports]) > 0, "the creates never overlapped: nothing was proven"
    # Then each has exactly one winner, whose value every process read
    winners = {name: [tag for tag, won, _, _ in reports if name in won] for name in names}
    assert all(len(w) == 1 for w in winners.values()), winners
    assert all(seen == {name: w[0] for name, w in winners.items()} for _, _, seen, _ in reports)
    assert {name: backend.ledger.read(name)[0] for name in names} == {name: w[0] for name, w in winners.items()}


# --- ZooKeeper out of reach for longer than the session timeout --------------------------------
def test_a_held_lock_survives_the_ensemble_losing_its_quorum_for_longer_than_the_session_timeout(
    cluster: Harness, ensemble: Any, backend: BeanstalkBackend,
) -> None:
    name = f"quorum-{os.urandom(4).hex()}"
    waited: list[BaseException] = []

    def wait_for_it() -> None:
        try:
            with backend.lock(name, None):
                waited.append(AssertionError("the waiter entered while the lock was held"))
        except BaseException as exc:  # noqa: BLE001 - the test looks at it
            waited.append(exc)

    # Given this process holding a lock, and a thread of it waiting for the same lock
    with backend.lock(name, WAIT):
        mine = member_of(backend, ensemble)
        waiter = threading.Thread(target=wait_for_it)
        waiter.start()
        time.sleep(0.5)
        # When two members of three die, and a quorum is back only after 1.5 session timeouts
        down = [mine, next(m for m in ensemble.members if m is not mine)]
        for member in down:
            member.kill()
        waiter.join(SESSION_TIMEOUT * 1.5 + 5)
        down[0].start()
        ensemble.wait_for_leader()
        # Then the waiter gave up (BackendUnavailable), but the holder's session lives on:
        # another process cannot take the lock for twice the session timeout
        assert not waiter.is_alive() and isinstance(waited[0], BackendUnavailable), waited
        out = SPAWN.Queue()
        other = SPAWN.Process(target=try_lock, args=(cluster.env, name, 2 * SESSION_TIMEOUT + 2, out))
        other.start()
        assert out.get(timeout=WAIT) == "timed out"
        other.join(WAIT)
    # and the holder leaves without an error; then the other gets it at once
    other = SPAWN.Process(target=try_lock, args=(cluster.env, name, 5, out))
    other.start()
    assert out.get(timeout=WAIT) == "entered"
    other.join(WAIT)


def test_leaving_a_block_whose_session_expired_meanwhile_raises_backend_unavailable(
    cluster: Harness, ensemble: Any,
) -> None:
    # Given a holder that reaches every member through a proxy
    proxies = [Proxy(member.address) for member in ensemble.members]
    holder = BeanstalkBackend.from_env({**cluster.env, "PACKMULE_ZOOKEEPER": ",".join(p.address for p in proxies)})
    name = f"expired-{os.urandom(4).hex()}"
    try:
        with pytest.raises(BackendUnavailable, match="lost while held"), holder.lock(name, WAIT):
            # When it is cut off from ZooKeeper for longer than the session timeout
            for proxy in proxies:
                proxy.cut()
            out = SPAWN.Queue()
            other = SPAWN.Process(target=try_lock, args=(cluster.env, name, 3 * SESSION_TIMEOUT, out))
            other.start()
            # Then its session expires, and the lock is free for others (no fencing
            # can stop the holder's block meanwhile) ...
            assert out.get(timeout=WAIT) == "entered"
            other.join(WAIT)
            for proxy in proxies:
                proxy.resume()
            time.sleep(2)  # it reconnects: a new session
        # ... and the holder is told so when it leaves its block
        with holder.lock(name, 5):
            pass  # and it can take the lock again, on its new session
    finally:
        holder.close()
        for proxy in proxies:
            proxy.close()


def test_a_watchdog_firing_as_the_session_comes_back_does_not_end_a_session_that_holds_a_lock(
    cluster: Harness, ensemble: Any, backend: BeanstalkBackend,
) -> None:
    # Given a held lock
    name = f"race-{os.urandom(4).hex()}"
    with backend.lock(name, WAIT):
        (client,) = backend.locks._sessions
        # When the watchdog of a SUSPENDED spell fires just as the connection comes back
        # (it sees the state it was armed for)
        client.state = "SUSPENDED"
        try:
            backend.locks._give_up(client)
        finally:
            client.state = "CONNECTED"
        # Then the session is not ended: another process still cannot take the lock
        out = SPAWN.Queue()
        other = SPAWN.Process(target=try_lock, args=(cluster.env, name, 2 * SESSION_TIMEOUT, out))
        other.start()
        assert out.get(timeout=WAIT) == "timed out"
        other.join(WAIT)
