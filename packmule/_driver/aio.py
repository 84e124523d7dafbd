"""Awaitable forms of the driver's calls, for async callers: an async view
(Django's, FastAPI's, Starlette's) must never block its event loop on packmule.
``Awaits`` is a mixin of ``Runner``; Django's ``a`` prefix names its calls.

Short calls (an enqueue, one progress read, the last read of a deferred
result's values and the call of its method) run in the loop's default executor
(``asyncio.to_thread``).  A wait holds no thread: it is a ``Watch`` handed to
its backend's ``Hub`` (``hub.py``), one daemon thread per backend that serves
every pending async wait of the process in bulk, with ``wait()``'s checks, and
settles each on its own loop."""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, TypeVar

from packmule._core.types import JobRef, Progress
from packmule._driver.run_state import RunState
from packmule._driver.waiting import Waiter
from packmule._model.keys import value_keys
from packmule._model.records import records
from packmule.backends.base import Backend

if TYPE_CHECKING:
    from packmule._model.job import JobContext

__all__ = ["Awaits"]

T = TypeVar("T")


class Awaits:
    """``Runner``'s awaitable calls (``Runner`` is its only subclass)."""

    if TYPE_CHECKING:  # (what it uses of Runner)
        name: str
        _pm_gen: str | None
        _pm_backend: Backend | None
        _pm_progress: Progress | None

        @property
        def backend(self) -> Backend: ...
        def enqueue(self, method_name: str, *args: Any, delay: float | timedelta | None = None,
                    at: datetime | None = None, priority: int | None = None, **kwargs: Any) -> JobRef: ...
        def enqueue_each(self, method_name: str, items: Iterable[Any], *args: Any,
                         delay: float | timedelta | None = None, at: datetime | None = None,
                         priority: int | None = None, **kwargs: Any) -> list[JobRef]: ...
        def update_progress(self) -> Progress: ...
        def _check_method(self, method_name: str) -> None: ...
        def _job_context(self) -> JobContext | None: ...
        def _wait_values(self, refs: Sequence[JobRef]) -> list[Any]: ...
        def _gen(self) -> str | None: ...
        def _state(self) -> RunState: ...
        def _recount(self, gen: str, quiet: bool = False) -> str | None: ...

    async def aenqueue(self, method_name: str, *args: Any, delay: float | timedelta | None = None,
                       at: datetime | None = None, priority: int | None = None, **kwargs: Any) -> JobRef:
        """``enqueue``, in the loop's default executor."""
        return await _in_thread(functools.partial(self.enqueue, method_name, *args, delay=delay, at=at,
                                                         priority=priority, **kwargs))

    async def aenqueue_each(self, method_name: str, items: Iterable[Any], *args: Any,
                            delay: float | timedelta | None = None, at: datetime | None = None,
                            priority: int | None = None, **kwargs: Any) -> list[JobRef]:
        """``enqueue_each``, in the loop's default executor."""
        return await _in_thread(functools.partial(self.enqueue_each, method_name, items, *args, delay=delay,
                                                         at=at, priority=priority, **kwargs))

    async def aupdate_progress(self) -> Progress:
        """``update_progress``, in the loop's default executor."""
        return await _in_thread(self.update_progress)

    async def await_result(self, timeout: float | None = None) -> Progress:
        """``wait()`` without holding a thread: until the run is complete, its final
        Progress; TimeoutError, Cancelled, NoWorkers, RunStateLost as ``wait``."""
        progress: Progress = await self._watch("the run to complete", timeout, None, time.monotonic())
        self._pm_progress = progress
        return progress

    async def await_deferred_result(self, method_name: str, jobs: Iterable[JobRef], *args: Any,
                                    timeout: float | None = None, **kwargs: Any) -> Any:
        """``deferred_result`` outside a job, without holding a thread while the jobs
        run: once every job has a value (JobRefs followed), the value of
        ``self.method_name(values, *args, **kwargs)``, called in the executor.
        ``timeout``: seconds to wait for the values (TimeoutError)."""
        self._check_method(method_name)
        refs = list(jobs)
        for ref in refs:
            if not isinstance(ref, JobRef):
                raise TypeError(f"await_deferred_result takes a list of JobRef, got {type(ref).__name__}: {ref!r}")
        if self._job_context() is not None:
            raise RuntimeError("await_deferred_result is for callers outside a job; inside a job, return "
                               "deferred_result's JobRef")
        start = time.monotonic()
        ids = [r[0] for r in refs]
        missing = list(dict.fromkeys(value_keys(ids)))
        what = f"{len(missing)} jobs for await_deferred_result"
        while missing:
            await self._watch(what, timeout, missing, start)
            missing = await _in_thread(self._chain_ends, ids)  # (values that are JobRefs: their ends)
        return await _in_thread(self._finish_deferred, refs, method_name, args, kwargs)

    def _chain_ends(self, ids: list[str]) -> list[str]:
        """The value keys still absent at the ends of the ids' JobRef chains."""
        state = self._state()
        missing: list[str] = []
        records(state.store, state.signer, ids, missing=missing)
        return missing

    def _finish_deferred(self, refs: list[JobRef], method_name: str, args: tuple[Any, ...],
                         kwargs: dict[str, Any]) -> Any:
        values = self._wait_values(refs)  # (every value is there: it reads them, and waits for their count)
        self._pm_gen = None  # the next outside enqueue starts (or joins) a run afresh, as deferred_result's
        return getattr(self, method_name)(values, *args, **kwargs)

    async def _watch(self, what: str, timeout: float | None, keys: list[str] | None, start: float) -> Any:
        """Hand a wait to the backend's hub and await what it settles it with."""
        import asyncio

        from packmule._driver.hub import Watch, hub_for

        backend = self._pm_backend if self._pm_backend is not None else await _in_thread(lambda: self.backend)
        loop = asyncio.get_running_loop()
        waiter = Waiter(self, what, timeout)
        waiter.start = start
        watch = Watch(self, waiter, loop, loop.create_future(), keys, len(keys or ()))
        watch.future.add_done_callback(watch.drop)  # (settled, or its caller cancelled: the hub lets it go)
        while not hub_for(backend).add(watch):
            pass  # (that hub was ending: the next call makes another)
        return await watch.future


async def _in_thread(fn: Callable[..., T], *args: Any) -> T:
    """``asyncio.to_thread(fn, *args)``.  (asyncio, about 4 MiB and 50 modules, is imported
    at the first awaitable call: a worker process, which makes none, never loads it.)"""
    import asyncio

    return await asyncio.to_thread(fn, *args)
