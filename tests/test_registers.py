"""The run-name registers on ZooKeeper (``backends/beanstalk/registers.py``):
where a run name points to its generation when the store has several memcached
servers.  Compare-and-set semantics, expiry, pruning; against a real ZooKeeper."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
from packmule.backends.beanstalk import BeanstalkBackend
from packmule.backends.beanstalk._pool import Servers
from packmule.backends.beanstalk.locks import ZooKeeperLocks
from packmule.backends.beanstalk.registers import LEDGER_ROOT, ZooKeeperRegisters

from conformance.servers import ZooKeeper


@pytest.fixture(scope="module")
def zookeeper() -> Iterator[ZooKeeper]:
    with ZooKeeper() as zk:
        yield zk


@pytest.fixture
def registers(zookeeper: ZooKeeper) -> Iterator[ZooKeeperRegisters]:
    locks = ZooKeeperLocks(Servers.from_env({"PACKMULE_ZOOKEEPER": zookeeper.address}, "PACKMULE_ZOOKEEPER", ""),
                           5.0)
    try:
        yield ZooKeeperRegisters(locks)
    finally:
        locks.close()


def test_a_register_is_created_once_and_swapped_only_from_what_was_read(registers: ZooKeeperRegisters) -> None:
    name = f"pm/cas-{time.monotonic_ns()}"
    # Given an absent register
    assert registers.read(name) == (None, None)
    # When two writers both read it absent and create it
    assert registers.swap(name, None, b"first", 60)
    assert not registers.swap(name, None, b"second", 60)
    # Then the first wins; a swap from a stale token loses; one from the current token wins
    value, token = registers.read(name)
    assert value == b"first"
    assert registers.swap(name, token, b"third", 60)
    assert not registers.swap(name, token, b"fourth", 60)
    assert registers.read(name)[0] == b"third"
    # and a delete from the current token empties it
    assert registers.swap(name, registers.read(name)[1], None, 60)
    assert registers.read(name) == (None, None)


def test_of_racing_creators_exactly_one_wins(registers: ZooKeeperRegisters) -> None:
    name = f"pm/race-{time.monotonic_ns()}"
    wins: list[bytes] = []
    barrier = threading.Barrier(8)

    def create(i: int) -> None:
        barrier.wait()
        if registers.swap(name, None, b"%d" % i, 60):
            wins.append(b"%d" % i)

    threads = [threading.Thread(target=create, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1 and registers.read(name)[0] == wins[0]


def test_an_expired_register_reads_absent_is_overwritten_and_pruned(registers: ZooKeeperRegisters) -> None:
    # Given a register written with a 1 s ttl, and one with an hour
    stale, fresh = f"pm/stale-{time.monotonic_ns()}", f"pm/fresh-{time.monotonic_ns()}"
    assert registers.swap(stale, None, b"old", 1)
    assert registers.swap(fresh, None, b"new", 3600)
    time.sleep(2.1)
    # Then the expired one reads absent, with a token that lets the next start overwrite it
    value, token = registers.read(stale)
    assert value is None and token is not None
    assert not registers.swap(stale, None, b"x", 60)  # (a create would meet the old node)
    # and pruning deletes it, and only it
    assert registers.prune() >= 1
    assert registers.read(stale) == (None, None)
    assert registers.read(fresh)[0] == b"new"


def test_registers_are_used_only_with_several_memcached_servers(zookeeper: ZooKeeper) -> None:
    env = {"PACKMULE_SECRET": "s", "PACKMULE_ZOOKEEPER": zookeeper.address}
    one = BeanstalkBackend.from_env(dict(env, PACKMULE_MEMCACHED="127.0.0.1:1"))
    two = BeanstalkBackend.from_env(dict(env, PACKMULE_MEMCACHED="127.0.0.1:1,127.0.0.1:2"))
    try:
        assert one.registers is None  # (one server: its add picks one winner; the pointer stays in it)
        assert isinstance(two.registers, ZooKeeperRegisters)
    finally:
        one.close()
        two.close()


def test_the_ledger_is_on_zookeeper_with_any_memcached_and_apart_from_the_registers(zookeeper: ZooKeeper) -> None:
    env = {"PACKMULE_SECRET": "s", "PACKMULE_ZOOKEEPER": zookeeper.address}
    one = BeanstalkBackend.from_env(dict(env, PACKMULE_MEMCACHED="127.0.0.1:1"))
    two = BeanstalkBackend.from_env(dict(env, PACKMULE_MEMCACHED="127.0.0.1:1,127.0.0.1:2"))
    try:
        assert isinstance(one.ledger, ZooKeeperRegisters) and one.ledger.root == LEDGER_ROOT
        # one name, two registers: a ledger claim is not a run-name pointer
        assert two.registers is not None
        name = f"pm/both-{time.monotonic_ns()}"
        assert two.ledger.swap(name, None, b"tick", 60)
        assert two.registers.read(name) == (None, None)
        assert two.registers.swap(name, None, b"gen", 60)
        assert one.ledger.read(name)[0] == b"tick"
    finally:
        one.close()
        two.close()


def test_a_worker_process_prune_deletes_the_expired_ledger_registers(zookeeper: ZooKeeper) -> None:
    from packmule._model.registry import Beat

    backend = BeanstalkBackend.from_env({"PACKMULE_SECRET": "s", "PACKMULE_ZOOKEEPER": zookeeper.address,
                                         "PACKMULE_MEMCACHED": "127.0.0.1:1"})
    try:
        stale = f"pm/ledger-stale-{time.monotonic_ns()}"
        assert backend.ledger.swap(stale, None, b"old", 1)
        time.sleep(2.1)
        Beat(backend).prune()  # (what `packmule worker` runs about hourly)
        assert backend.ledger.read(stale) == (None, None)
    finally:
        backend.close()


def test_a_label_names_a_server_for_placement_whatever_its_address() -> None:
    # Given two processes that reach the second server at different addresses, labelled alike
    a = Servers.from_env({"V": "m1=127.0.0.1:1,m2=127.0.0.1:2"}, "V", "")
    b = Servers.from_env({"V": "m2=10.0.0.9:7,m1=127.0.0.1:1"}, "V", "")
    # Then their servers have the same ids (what placement hashes), in any order
    assert sorted(a.ids) == sorted(b.ids) == ["m1", "m2"]
    assert Servers.from_env({"V": "127.0.0.1:1"}, "V", "").ids == ["127.0.0.1:1"]
    with pytest.raises(ValueError, match="twice"):
        Servers.from_env({"V": "m1=127.0.0.1:1,m1=127.0.0.1:2"}, "V", "")
    with pytest.raises(ValueError, match="label"):
        Servers.from_env({"V": "bad label=127.0.0.1:1"}, "V", "")
