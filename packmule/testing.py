"""``packmule.testing``: a pytest plugin for testing runners on the real engine.

Installing packmule registers it (the ``pytest11`` entry point
``packmule-testing``); a test that does not ask for its fixture sees nothing of
it but the ``packmule`` marker being known.

``packmule_backend`` (the fixture) gives its test a local backend of its own: a
coordinator and worker processes started for it (``@pytest.mark.packmule(workers=1)``;
default ``DEFAULT_WORKERS``), an empty store, a secret of its own.  While the
test runs, every ``packmule.Runner`` that is given no backend (or ``"local"``)
uses it, and the delays packmule picks itself (retry backoff, polls) are scaled
by ``delay_scale`` (default ``DEFAULT_DELAY_SCALE``; ``PACKMULE_DELAY_SCALE``
in ``packmule._core.config``), so a retried job does not make the test wait.  At
teardown its processes are killed at once, by PID: nothing of the test is left
for the next one, and nothing keeps the pytest process from exiting.

The fixture's value, a :class:`BackendFixture`, offers ``join(timeout)`` (wait
until the test's runs are finished; raise the first job that failed for good as
soon as it does), ``attempts(ref)`` (how many times a job ran) and ``failures()``.  While the test
runs, what its module defines (its runners) is pickled by value, so workers
never import the test module.

On a real cluster: with ``PACKMULE_BACKEND`` naming another backend (say
``beanstalk``), the fixture starts nothing and steps aside.  Runners use that
backend; ``join``, ``attempts`` and ``failures`` work the same through it; the
delays are not scaled (the workers are not the test's); and at teardown the runs
the test queued are forgotten, so the next test that uses the same names starts
afresh.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from typing import Any

import cloudpickle
import pytest

from packmule._core import config as _config
from packmule._core.errors import JobFailed
from packmule._core.types import JobRef, Progress
from packmule._driver import enqueue as _enqueue
from packmule._driver.runner import Runner
from packmule._model.keys import job_id, prefix
from packmule._model.records import records
from packmule._transport.codec import signer_for
from packmule._transport.spill import gather
from packmule.backends import _choice
from packmule.backends.base import Backend

DEFAULT_WORKERS = 2  # worker processes of a test's backend: enough for parallelism, quick to start
DEFAULT_DELAY_SCALE = 0.001  # a 1 s retry_delay becomes 1 ms, a continuation's 0.25 s re-check 0.25 ms
DEFAULT_JOIN_TIMEOUT = 10.0  # s
JOIN_POLL_MIN, JOIN_POLL_MAX = 0.001, 0.01  # s between two looks of join
MAX_FAILURES_READ = 1000  # failure records join and failures() read per run
MARKER_OPTIONS = ("workers", "delay_scale")
SUCCEEDED = ("ok", "ref", "gone")  # value records of a job whose method returned


class BackendFixture:
    """The backend of one test, and what a test asks of it.

    ``backend`` is the Backend every Runner of the test uses; ``local`` says
    whether the fixture started it (False: it stepped aside for the backend
    ``PACKMULE_BACKEND`` names)."""

    def __init__(self, backend: Backend, scope: _choice.Scope, local: bool) -> None:
        self.backend, self._scope, self.local = backend, scope, local

    def __repr__(self) -> str:
        return f"<packmule test backend {self.backend.name!r}{' (own processes)' if self.local else ''}>"

    @property
    def runs(self) -> list[str]:
        """Names of the runs this test's process queued jobs into, in the order they started."""
        return list(dict.fromkeys(name for name, _ in self._scope.runs))

    def worker_pids(self) -> list[int]:
        """PIDs of the test's worker processes (empty when the fixture stepped aside)."""
        pids: list[int] = getattr(self.backend, "worker_pids", list)() if self.local else []
        return pids

    # --- waiting ---------------------------------------------------------------
    def join(self, timeout: float = DEFAULT_JOIN_TIMEOUT, *, raise_failures: bool = True) -> None:
        """Wait until nothing of the test's runs is queued or running: each run
        it queued jobs into is complete (or cancelled or forgotten), and, on the
        test's own backend, its queue is empty.  Raises, as soon as one exists,
        the first job failure for good (``JobFailed``: the job's method,
        arguments, exception and remote traceback; the first run's first), unless
        ``raise_failures`` is false; ``TimeoutError`` after ``timeout`` seconds,
        saying what is still running."""
        __tracebackhide__ = True  # pytest shows the test's line and the job's traceback, not this loop
        deadline = time.monotonic() + timeout
        delay = JOIN_POLL_MIN
        while True:
            pending, failed = self._look()
            if failed and raise_failures:
                failure = self._first_failure(failed)
                if failure is not None:
                    raise failure
            if not pending:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"packmule_backend.join: waited {timeout:g}s; still running: "
                                   + "; ".join(pending))
            time.sleep(delay)
            delay = min(delay * 2, JOIN_POLL_MAX)

    def failures(self) -> list[JobFailed]:
        """Every job of the test's runs that failed for good so far, run by run,
        in the order they failed."""
        return self._failures(self._look()[1], first_only=False)

    def attempts(self, ref: JobRef) -> int:
        """How many times ``ref``'s method ran to an end so far: the attempts that
        raised, plus one if it returned.  A job that fails twice, then
        succeeds: 3."""
        if not isinstance(ref, JobRef):
            raise TypeError(f"attempts takes a JobRef, not {type(ref).__name__}")
        name, gen, path = ref.parts
        p = prefix(name, gen)
        tries_key, value_key = p + "try:" + path, p + "v:" + path
        store = self.backend.store
        got = store.get_many([tries_key, value_key])
        raised = int(got.get(tries_key) or 0)
        value = gather(store, signer_for(self.backend), {value_key: got[value_key]}) if value_key in got else {}
        returned = bool(value) and signer_for(self.backend).loads(value[value_key])[0] in SUCCEEDED
        return raised + returned

    def _look(self) -> tuple[list[str], list[tuple[str, str, int]]]:
        """One look at the test's runs: what still runs (a line each), and the
        runs with failures ((name, generation, how many))."""
        runs = list(self._scope.runs)
        keys = [prefix(name, gen) + k for name, gen in runs for k in ("total", "done", "failed", "cancel")]
        got = self.backend.store.get_many(keys) if keys else {}
        pending, failed = [], []
        for name, gen in runs:
            p = prefix(name, gen)
            if p + "total" not in got or p + "done" not in got:
                continue  # forgotten: nothing of it counts any more
            progress = Progress(int(got[p + "done"]), int(got[p + "total"]), int(got.get(p + "failed") or 0))
            if progress.failed:
                failed.append((name, gen, progress.failed))
            if progress.done < progress.total and p + "cancel" not in got:
                pending.append(f"run {name!r} at {progress}")
        if self.local:
            stats = self.backend.queue.stats()
            if stats.ready or stats.reserved or stats.delayed:
                pending.append(f"queue: {stats.ready} ready, {stats.reserved} running, {stats.delayed} delayed")
        return pending, failed

    def _first_failure(self, failed: list[tuple[str, str, int]]) -> JobFailed | None:
        found = self._failures(failed, first_only=True)
        return found[0] if found else None

    def _failures(self, failed: list[tuple[str, str, int]], first_only: bool) -> list[JobFailed]:
        """The failure records of these runs (``P f:<k>`` names the k-th failed
        job's path; a record a commit is still writing is left for the next look)."""
        out = []
        store, signer = self.backend.store, signer_for(self.backend)
        for name, gen, count in failed:
            p = prefix(name, gen)
            keys = [f"{p}f:{k}" for k in range(1, min(count, MAX_FAILURES_READ) + 1)]
            got = store.get_many(keys)
            ids = [job_id(name, gen, got[k].decode()) for k in keys if k in got]
            recs = records(store, signer, ids)
            for ref_id in ids:
                rec = recs.get(ref_id)
                if rec is not None and rec[0] == "err":
                    out.append(JobFailed(rec[1]))
                    if first_only:
                        return out
        return out


class _Options:
    """The ``packmule`` marker's keywords, checked."""

    def __init__(self, marker: pytest.Mark | None) -> None:
        kwargs: dict[str, Any] = dict(marker.kwargs) if marker is not None else {}
        if marker is not None and marker.args:
            raise pytest.UsageError(f"@pytest.mark.packmule takes keywords only ({', '.join(MARKER_OPTIONS)})")
        unknown = sorted(set(kwargs) - set(MARKER_OPTIONS))
        if unknown:
            raise pytest.UsageError(f"@pytest.mark.packmule: unknown option(s) {', '.join(unknown)}; "
                                    f"it takes {', '.join(MARKER_OPTIONS)}")
        self.workers = kwargs.get("workers", DEFAULT_WORKERS)
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or self.workers < 1:
            raise pytest.UsageError(f"@pytest.mark.packmule(workers={self.workers!r}): give a whole number >= 1")
        self.delay_scale = kwargs.get("delay_scale", DEFAULT_DELAY_SCALE)
        if (isinstance(self.delay_scale, bool) or not isinstance(self.delay_scale, (int, float))
                or not 0 <= self.delay_scale <= 1):
            raise pytest.UsageError(f"@pytest.mark.packmule(delay_scale={self.delay_scale!r}): give a factor "
                                    "from 0 to 1 (1: the delays as documented)")


def steps_aside(env: dict[str, str] | os._Environ[str] | None = None) -> bool:
    """Whether the fixture leaves the backend to ``PACKMULE_BACKEND`` (it names one other than local)."""
    env = os.environ if env is None else env
    return env.get("PACKMULE_BACKEND", _choice.DEFAULT_BACKEND) not in ("", "local")


def backend_for_test(workers: int = DEFAULT_WORKERS,
                     delay_scale: float = DEFAULT_DELAY_SCALE) -> _BackendForTest:
    """What the fixture does, for use outside pytest (``with backend_for_test() as b:``)."""
    return _BackendForTest(workers, delay_scale)


class _BackendForTest:
    """Start a test's backend (or step aside), make it current, and undo it all."""

    def __init__(self, workers: int, delay_scale: float) -> None:
        self.workers, self.delay_scale = workers, delay_scale

    def __enter__(self) -> BackendFixture:
        from packmule.backends import (
            local,  # (here: 10 ms of every pytest session, -X importtime; only a test's own backend needs it)
        )

        scope = _choice.Scope(None)
        if steps_aside():
            self.local, self.backend = False, _choice.get_backend()
        else:
            # the variables the test's backend sets for its workers (and jobs' subprocesses)
            watched = (local.ADDRESS_VAR, local.SECRET_VAR, _config.DELAY_SCALE_VAR)
            self.saved = {var: os.environ.get(var) for var in watched}
            os.environ[_config.DELAY_SCALE_VAR] = repr(float(self.delay_scale))
            backend = None
            try:
                backend = local.LocalBackend(self.workers)
                self.local, self.backend = True, backend
                backend.ensure_workers()  # they start while the test sets up (a framework's hook may refuse)
            except BaseException:
                if backend is not None:
                    backend.close(grace=0)
                self._restore_env()
                raise
            scope.backend = self.backend
        self.scope = scope
        self.previous = _choice.set_scope(scope)
        return BackendFixture(self.backend, scope, self.local)

    def __exit__(self, *exc: object) -> None:
        _choice.set_scope(self.previous)
        if not self.local:
            for name in dict.fromkeys(name for name, _ in self.scope.runs):
                Runner(name, backend=self.backend).forget()  # the next test of that name starts afresh
            return
        from packmule.backends.local import LocalBackend  # (as above)

        assert isinstance(self.backend, LocalBackend)
        try:
            self.backend.close(grace=0)
        finally:
            store = id(self.backend.store)  # (what this process stored there is gone with it)
            _enqueue._stored_blobs.difference_update({key for key in _enqueue._stored_blobs if key[0] == store})
            self._restore_env()

    def _restore_env(self) -> None:
        for var, value in self.saved.items():
            if value is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = value


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "packmule(workers=2, delay_scale=0.001): options of the packmule_backend fixture's backend "
                   "(worker processes; factor on retry backoff and poll delays)")


@pytest.fixture
def packmule_backend(request: pytest.FixtureRequest) -> Iterator[BackendFixture]:
    """A local backend of the test's own (fresh processes, empty state, its own
    secret) that every Runner of the test uses; killed at teardown.  With
    ``PACKMULE_BACKEND`` naming another backend, that one (see the module)."""
    options = _Options(request.node.get_closest_marker("packmule"))
    with backend_for_test(options.workers, options.delay_scale) as fixture, _by_value(request):
        yield fixture


@contextlib.contextmanager
def _by_value(request: pytest.FixtureRequest) -> Iterator[None]:
    """Runners (and all else) defined in the test's module travel by value while
    the test runs: workers need not import the test module (and with it pytest,
    a tenth of a second per worker), nor be able to."""
    module = getattr(request, "module", None)
    name = getattr(module, "__name__", "__main__")
    registered: set[str] = getattr(cloudpickle.cloudpickle, "_PICKLE_BY_VALUE_MODULES", set())
    if name == "__main__" or name in registered:  # (by value already)
        yield
        return
    cloudpickle.register_pickle_by_value(module)
    try:
        yield
    finally:
        cloudpickle.unregister_pickle_by_value(module)
