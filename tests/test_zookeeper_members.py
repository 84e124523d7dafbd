"""On a 3-member ZooKeeper ensemble (real members on loopback, stopped by PID)
with one member killed: the lock tests of conformance/ and tests/ pass, and
``server_states()`` gives each member's state (for ``packmule status`` and the
dashboard)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("kazoo")

from packmule.backends.beanstalk import BeanstalkBackend  # noqa: E402

from conformance.harness import Harness, beanstalk_harness  # noqa: E402


@pytest.fixture(scope="module")
def cluster() -> Iterator[Harness]:
    """beanstalkd, memcached, a 3-member ZooKeeper ensemble and a 2-process worker."""
    with beanstalk_harness(concurrency=2, zookeepers=3) as h:
        yield h


@pytest.fixture
def ensemble(cluster: Harness) -> Iterator[Any]:
    """The ensemble, every member running; members a test killed are started again after it."""
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


# --- the lock tests of conformance/ and tests/, on two members of three -----------------------
@pytest.fixture
def degraded(ensemble: Any) -> Any:
    """The ensemble with its leader killed, and a new leader elected."""
    ensemble.leader().kill()
    ensemble.wait_for_leader()
    return ensemble


def test_the_conformance_lock_tests_pass_with_the_leader_killed(
    cluster: Harness, degraded: Any, tmp_path: Path,
) -> None:
    from conformance import test_backend_contract as contract
    from conformance import test_coordination as coordination

    coordination.test_lock_gives_mutual_exclusion_across_workers(cluster.backend, tmp_path)
    coordination.test_lock_times_out_while_another_holds_it(cluster.backend)
    assert cluster.bare is not None
    with cluster.bare() as bare:
        contract.test_a_lock_held_in_one_process_times_out_a_contender_in_another(bare)
        contract.test_locked_sections_of_several_processes_never_overlap(bare)
        contract.test_the_lock_of_a_holder_that_died_is_freed(bare)


def test_the_backend_lock_tests_pass_with_the_leader_killed(cluster: Harness, degraded: Any) -> None:
    import test_beanstalk_backend as unit  # tests/ is on sys.path (pytest's rootdir-less import)

    made: list[BeanstalkBackend] = []

    def make(env: dict[str, str], **kwargs: Any) -> BeanstalkBackend:
        made.append(BeanstalkBackend.from_env(env, **kwargs))
        return made[-1]

    env = dict(cluster.env)
    try:
        unit.test_lock_excludes_other_processes(env)
        unit.test_lock_is_freed_when_its_holder_is_killed(env, make(env))
        unit.test_lock_timeout_raises_timeout_error(env, make)
        unit.test_lock_names_that_are_not_znode_names_are_distinct_locks(make(env))
        unit.test_a_forked_child_has_a_zookeeper_session_of_its_own(make(env))
    finally:
        for backend in made:
            backend.close()


# --- each member's state ------------------------------------------------------------------------
def zookeeper_states(backend: BeanstalkBackend) -> dict[str, Any]:
    return {s.server: s for s in backend.server_states() if s.service == "ZooKeeper"}


def test_server_states_set_a_killed_member_aside_and_say_when_it_came_back(
    ensemble: Any, backend: BeanstalkBackend,
) -> None:
    # Given a follower killed
    victim = ensemble.followers()[0]
    victim.kill()
    ensemble.wait_for_leader()
    killed = time.time()
    # When the backend's server states are asked for
    states = zookeeper_states(backend)
    # Then that member is aside since now, saying why; the two others are up, a leader and a follower
    assert set(states) == {m.address for m in ensemble.members}
    aside = states[victim.address]
    assert aside.state == "aside" and killed - 5 < aside.since <= time.time(), aside
    assert "refused" in aside.problem.lower(), aside
    assert sorted(states[m.address].role for m in ensemble.members if m is not victim) == ["follower", "leader"]
    assert all(states[m.address].state == "up" for m in ensemble.members if m is not victim)
    # When it is started again
    victim.start()
    # Then it is up again (the prober found it), with the time it came back, as a follower
    deadline = time.monotonic() + 30
    while (state := zookeeper_states(backend)[victim.address]).state != "up":
        assert time.monotonic() < deadline, state
        time.sleep(0.2)
    assert state.back is not None and state.back >= aside.since and state.role == "follower", state


def _listen(reply: bytes | None) -> tuple[str, Callable[[], None]]:
    """A listener on loopback that answers each connection with ``reply`` and
    closes it (None: holds it open, silent); and what closes it and every
    connection it holds."""
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    held: list[Any] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            if reply is None:
                held.append(conn)
                continue
            with conn, contextlib.suppress(OSError):  # (the prober may have hung up first)
                conn.recv(16)
                conn.sendall(reply)

    def close() -> None:
        listener.close()
        for conn in held:
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"127.0.0.1:{listener.getsockname()[1]}", close


def test_a_member_is_up_when_it_takes_the_connection_whatever_it_answers_to_srvr() -> None:
    from packmule.backends.beanstalk._members import MemberHealth
    from packmule.backends.beanstalk._pool import Servers

    from conformance.servers import free_port

    # Given members that: hold the connection silent, refuse srvr (4lw not allowed),
    # say they are not serving, answer as a leader; and an address nobody listens on
    replies = [None, b"srvr is not executed because it is not in the whitelist.\n",
               b"This ZooKeeper instance is not currently serving requests\n",
               b"Zookeeper version: 3.8\nMode: leader\nNode count: 5\n"]
    listeners = [_listen(reply) for reply in replies]
    addresses = [address for address, _ in listeners] + [f"127.0.0.1:{free_port()}"]
    servers = Servers([(a.split(":")[0], int(a.split(":")[1])) for a in addresses], "PACKMULE_ZOOKEEPER", False)
    try:
        # When they are probed
        states = MemberHealth(servers, 2.0).server_states()
        # Then those that took the connection are up (with the role they gave), except the one not serving
        assert [(s.state, s.role) for s in states] == [
            ("up", ""), ("up", ""), ("aside", ""), ("up", "leader"), ("aside", "")]
        assert "not serving" in states[2].problem and "refused" in states[4].problem.lower()
        assert [s.server for s in states] == addresses
    finally:
        for _, close in listeners:
            close()
