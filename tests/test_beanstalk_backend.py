"""The beanstalk backend against real beanstalkd, memcached and ZooKeeper servers
(started by tests/servers.py; skipped when those are not installed)."""

from __future__ import annotations

import contextlib
import itertools
import logging
import multiprocessing
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("greenstalk")
pytest.importorskip("pymemcache")
pytest.importorskip("kazoo")

import greenstalk  # noqa: E402
import packmule.backends.beanstalk as beanstalk  # noqa: E402
from packmule.backends.base import Put  # noqa: E402
from packmule.backends.beanstalk import BeanstalkBackend  # noqa: E402
from packmule.backends.beanstalk._connection import PRIORITY  # noqa: E402
from packmule.backends.beanstalk._pool import Servers  # noqa: E402
from packmule.backends.beanstalk.locks import CONNECTED, LOST, MAX_IDLE, SUSPENDED  # noqa: E402
from packmule.backends.beanstalk.queue import shard_index, shard_order  # noqa: E402
from packmule.backends.beanstalk.store import MAX_TTL, expiry, memcached_key  # noqa: E402
from pymemcache.client.base import Client as MemcacheClient  # noqa: E402

from conformance.servers import (  # noqa: E402
    Beanstalkd,
    Memcached,
    ZooKeeper,
    free_port,
    servers_installed,
    zookeeper_srvr,
)
from packmule._core.errors import BackendUnavailable  # noqa: E402

MISSING = servers_installed()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=MISSING or "")
SPAWN = multiprocessing.get_context("spawn")
FORK = multiprocessing.get_context("fork")
FORK_WITH_THREADS = "ignore:This process .* is multi-threaded:DeprecationWarning"  # Python >= 3.12


# --- servers and backends ---------------------------------------------------------------------
def reserve(queue: Any, count: int, timeout: float = 5.0) -> list[Any]:
    """Reserve ``count`` jobs: the queue hands over at most one per server a call."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got += queue.reserve_many(count - len(got), 1)
    return got


@pytest.fixture(scope="module")

def beanstalkd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Beanstalkd]:
    with Beanstalkd(tmp_path_factory.mktemp("beanstalkd")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def beanstalkd2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Beanstalkd]:
    with Beanstalkd(tmp_path_factory.mktemp("beanstalkd2")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def memcached(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Memcached]:
    with Memcached(tmp_path_factory.mktemp("memcached")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def memcached2(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Memcached]:
    with Memcached(tmp_path_factory.mktemp("memcached2")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture(scope="module")
def zookeeper(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeper]:
    with ZooKeeper(tmp_path_factory.mktemp("zookeeper")) as server:
        yield server  # type: ignore[misc]


@pytest.fixture
def env(beanstalkd: Beanstalkd, memcached: Memcached, zookeeper: ZooKeeper) -> dict[str, str]:
    """Settings for the shared servers, with a tube of this test's own."""
    return {
        "PACKMULE_BEANSTALKD": beanstalkd.address,
        "PACKMULE_MEMCACHED": memcached.address,
        "PACKMULE_ZOOKEEPER": zookeeper.address,
        "PACKMULE_TUBE": f"t{uuid.uuid4().hex[:16]}",
        "PACKMULE_SECRET": "test secret",
    }


@pytest.fixture
def make_backend() -> Iterator[Callable[..., BeanstalkBackend]]:
    """Build backends from settings; every one is closed after the test."""
    made: list[BeanstalkBackend] = []

    def make(env: dict[str, str], **kwargs: Any) -> BeanstalkBackend:
        made.append(BeanstalkBackend.from_env(env, **kwargs))
        return made[-1]

    yield make
    for backend in made:
        backend.close()


@pytest.fixture
def backend(env: dict[str, str], make_backend: Callable[..., BeanstalkBackend]) -> BeanstalkBackend:
    return make_backend(env)


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own."""
    return f"k{uuid.uuid4().hex[:12]}:"


def stats_job(address: str, job_id: int) -> greenstalk.StatsJob:
    host, port = address.rsplit(":", 1)
    with greenstalk.Client((host, int(port)), encoding=None) as client:
        return client.stats_job(job_id)


def eventually(check: Callable[[], bool], within: float = 5.0) -> bool:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def in_processes(ctx: Any, target: Callable[..., None], count: int, *args: Any) -> list[Any]:
    """Run ``target(results, *args)`` in ``count`` processes; each puts one result."""
    results = ctx.Queue()
    procs = [ctx.Process(target=target, args=(results, *args)) for _ in range(count)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(30)
        assert proc.exitcode == 0
    results.close()
    results.join_thread()
    return got


# --- queue --------------------------------------------------------------------------------------
def test_put_reserve_ack_round_trip(backend: BeanstalkBackend, beanstalkd: Beanstalkd) -> None:
    bodies = [b"first", b"", b"binary \x00\r\n\xff end"]
    backend.queue.put_many([Put(f"job-{i}", body, 60) for i, body in enumerate(bodies)])

    got = reserve(backend.queue, 3)
    assert [job.body for job in got] == bodies
    assert {job.server for job in got} == {beanstalkd.address}

    backend.queue.ack_many([job.handle for job in got])
    assert backend.queue.stats() == (0, 0, 0, 0, 1)


def test_ttr_is_rounded_up_to_whole_seconds(backend: BeanstalkBackend, beanstalkd: Beanstalkd) -> None:
    backend.queue.put_many([Put("a", b"1.2 s", 1.2), Put("b", b"0.01 s", 0.01)])
    got = reserve(backend.queue, 2)
    ttrs = {job.body: stats_job(beanstalkd.address, job.handle.job_id)["ttr"] for job in got}
    assert ttrs == {b"1.2 s": 2, b"0.01 s": 1}


def test_a_puts_delay_is_rounded_down_to_whole_seconds_and_its_priority_kept(
        backend: BeanstalkBackend, beanstalkd: Beanstalkd) -> None:
    # (beanstalkd keeps whole seconds: the engine holds a job given out early for the fraction left)
    backend.queue.put_many([Put("a", b"soon", 60, delay=0.7, priority=5), Put("b", b"later", 60, delay=1.2)])
    assert backend.queue.stats().delayed == 1
    [job] = backend.queue.reserve_many(1, 0)
    assert job.body == b"soon" and stats_job(beanstalkd.address, job.handle.job_id)["pri"] == PRIORITY - 5
    # and a release keeps the job's priority
    backend.queue.release(job.handle, 0)
    [again] = reserve(backend.queue, 1)
    assert again.body == b"soon" and stats_job(beanstalkd.address, again.handle.job_id)["pri"] == PRIORITY - 5
    backend.queue.ack_many([again.handle])


def test_release_with_delay_makes_the_job_ready_after_the_delay(backend: BeanstalkBackend) -> None:
    backend.queue.put_many([Put("a", b"job", 60)])
    [job] = backend.queue.reserve_many(1, 1)

    released = time.monotonic()
    backend.queue.release(job.handle, 1.2)
    assert backend.queue.stats().delayed == 1
    [again] = backend.queue.reserve_many(1, 4)
    assert again.body == b"job"
    assert time.monotonic() - released >= 1.0


def test_bury_sets_the_job_aside_and_counts_it(backend: BeanstalkBackend) -> None:
    backend.queue.put_many([Put("a", b"bad", 60)])
    [job] = backend.queue.reserve_many(1, 1)
    backend.queue.bury(job.handle)
    assert backend.queue.stats() == (0, 0, 0, 1, 1)
    assert backend.queue.reserve_many(1, 0) == []


def test_touch_restarts_the_time_to_run(backend: BeanstalkBackend) -> None:
    backend.queue.put_many([Put("a", b"long job", 2)])
    [job] = backend.queue.reserve_many(1, 1)
    time.sleep(1.5)
    backend.queue.touch(job.handle)
    time.sleep(1.1)  # 2.6 s after the reserve: past the first time-to-run, not the renewed one
    assert backend.queue.stats().reserved == 1


def test_ack_of_a_lapsed_reservation_is_ignored(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    # Given a job whose time-to-run ran out while its first consumer held it,
    # and that a second consumer then reserved
    first, second = make_backend(env), make_backend(env)
    first.queue.put_many([Put("a", b"slow", 1)])
    [lapsed] = first.queue.reserve_many(1, 1)
    [current] = second.queue.reserve_many(1, 3)
    # When the first consumer acks it
    first.queue.ack_many([lapsed.handle])
    # Then nothing is raised and the second consumer still holds the job
    assert first.queue.stats().reserved == 1
    second.queue.ack_many([current.handle])
    assert first.queue.stats() == (0, 0, 0, 0, 2)


@pytest.mark.parametrize("action", ["release", "bury", "touch"])
def test_release_bury_and_touch_of_a_lapsed_reservation_are_ignored(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], action: str,
) -> None:
    first, second = make_backend(env), make_backend(env)
    first.queue.put_many([Put("a", b"slow", 1)])
    [lapsed] = first.queue.reserve_many(1, 1)
    second.queue.reserve_many(1, 3)

    if action == "release":
        first.queue.release(lapsed.handle, 0)
    else:
        getattr(first.queue, action)(lapsed.handle)

    assert first.queue.stats() == (0, 1, 0, 0, 2)


def test_reservation_returns_to_the_queue_when_its_consumer_closes(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    consumer, other = make_backend(env), make_backend(env)
    consumer.queue.put_many([Put("a", b"job", 600)])
    [job] = consumer.queue.reserve_many(1, 1)

    consumer.close()

    [again] = other.queue.reserve_many(1, 2)
    assert again.body == b"job"
    consumer.queue.ack_many([job.handle])  # lapsed: ignored
    assert other.queue.stats().reserved == 1


def test_a_reservation_can_be_acked_from_another_thread(backend: BeanstalkBackend) -> None:
    backend.queue.put_many([Put("a", b"job", 60)])
    reserved: list[Any] = []
    thread = threading.Thread(target=lambda: reserved.extend(backend.queue.reserve_many(1, 1)))
    thread.start()
    thread.join()

    backend.queue.ack_many([reserved[0].handle])
    assert backend.queue.stats()[:4] == (0, 0, 0, 0)


def test_reserve_many_never_returns_more_than_max_count(backend: BeanstalkBackend) -> None:
    backend.queue.put_many([Put(f"j{i}", b"x", 60) for i in range(10)])
    assert len(backend.queue.reserve_many(1, 1)) == 1
    assert backend.queue.stats().ready == 9


def test_reserve_many_with_zero_timeout_returns_at_once_when_nothing_is_ready(
    backend: BeanstalkBackend,
) -> None:
    started = time.monotonic()
    assert backend.queue.reserve_many(5, 0) == []
    assert time.monotonic() - started < 0.5


def test_stats_of_an_unused_tube_are_zero(backend: BeanstalkBackend) -> None:
    assert backend.queue.stats() == (0, 0, 0, 0, 0)


def test_stats_count_consumers_but_not_producers_as_workers(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    producer, consumer = make_backend(env), make_backend(env)
    producer.queue.put_many([Put("a", b"job", 60)])
    assert producer.queue.stats().workers == 0
    consumer.queue.reserve_many(1, 0)
    assert producer.queue.stats().workers == 1


def test_a_body_too_large_for_beanstalkd_is_refused_naming_size_and_fix(backend: BeanstalkBackend) -> None:
    jobs = [Put("small", b"fine", 60), Put("big", b"x" * 70_000, 60)]
    with pytest.raises(ValueError, match=r"70000 bytes.*65535.*-z"):
        backend.queue.put_many(jobs)
    assert backend.queue.stats().ready == 0  # refused before anything was queued


def test_put_many_without_pipelining_queues_the_same_jobs(env: dict[str, str]) -> None:
    plain = BeanstalkBackend(
        Servers.from_env(env, "PACKMULE_BEANSTALKD", ""), Servers.from_env(env, "PACKMULE_MEMCACHED", ""),
        Servers.from_env(env, "PACKMULE_ZOOKEEPER", ""), secret=b"s", tube=env["PACKMULE_TUBE"], pipeline=False,
    )
    try:
        plain.queue.put_many([Put(f"j{i}", b"%d" % i, 60) for i in range(5)])
        assert [job.body for job in reserve(plain.queue, 5)] == [b"0", b"1", b"2", b"3", b"4"]
    finally:
        plain.close()


def test_jobs_are_spread_over_two_beanstalkd_servers_by_shard(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
    beanstalkd: Beanstalkd, beanstalkd2: Beanstalkd,
) -> None:
    backend = make_backend({**env, "PACKMULE_BEANSTALKD": f"{beanstalkd.address},{beanstalkd2.address}"})
    shards = [f"job-{i}" for i in range(40)]
    backend.queue.put_many([Put(shard, shard.encode(), 60) for shard in shards])

    for server in (beanstalkd, beanstalkd2):
        expected = sum(backend.queue.server_for(shard) == server.address for shard in shards)
        with greenstalk.Client(("127.0.0.1", server.port), encoding=None) as client:
            assert client.stats_tube(env["PACKMULE_TUBE"])["current-jobs-ready"] == expected > 0


def test_reserve_many_takes_jobs_from_every_server(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
    beanstalkd: Beanstalkd, beanstalkd2: Beanstalkd,
) -> None:
    both = {**env, "PACKMULE_BEANSTALKD": f"{beanstalkd.address},{beanstalkd2.address}"}
    producer, consumer = make_backend(both), make_backend(both)
    producer.queue.put_many([Put(f"job-{i}", b"%d" % i, 60) for i in range(40)])

    got: list[Any] = []
    deadline = time.monotonic() + 10
    while len(got) < 40 and time.monotonic() < deadline:
        got += consumer.queue.reserve_many(7, 1)
    assert sorted(int(job.body) for job in got) == list(range(40))
    assert {job.server for job in got} == {beanstalkd.address, beanstalkd2.address}
    assert producer.queue.stats() == (0, 40, 0, 0, 1)


def test_server_for_is_the_same_in_every_process(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    servers = ",".join(f"127.0.0.1:{port}" for port in (7001, 7002, 7003))
    backend = make_backend({**env, "PACKMULE_BEANSTALKD": servers})
    code = (
        "from packmule.backends.beanstalk import BeanstalkBackend as B\n"
        f"b = B.from_env({{'PACKMULE_BEANSTALKD': {servers!r}, 'PACKMULE_INSECURE': '1'}})\n"
        "print(' '.join(b.queue.server_for(f'job-{i}') for i in range(30)))\n"
    )
    other = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": "12345"},
                           capture_output=True, text=True, check=True)
    mine = [backend.queue.server_for(f"job-{i}") for i in range(30)]
    assert other.stdout.split() == mine
    assert len(set(mine)) == 3


def test_server_for_spreads_keys_evenly_whatever_the_order_the_servers_are_listed_in(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    names = [f"127.0.0.1:{port}" for port in (7001, 7002, 7003)]
    forward = make_backend({**env, "PACKMULE_BEANSTALKD": ",".join(names)})
    backward = make_backend({**env, "PACKMULE_BEANSTALKD": ",".join(reversed(names))})
    shards = [f"run/{i:08x}/{i % 7}" for i in range(3000)]
    chosen = [forward.queue.server_for(shard) for shard in shards]
    assert chosen == [backward.queue.server_for(shard) for shard in shards]
    assert all(900 <= chosen.count(name) <= 1100 for name in names)  # 1000 each, within 10%


def test_a_down_servers_keys_fall_to_the_others_evenly_and_no_other_key_moves() -> None:
    names = [f"127.0.0.1:{port}" for port in (7001, 7002, 7003)]
    shards = [f"run/{i:08x}/{i % 7}" for i in range(3000)]
    orders = [shard_order(shard, names) for shard in shards]
    assert [order[0] for order in orders] == [shard_index(shard, names) for shard in shards]
    assert all(sorted(order) == [0, 1, 2] for order in orders)
    # with server 0 down: its keys go to their second choice, half to each other server
    seconds = [order[1] for order in orders if order[0] == 0]
    assert all(0.4 <= seconds.count(i) / len(seconds) <= 0.6 for i in (1, 2))
    # and a key preferring 1 or 2 keeps its server when 0 is left out of the list
    rest = [names[1], names[2]]
    assert all(rest[shard_index(shard, rest)] == names[order[0]]
               for shard, order in zip(shards, orders, strict=True) if order[0] != 0)


def _reserve_and_vanish(results: Any, backend: BeanstalkBackend) -> None:
    results.put([job.body for job in backend.queue.reserve_many(1, 2)])
    results.close()
    results.join_thread()  # the result is sent; now vanish
    os._exit(0)  # no ack, no close: only the process's own connection ending returns the job


@pytest.mark.filterwarnings(FORK_WITH_THREADS)
def test_a_forked_child_uses_connections_of_its_own(backend: BeanstalkBackend) -> None:
    # Given a parent whose connection to beanstalkd is open
    backend.queue.put_many([Put("a", b"job", 600)])
    [reserved] = backend.queue.reserve_many(1, 1)
    backend.queue.release(reserved.handle, 0)
    # When a forked child reserves the job with the same backend object, then dies
    assert in_processes(FORK, _reserve_and_vanish, 1, backend) == [[b"job"]]
    # Then the job is ready again at once (had the child used the parent's
    # connection, it would stay reserved for its 600 s time-to-run)
    assert eventually(lambda: backend.queue.stats().ready == 1, within=3)


def test_queue_reconnects_after_beanstalkd_restarts(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], tmp_path: Path,
) -> None:
    with Beanstalkd(tmp_path) as server:
        backend = make_backend({**env, "PACKMULE_BEANSTALKD": server.address})
        backend.queue.put_many([Put("a", b"kept in the binlog", 60)])
        server.restart(kill=True)
        with contextlib.suppress(BackendUnavailable):  # the call that finds the connection dead
            backend.queue.stats()
        assert backend.queue.stats().ready == 1


def test_unreachable_beanstalkd_names_the_server_and_the_variable(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    address = f"127.0.0.1:{free_port()}"
    backend = make_backend({**env, "PACKMULE_BEANSTALKD": address})
    with pytest.raises(BackendUnavailable, match=rf"beanstalkd at {address}.*PACKMULE_BEANSTALKD"):
        backend.queue.put_many([Put("a", b"job", 60)])


# --- store --------------------------------------------------------------------------------------
def test_get_many_returns_the_values_set_and_leaves_out_absent_keys(backend: BeanstalkBackend, prefix: str) -> None:
    backend.store.set_many({prefix + "a": b"\x00binary\r\n", prefix + "b": b""}, 60)
    assert backend.store.get_many([prefix + "a", prefix + "b", prefix + "absent"]) == {
        prefix + "a": b"\x00binary\r\n", prefix + "b": b""}


def test_set_many_overwrites(backend: BeanstalkBackend, prefix: str) -> None:
    backend.store.set_many({prefix + "a": b"old"}, 60)
    backend.store.set_many({prefix + "a": b"new"}, 60)
    assert backend.store.get_many([prefix + "a"]) == {prefix + "a": b"new"}


def test_delete_many_removes_keys_and_ignores_absent_ones(backend: BeanstalkBackend, prefix: str) -> None:
    backend.store.set_many({prefix + "a": b"1", prefix + "b": b"2"}, 60)
    backend.store.delete_many([prefix + "a", prefix + "absent"])
    assert backend.store.get_many([prefix + "a", prefix + "b"]) == {prefix + "b": b"2"}


def test_add_many_returns_only_the_keys_it_added(backend: BeanstalkBackend, prefix: str) -> None:
    assert backend.store.add_many({prefix + "a": b"first"}, 60) == {prefix + "a"}
    assert backend.store.add_many({prefix + "a": b"second", prefix + "b": b"new"}, 60) == {prefix + "b"}
    assert backend.store.get_many([prefix + "a"]) == {prefix + "a": b"first"}


def _race_to_add(results: Any, env: dict[str, str], keys: list[str], barrier: Any) -> None:
    backend = BeanstalkBackend.from_env(env)
    try:
        barrier.wait()
        results.put(sorted(backend.store.add_many({key: str(os.getpid()).encode() for key in keys}, 60)))
    finally:
        backend.close()


def test_add_many_has_exactly_one_winner_per_key_among_racing_processes(env: dict[str, str], prefix: str) -> None:
    keys = [f"{prefix}{i}" for i in range(20)]
    won = in_processes(SPAWN, _race_to_add, 8, env, keys, SPAWN.Barrier(8))
    assert sorted(key for keys_won in won for key in keys_won) == sorted(keys)


def test_an_int_added_is_a_counter(backend: BeanstalkBackend, prefix: str) -> None:
    backend.store.add_many({prefix + "n": 5}, 60)
    assert backend.store.incr_many({prefix + "n": 2}) == {prefix + "n": 7}
    assert backend.store.get_many([prefix + "n"]) == {prefix + "n": b"7"}


def _count(results: Any, env: dict[str, str], key: str, times: int) -> None:
    backend = BeanstalkBackend.from_env(env)
    try:
        results.put([backend.store.incr_many({key: 1})[key] for _ in range(times)])
    finally:
        backend.close()


def test_concurrent_incr_many_give_each_count_exactly_once(
    env: dict[str, str], backend: BeanstalkBackend, prefix: str,
) -> None:
    backend.store.add_many({prefix + "n": 0}, 60)
    seen = in_processes(SPAWN, _count, 8, env, prefix + "n", 50)
    assert sorted(n for each in seen for n in each) == list(range(1, 401))


def test_incr_of_a_missing_key_returns_none_and_creates_nothing(backend: BeanstalkBackend, prefix: str) -> None:
    backend.store.add_many({prefix + "there": 1}, 60)
    assert backend.store.incr_many({prefix + "missing": 1, prefix + "there": 1}) == {
        prefix + "missing": None, prefix + "there": 2}
    assert backend.store.get_many([prefix + "missing"]) == {}


def test_keys_memcached_cannot_hold_are_hashed_consistently(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], memcached: Memcached, prefix: str,
) -> None:
    writer, reader = make_backend(env), make_backend(env)
    keys = [prefix + "x" * 300, prefix + "x" * 300 + "y", prefix + "with space", prefix + "ünïcödé",
            "pm#" + prefix]
    writer.store.set_many({key: key.encode() for key in keys}, 60)

    assert reader.store.get_many(keys) == {key: key.encode() for key in keys}
    assert len({memcached_key(key) for key in keys}) == len(keys)
    raw = MemcacheClient(("127.0.0.1", memcached.port))
    try:
        assert raw.get("pm#" + prefix) is None  # stored under its hash, like the others
    finally:
        raw.close()


def test_what_packmule_stores_another_memcached_client_reads_the_same_and_the_other_way(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], memcached: Memcached, prefix: str,
) -> None:
    # (packmule speaks memcached's text protocol itself: pymemcache, a client of its own, checks it)
    backend = make_backend(env)
    ours = {prefix + "big": os.urandom(900_000), prefix + "small": b"s", prefix + "empty": b"",
            prefix + "lines": b"END\r\nSTORED\r\n"}
    theirs = {prefix + "t-big": os.urandom(500_000), prefix + "t-small": b"t", prefix + "n": b"5"}
    backend.store.set_many(ours, 60)
    raw = MemcacheClient(("127.0.0.1", memcached.port))
    try:
        assert raw.get_many(list(ours)) == ours
        assert raw.set_many(theirs, expire=60, noreply=False) == []  # (stored before packmule reads)
        assert backend.store.get_many([*theirs, prefix + "missing"]) == theirs
        assert backend.store.incr_many({prefix + "n": 2}) == {prefix + "n": 7}
        assert raw.get(prefix + "n") == b"7"
        backend.store.delete_many([prefix + "small", prefix + "t-small"])
        assert raw.get_many([prefix + "small", prefix + "t-small"]) == {}
    finally:
        raw.close()


def test_keys_are_spread_over_two_memcached_servers_listed_in_any_order(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
    memcached: Memcached, memcached2: Memcached, prefix: str,
) -> None:
    forward = make_backend({**env, "PACKMULE_MEMCACHED": f"{memcached.address},{memcached2.address}"})
    backward = make_backend({**env, "PACKMULE_MEMCACHED": f"{memcached2.address},{memcached.address}"})
    items = {f"{prefix}{i}": b"%d" % i for i in range(40)}
    forward.store.set_many(items, 60)

    assert backward.store.get_many(list(items)) == items
    for server in (memcached, memcached2):
        raw = MemcacheClient(("127.0.0.1", server.port))
        try:
            assert 0 < len(raw.get_many(list(items))) < len(items)
        finally:
            raw.close()


def test_ttl_below_a_second_is_rounded_up_not_down_to_never(backend: BeanstalkBackend, prefix: str) -> None:
    backend.store.set_many({prefix + "a": b"brief"}, 0.5)
    assert backend.store.get_many([prefix + "a"]) == {prefix + "a": b"brief"}
    assert eventually(lambda: backend.store.get_many([prefix + "a"]) == {}, within=3)


def test_the_session_states_locks_compare_are_kazoos_own() -> None:
    # (locks.py names them itself, so that a worker that takes no lock never imports kazoo)
    from kazoo.protocol.states import KazooState

    assert (CONNECTED, SUSPENDED, LOST) == (KazooState.CONNECTED, KazooState.SUSPENDED, KazooState.LOST)


def test_a_worker_process_that_takes_no_lock_imports_no_kazoo_and_loads_no_openssl(env: dict[str, str]) -> None:
    # (a backend made, a value signed, stored, read and checked, the queue asked: what a worker's jobs do;
    # OpenSSL's start-up costs each worker process about 3.6 MiB, packmule._core.digests)
    code = ("import os, sys, packmule._worker.serve, packmule.backends.beanstalk as b; "
            "from packmule._transport.codec import signer_for; "
            "be = b.BeanstalkBackend.from_env(os.environ); s = signer_for(be); "
            "be.store.set_many({'k': s.dumps(['v'] * 10)}, 60); "
            "assert s.loads(be.store.get_many(['k'])['k']) == ['v'] * 10; be.queue.stats(); "
            "maps = open('/proc/self/maps').read(); "
            "print(sorted(m for m in sys.modules if m.startswith('kazoo') or m in ('ssl', '_ssl', '_hashlib')), "
            "[lib for lib in ('libcrypto', 'libssl') if lib in maps])")
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[] []"


def test_hmac_sha256_without_openssl_is_hmac_s_for_every_key_and_payload_size() -> None:
    import hmac

    from packmule._core.digests import LARGE, HmacSha256

    # RFC 4231, test case 2 (a short key), and keys shorter than, as long as and longer than a block
    assert HmacSha256(b"Jefe").digest(b"what do ya want for nothing?").hex() == (
        "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843")
    for key in (b"k", b"k" * 64, b"k" * 65, os.urandom(200)):
        mac = HmacSha256(key)
        for size in (0, 1, 63, 64, 65, 1000, LARGE - 1, LARGE, LARGE + 1, 3 * LARGE):
            payload = os.urandom(size)
            assert mac.digest(payload) == hmac.new(key, payload, "sha256").digest(), (len(key), size)


def test_expiry_rounds_up_and_is_at_most_30_days() -> None:
    assert [expiry(t) for t in (0.001, 1, 1.5, 0, 1e9)] == [1, 1, 2, MAX_TTL, MAX_TTL]
    with pytest.raises(ValueError):
        expiry(-1)


def test_a_value_larger_than_memcached_takes_is_refused_naming_the_fix(
    backend: BeanstalkBackend, prefix: str,
) -> None:
    with pytest.raises(ValueError, match=r"2097152 bytes.*-I"):
        backend.store.set_many({prefix + "big": b"x" * (2 << 20)}, 60)
    backend.store.set_many({prefix + "small": b"fine"}, 60)  # the connection is still good


@pytest.fixture(params=[65536, 5])
def cut_reads(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> int:
    """The most the store reads of memcached's answers at once: 5 cuts every answer between reads."""
    monkeypatch.setattr(beanstalk._memcached, "RECV_BYTES", request.param)
    return int(request.param)


def test_add_many_of_thousands_of_keys_tells_each_key_whether_it_was_added(
    backend: BeanstalkBackend, prefix: str, cut_reads: int,
) -> None:
    # (answers read 5 bytes at a time: every answer is cut between two reads)
    # Given every third of 30,000 keys already stored (the answers come back in many reads,
    # and the keys in between must not be mistaken for each other)
    keys = [f"{prefix}many/{i}" for i in range(30_000)]
    taken = keys[::3]
    assert backend.store.add_many(dict.fromkeys(taken, b"old"), 60) == set(taken)
    # When all of them are added, a value each
    added = backend.store.add_many({k: b"new %d" % i for i, k in enumerate(keys)}, 60)
    # Then exactly the keys not stored before were added, and those kept their values
    assert added == set(keys) - set(taken)
    got = backend.store.get_many(keys)
    assert all(got[k] == (b"old" if i % 3 == 0 else b"new %d" % i) for i, k in enumerate(keys))


def test_values_and_counts_come_back_whole_however_the_answers_are_cut(
    backend: BeanstalkBackend, prefix: str, cut_reads: int,
) -> None:
    # Given a value of 900 KB beside a small one and a counter
    big = os.urandom(900_000)
    backend.store.set_many({prefix + "big": big, prefix + "small": b"s", prefix + "n": 5}, 60)
    # Then a get gives back each stored value whole, and nothing for a missing key
    assert backend.store.get_many([prefix + "big", prefix + "missing", prefix + "small"]) == {
        prefix + "big": big, prefix + "small": b"s"}
    # and counts rise, with None for a counter that is not there
    assert backend.store.incr_many({prefix + "n": 3, prefix + "none": 1}) == {prefix + "n": 8, prefix + "none": None}
    # and a count of a value that is no number is refused, the connection still good after it
    with pytest.raises(ValueError, match="refused a command"):
        backend.store.incr_many({prefix + "small": 1})
    assert backend.store.get_many([prefix + "n"]) == {prefix + "n": b"8"}


def test_values_that_look_like_memcached_answers_come_back_as_stored(
    backend: BeanstalkBackend, prefix: str, cut_reads: int,
) -> None:
    # Given values made of the protocol's own words and line ends (a value is read by its length, not its text)
    tricky = {prefix + "end": b"x\r\nEND\r\n", prefix + "value": b"VALUE k 0 3\r\nabc\r\n", prefix + "empty": b"",
              prefix + "crlf": b"\r\n" * 1000}
    backend.store.set_many(tricky, 60)
    # Then each comes back whole, among missing keys
    assert backend.store.get_many([prefix + "missing", *tricky, prefix + "missing2"]) == tricky


def test_delete_many_of_thousands_of_keys_deletes_them_all_and_ignores_missing_ones(
    backend: BeanstalkBackend, prefix: str, cut_reads: int,
) -> None:
    keys = [f"{prefix}del/{i}" for i in range(20_000)]
    backend.store.set_many(dict.fromkeys(keys[::2], b"v"), 60)  # (every other key is not there)
    backend.store.delete_many(keys)
    assert backend.store.get_many(keys) == {}
    backend.store.set_many({prefix + "after": b"ok"}, 60)  # the connection is still good
    assert backend.store.get_many([prefix + "after"]) == {prefix + "after": b"ok"}


@pytest.mark.parametrize(("call", "answer"), [
    ("add", b"STORED\r\n"),  # one add answered of three
    ("get", b"VALUE a 0 10\r\n12345"),  # half a value
    ("get", b"VALUE a 0 3\r\nabc\r\nVAL"),  # half the next value's line
    ("get", b"SERVER_ERROR out of memory\r\n"),
    ("delete", b"DELETED\r\n"),  # one delete answered of three
])
def test_a_memcached_that_breaks_off_its_answers_is_unavailable(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], call: str, answer: bytes,
) -> None:
    # Given a server on loopback that answers the start of what it was asked, then closes the connection
    import socket

    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.recv(65536)
            conn.sendall(answer)
    threading.Thread(target=serve, daemon=True).start()
    backend = make_backend({**env, "PACKMULE_MEMCACHED": f"127.0.0.1:{port}"})
    # When three keys are added, read or deleted, Then the call fails naming the server, and does not wait for more
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=f"memcached at 127.0.0.1:{port}"):
        if call == "add":
            backend.store.add_many({"a": b"1", "b": b"2", "c": b"3"}, 60)
        elif call == "get":
            backend.store.get_many(["a", "b", "c"])
        else:
            backend.store.delete_many(["a", "b", "c"])
    assert time.monotonic() - started < 5
    listener.close()


def test_store_reconnects_after_memcached_restarts(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], prefix: str,
) -> None:
    with Memcached() as server:
        backend = make_backend({**env, "PACKMULE_MEMCACHED": server.address})
        backend.store.set_many({prefix + "a": b"lost in the restart"}, 60)
        server.restart()
        with contextlib.suppress(BackendUnavailable):  # the call that finds the connection dead
            backend.store.get_many([prefix + "a"])
        assert backend.store.get_many([prefix + "a"]) == {}


def test_unreachable_memcached_names_the_server_and_the_variable(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    address = f"127.0.0.1:{free_port()}"
    backend = make_backend({**env, "PACKMULE_MEMCACHED": address})
    with pytest.raises(BackendUnavailable, match=rf"memcached at {address}.*PACKMULE_MEMCACHED"):
        backend.store.get_many(["a"])


# --- locks --------------------------------------------------------------------------------------
def _hold_in_turn(results: Any, env: dict[str, str], name: str, barrier: Any) -> None:
    backend = BeanstalkBackend.from_env(env)
    spans = []
    try:
        barrier.wait()
        for _ in range(5):
            with backend.lock(name, 30):
                entered = time.time()
                time.sleep(0.02)
                spans.append((entered, time.time()))
        results.put(spans)
    finally:
        backend.close()


def zookeeper_connections(zookeeper: ZooKeeper) -> int:
    found = re.search(r"Connections: (\d+)", zookeeper_srvr(zookeeper.port))
    assert found, "ZooKeeper's srvr gave no connection count"
    return int(found.group(1))


def test_many_threads_holding_locks_at_once_leave_few_zookeeper_sessions_open(
        backend: BeanstalkBackend, zookeeper: ZooKeeper) -> None:
    # Given 24 threads of one process that each hold a lock at the same moment
    before = zookeeper_connections(zookeeper)
    together = threading.Barrier(24)

    def hold(i: int) -> None:
        with backend.lock(f"at-once-{i}", 10):
            together.wait(10)

    threads = [threading.Thread(target=hold, args=(i,)) for i in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    # Then once they are done, the process keeps at most MAX_IDLE sessions of them open (not 24)
    assert eventually(lambda: zookeeper_connections(zookeeper) - before <= MAX_IDLE, within=10), (
        f"{zookeeper_connections(zookeeper) - before} ZooKeeper sessions left open by 24 threads")
    # And the locks still exclude and are taken again at once
    with backend.lock("at-once-0", 1), pytest.raises(TimeoutError), backend.lock("at-once-0", 0.2):
        pass


def test_lock_excludes_other_processes(env: dict[str, str]) -> None:
    spans = sorted(s for each in in_processes(SPAWN, _hold_in_turn, 4, env, "mutex", SPAWN.Barrier(4))
                   for s in each)
    assert len(spans) == 20
    assert all(later[0] >= earlier[1] for earlier, later in itertools.pairwise(spans))


def _hold_forever(results: Any, env: dict[str, str], name: str) -> None:
    backend = BeanstalkBackend.from_env(env)
    with backend.lock(name, 30):
        results.put("holding")
        time.sleep(600)


def test_lock_is_freed_when_its_holder_is_killed(
    env: dict[str, str], backend: BeanstalkBackend,
) -> None:
    results = SPAWN.Queue()
    holder = SPAWN.Process(target=_hold_forever, args=(results, env, "orphan"))
    holder.start()
    try:
        assert results.get(timeout=60) == "holding"
        with pytest.raises(TimeoutError), backend.lock("orphan", 0.5):
            pass
        os.kill(holder.pid, signal.SIGKILL)  # type: ignore[arg-type]
        killed = time.monotonic()
        with backend.lock("orphan", 20):
            assert time.monotonic() - killed < 10  # the 4 s session timeout, and some slack
    finally:
        holder.kill()
        holder.join()
        results.close()
        results.join_thread()


def test_lock_timeout_raises_timeout_error(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    holder, waiter = make_backend(env), make_backend(env)
    with holder.lock("busy", None):
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="busy"), waiter.lock("busy", 0.3):
            pass
        assert time.monotonic() - started < 3
    with waiter.lock("busy", 5):
        pass  # free again once its holder left the block


def test_when_zookeeper_stays_away_waiter_and_holder_get_backend_unavailable(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend], tmp_path: Path,
) -> None:
    with ZooKeeper(tmp_path) as server:
        settings = {**env, "PACKMULE_ZOOKEEPER": server.address}
        holder, waiter = make_backend(settings), make_backend(settings)
        outcome: list[BaseException] = []

        def wait_forever() -> None:
            try:
                with waiter.lock("held", None):
                    pass
            except BaseException as exc:
                outcome.append(exc)

        # Given a holder, and a waiter that would wait forever
        with pytest.raises(BackendUnavailable, match="PACKMULE_ZOOKEEPER"), holder.lock("held", None):
            thread = threading.Thread(target=wait_forever)
            thread.start()
            time.sleep(0.5)
            # When ZooKeeper goes away for longer than the session timeout
            server.kill()
            thread.join(20)  # the 4 s session timeout, and some slack
        # Then the waiter gives up, and so does the holder leaving its block (its lock is lost)
        assert not thread.is_alive()
        assert isinstance(outcome[0], BackendUnavailable)
        assert f"ZooKeeper at {server.address}" in str(outcome[0])


def test_lock_names_that_are_not_znode_names_are_distinct_locks(backend: BeanstalkBackend) -> None:
    with backend.lock("a/b", 1), backend.lock("a", 1), backend.lock("..", 1), backend.lock(".", 1):
        pass


def _lock_after_fork(results: Any, backend: BeanstalkBackend) -> None:
    outcome = []
    try:
        with backend.lock("parents", 0.3):
            outcome.append("got the parent's lock")
    except TimeoutError:
        outcome.append("waited")
    with backend.lock("childs", 5):
        outcome.append("own lock")
    results.put(outcome)


@pytest.mark.filterwarnings(FORK_WITH_THREADS)
def test_a_forked_child_has_a_zookeeper_session_of_its_own(backend: BeanstalkBackend) -> None:
    with backend.lock("parents", 5):
        assert in_processes(FORK, _lock_after_fork, 1, backend) == [["waited", "own lock"]]


def test_unreachable_zookeeper_names_the_server_and_the_variable(
    env: dict[str, str], make_backend: Callable[..., BeanstalkBackend],
) -> None:
    address = f"127.0.0.1:{free_port()}"
    backend = make_backend({**env, "PACKMULE_ZOOKEEPER": address}, connect_timeout=1.0)
    with pytest.raises(BackendUnavailable, match=rf"ZooKeeper at {address}.*PACKMULE_ZOOKEEPER"), \
            backend.lock("x", 1):
        pass


# --- configuration -------------------------------------------------------------------------------
def test_a_missing_secret_is_refused_saying_what_to_set() -> None:
    with pytest.raises(ValueError, match=r"PACKMULE_SECRET.*PACKMULE_INSECURE=1"):
        BeanstalkBackend.from_env({})


def test_the_secret_is_the_utf8_of_the_variable() -> None:
    backend = BeanstalkBackend.from_env({"PACKMULE_SECRET": "sésame"})
    assert backend.secret() == "sésame".encode()


def test_insecure_without_a_secret_uses_a_well_known_key_and_warns(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(beanstalk, "_warned_insecure", False)
    with caplog.at_level(logging.WARNING, logger="packmule"):
        first = BeanstalkBackend.from_env({"PACKMULE_INSECURE": "1"})
        second = BeanstalkBackend.from_env({"PACKMULE_INSECURE": "1"})
    assert first.secret() == second.secret() == beanstalk.INSECURE_SECRET
    assert [r.message for r in caplog.records].count(caplog.records[0].message) == 1
    assert "PACKMULE_INSECURE" in caplog.records[0].message


def test_a_tube_name_beanstalkd_refuses_is_refused_naming_the_variable() -> None:
    with pytest.raises(ValueError, match="PACKMULE_TUBE"):
        BeanstalkBackend.from_env({"PACKMULE_SECRET": "s", "PACKMULE_TUBE": "no spaces"})


def test_an_unset_variable_is_named_with_its_default() -> None:
    servers = Servers.from_env({}, "PACKMULE_BEANSTALKD", "127.0.0.1:11300")
    message = str(servers.unavailable("beanstalkd", "127.0.0.1:11300", ConnectionRefusedError(111, "refused")))
    assert "PACKMULE_BEANSTALKD is not set; 127.0.0.1:11300 is its default" in message
