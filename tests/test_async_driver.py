"""The awaitable calls of ``Runner`` (issue 20: async callers), on the local
backend and on a real beanstalk cluster: each gives the answer of its blocking
form, ``await_result`` raises what ``wait`` raises, and a thousand waits at once
on one event loop hold no thread each and leave the loop's other tasks running
(their lag is measured by ``benchmarks/bench_async_waits.py``)."""

from __future__ import annotations

import asyncio
import os
import re
import threading
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

import packmule
from conformance.harness import Harness, beanstalk_harness, local_harness
from conformance.runners import Flaky, Gated, Timed, Tree

WAIT = 60.0  # s: the longest any wait here may take before the test fails
MANY = 1000  # waits at once on one loop
THREAD_BOUND = 20  # threads of the whole process while they wait
T = TypeVar("T")


@pytest.fixture(scope="module", params=["local", "beanstalk"])
def harness(request: pytest.FixtureRequest) -> Iterator[Harness]:
    factory = local_harness if request.param == "local" else beanstalk_harness
    with factory() as h:
        yield h


@pytest.fixture
def gate(tmp_path: Path) -> Iterator[str]:
    """A file that ``Gated`` jobs wait for: opened at the end, so no job stays held."""
    path = str(tmp_path / "gate")
    yield path
    Path(path).touch()


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def test_a_worker_that_ran_jobs_has_loaded_no_asyncio(harness: Harness) -> None:
    # (the awaitable calls import it at their first use: a worker process, which
    # makes none, is spared its 50 modules and about 4 MiB)
    runner = Tree(backend=harness.backend)
    jobs = runner.enqueue_each("modules_loaded", [["asyncio", "packmule._driver.hub"]] * 4)
    assert runner.deferred_result("collect", jobs) == [[]] * 4


def test_aenqueue_queues_the_job_enqueue_queues(harness: Harness) -> None:
    blocking = Timed(backend=harness.backend)
    ref = blocking.enqueue("echo", 1, "two", k=3, priority=5)
    blocking.wait(timeout=WAIT)

    async def main() -> Any:
        runner = Timed(backend=harness.backend)
        aref = await runner.aenqueue("echo", 1, "two", k=3, priority=5)
        assert isinstance(aref, packmule.JobRef) and aref.id.startswith(f"{runner.name}/")
        await runner.await_result(timeout=WAIT)
        return runner.get_return_value(aref)

    assert run(main()) == blocking.get_return_value(ref) == [[1, "two"], {"k": 3}]


def test_aenqueue_each_and_await_deferred_result_give_the_values_of_their_blocking_forms(harness: Harness) -> None:
    blocking = Tree(backend=harness.backend)
    expected = blocking.deferred_result("collect", blocking.enqueue_each("ident", range(20)))

    async def main() -> Any:
        runner = Tree(backend=harness.backend)
        refs = await runner.aenqueue_each("ident", range(20))
        assert len(refs) == 20
        return await runner.await_deferred_result("collect", refs, timeout=WAIT)

    assert run(main()) == expected == list(range(20))


def test_await_deferred_result_follows_jobrefs_to_their_values(harness: Harness) -> None:
    async def main() -> Any:
        runner = Tree(backend=harness.backend)
        return await runner.await_deferred_result("collect", [await runner.aenqueue("return_child")], timeout=WAIT)

    assert run(main()) == ["child value"]


def test_await_deferred_result_raises_the_failure_deferred_result_raises(harness: Harness) -> None:
    blocking = Flaky(backend=harness.backend)
    with pytest.raises(packmule.JobFailed) as failed:
        blocking.deferred_result("collect", [blocking.enqueue("always", "x")])

    async def main() -> Any:
        runner = Flaky(backend=harness.backend)
        return await runner.await_deferred_result("collect", [await runner.aenqueue("always", "x")], timeout=WAIT)

    with pytest.raises(packmule.JobFailed) as afailed:
        run(main())
    assert afailed.value.exc_type == failed.value.exc_type == "ValueError"
    assert afailed.value.message == failed.value.message


def test_await_result_returns_the_final_progress_wait_returns(harness: Harness) -> None:
    async def main() -> tuple[packmule.Progress, packmule.Progress, Tree]:
        runner = Tree(backend=harness.backend)
        await runner.aenqueue_each("ident", range(5))
        return await runner.await_result(timeout=WAIT), await runner.aupdate_progress(), runner

    progress, read, runner = run(main())
    other = Tree(runner.name, backend=harness.backend)  # (another handle: it finds the run by its name)
    assert progress == read == other.wait(timeout=WAIT) == other.update_progress() == "5.0 / 5.0"
    assert runner.current_progress == progress


def test_await_result_of_a_run_from_another_handle_finds_it_by_name(harness: Harness) -> None:
    runner = Tree(backend=harness.backend)
    runner.enqueue_each("ident", range(3))

    assert run(Tree(runner.name, backend=harness.backend).await_result(timeout=WAIT)) == runner.wait(timeout=WAIT)


def test_aupdate_progress_reads_what_update_progress_reads(harness: Harness, gate: str) -> None:
    runner = Gated(backend=harness.backend)
    runner.enqueue_each("wait_for", range(3), gate)

    assert run(runner.aupdate_progress()) == runner.update_progress() == "0.0 / 3.0"


def test_await_result_of_a_run_without_jobs_raises_not_ready_as_wait_does(harness: Harness) -> None:
    runner = Tree(backend=harness.backend)
    with pytest.raises(packmule.NotReady) as blocking:
        runner.wait(timeout=WAIT)
    with pytest.raises(packmule.NotReady) as awaited:
        run(runner.await_result(timeout=WAIT))
    assert str(awaited.value) == str(blocking.value)


def test_await_result_timeout_raises_timeout_error_naming_the_run(harness: Harness, gate: str) -> None:
    runner = Gated(backend=harness.backend)
    runner.enqueue("wait_for", 0, gate)
    with pytest.raises(TimeoutError) as blocking:
        runner.wait(timeout=0.3)

    started = time.monotonic()
    with pytest.raises(TimeoutError) as awaited:
        run(runner.await_result(timeout=0.3))
    assert time.monotonic() - started < WAIT
    assert str(awaited.value) == str(blocking.value)
    assert re.match(rf"run {re.escape(repr(runner.name))}: waited 0.3s for the run to complete; 0.0 / 1.0",
                    str(awaited.value))


def test_await_deferred_result_timeout_raises_timeout_error_naming_the_run(harness: Harness, gate: str) -> None:
    async def main() -> Any:
        runner = Gated(backend=harness.backend)
        jobs = await runner.aenqueue_each("wait_for", range(2), gate)
        return await runner.await_deferred_result("collect", jobs, timeout=0.3)

    with pytest.raises(TimeoutError, match=r"run '[^']+': waited 0.3s for 2 jobs for await_deferred_result"):
        run(main())


def test_await_result_of_a_cancelled_run_raises_cancelled(harness: Harness, gate: str) -> None:
    async def main(runner: Gated) -> Any:
        await runner.aenqueue_each("wait_for", range(3), gate)
        waiting = asyncio.ensure_future(runner.await_result(timeout=WAIT))
        await asyncio.sleep(0.1)
        await asyncio.to_thread(runner.cancel)
        return await waiting

    runner = Gated(backend=harness.backend)
    with pytest.raises(packmule.Cancelled, match=re.escape(f"run {runner.name!r} was cancelled")):
        run(main(runner))


def test_a_waiting_task_cancelled_by_its_caller_is_let_go(harness: Harness, gate: str) -> None:
    async def main() -> None:
        runner = Gated(backend=harness.backend)
        await runner.aenqueue("wait_for", 0, gate)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(runner.await_result(), 0.2)
        Path(gate).touch()
        assert await runner.await_result(timeout=WAIT) == "1.0 / 1.0"  # (its run is still waited on, anew)

    run(main())


def test_a_thousand_waits_hold_no_thread_each_and_leave_the_loop_running(harness: Harness, gate: str) -> None:
    # Given: a thousand runs of one job each, all held at a closed gate
    runners = [Gated(f"aio-many-{i}-{os.getpid()}-{time.monotonic_ns()}", backend=harness.backend)
               for i in range(MANY)]
    for i, runner in enumerate(runners):
        runner.enqueue("wait_for", i, gate)
    threads: list[int] = []
    ticks = [0]

    async def sample(pending: list[asyncio.Future[packmule.Progress]]) -> None:
        while not all(w.done() for w in pending):
            threads.append(threading.active_count())
            await asyncio.sleep(0.005)

    async def tick(pending: list[asyncio.Future[packmule.Progress]]) -> None:
        while not all(w.done() for w in pending):
            ticks[0] += 1
            await asyncio.sleep(0.01)

    async def main() -> list[packmule.Progress]:
        # When: a thousand tasks await their runs on one loop, the gate opening only after a while
        waits = [asyncio.ensure_future(r.await_result(timeout=WAIT)) for r in runners]
        others = [asyncio.ensure_future(sample(waits)), asyncio.ensure_future(tick(waits))]
        await asyncio.sleep(0.5)
        assert not any(w.done() for w in waits)
        # (the loop's executor is free too: a short call runs while the waits are pending)
        assert await asyncio.wait_for(runners[0].aupdate_progress(), WAIT) == "0.0 / 1.0"
        Path(gate).touch()
        done = await asyncio.gather(*waits)
        await asyncio.gather(*others)
        return done

    results = run(main())
    # Then: every wait completes, the process never held more than a few threads, and the ticker ran meanwhile
    assert results == ["1.0 / 1.0"] * MANY
    assert threads and max(threads) <= THREAD_BOUND, f"threads while waiting: up to {max(threads)}"
    assert ticks[0] > 1


@pytest.fixture(scope="module")
def idle_cluster() -> Iterator[Harness]:
    """A real beanstalk cluster that no worker serves."""
    with beanstalk_harness(concurrency=0) as h:
        yield h


def test_await_result_with_no_worker_raises_no_workers_as_wait_does(idle_cluster: Harness) -> None:
    runner = Gated(backend=idle_cluster.backend)
    runner.enqueue_each("wait_for", range(3), "never-opened")
    with pytest.raises(packmule.NoWorkers, match="packmule worker") as blocking:
        runner.wait(timeout=WAIT)

    started = time.monotonic()
    with pytest.raises(packmule.NoWorkers, match="packmule worker") as awaited:
        run(runner.await_result(timeout=WAIT))
    assert time.monotonic() - started < 15
    assert str(awaited.value).split(" for ")[0] == str(blocking.value).split(" for ")[0]
