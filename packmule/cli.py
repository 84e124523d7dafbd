"""The ``packmule`` command.

    packmule worker [--concurrency N] [--import MODULE ...]   serve the queue on this machine
    packmule status [NAME]                                    a run's progress, failures and queue; the servers
    packmule progress NAME [--watch]                          a run's progress (a live bar with --watch)
    packmule dashboard [--host H] [--port P] [--token T]      the web dashboard (needs packmule[web])
    packmule scheduler --import MODULE ...                    fire the schedules MODULE declares
    packmule schedules --import MODULE ...                    each schedule: next fire, last tick, its run

The backend and its servers come from the PACKMULE_* variables (see README).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import TYPE_CHECKING

from packmule._core import config as _config
from packmule._core.errors import PackMuleError
from packmule._worker import supervisor as _supervisor

if TYPE_CHECKING:
    from packmule._driver.runner import Runner
    from packmule.backends.base import Backend, QueueStats

# The commands import the driver and the backends in their functions, not here: `packmule worker` runs as the
# supervisor of its worker processes, which only starts and watches them, and loading the driver with this
# module cost that process about 8 MiB (benchmarks/bench_memory.py).


def status(name: str | None) -> int:
    """Print the run ``name``'s state (if named), then each server's; 1 if the run could not be read."""
    from packmule._driver.runner import Runner  # (here: see above)
    from packmule._model.keys import check_name  # (here: see above)
    from packmule.backends import _choice  # (here: see above)

    backend = _choice.get_backend()
    code = 0
    try:
        if name is not None:
            _run_status(Runner(check_name(name), backend=backend))
        else:
            _queue_status(backend)
    except PackMuleError as exc:  # (a server of the run's is down: the servers below say which)
        print(f"packmule status: {exc}", file=sys.stderr, flush=True)
        code = 1
    _server_status(backend)
    return code


def _queue_status(backend: Backend, stats: QueueStats | None = None) -> None:
    stats = stats if stats is not None else backend.queue.stats()
    print(f"queue ({backend.name}): ready {stats.ready}, running {stats.reserved}, "
          f"delayed {stats.delayed}, buried {stats.buried}, workers {stats.workers}")


def _server_status(backend: Backend) -> None:
    """One line per server: service, address, state (up, aside since when: why, back since when), role."""
    states = backend.server_states()
    if not states:
        print(f"servers ({backend.name}): none to watch")
        return
    now = time.time()
    print(f"servers ({backend.name}):")
    width = max(len(s.service) for s in states), max(len(s.server) for s in states)
    for s in states:
        if s.state == "up":
            state = "up" + (f", {s.role}" if s.role else "")
            if s.back is not None:
                state += f", back since {_when(s.back, now)}"
        else:
            state = f"{s.state} since {_when(s.since, now)}" + (f": {s.problem}" if s.problem else "")
        print(f"  {s.service:<{width[0]}}  {s.server:<{width[1]}}  {state}")


def _when(t: float | None, now: float) -> str:
    """``t`` as local time and how long before ``now``: '14:03:05 (2m05s ago)'."""
    if t is None:
        return "(unknown)"
    ago = max(0, round(now - t))
    span = (f"{ago}s" if ago < 60 else f"{ago // 60}m{ago % 60:02d}s" if ago < 3600
            else f"{ago // 3600}h{ago % 3600 // 60:02d}m")
    day = "%H:%M:%S" if now - t < 86400 else "%Y-%m-%d %H:%M:%S"
    return f"{time.strftime(day, time.localtime(t))} ({span} ago)"


def _run_status(runner: Runner) -> None:
    from packmule._model.keys import job_id, prefix  # (here: see the top)
    from packmule._model.records import records  # (here: see the top)
    from packmule._transport.codec import signer_for  # (here: see the top)

    name = runner.name
    state = runner._state()
    gen = state.current_gen()
    if gen is None:
        print(f"run {name}: no jobs (0.0 / 0.0)")
        _queue_status(runner.backend)
        return
    progress = state.progress(gen)
    assert progress is not None
    stats = runner.backend.queue.stats()
    flags = []
    if state.cancelled(gen):
        flags.append("cancelled")
    if progress.complete:
        flags.append("complete")
    elif not (stats.ready or stats.reserved or stats.delayed or runner.backend.queue.uncounted()):
        flags.append("STALLED: nothing is queued or running, yet the run is not complete")
    print(f"run {name} (generation {gen}): {progress}  done {progress.done} of {progress.total}, "
          f"failed {progress.failed}" + (f"  [{'; '.join(flags)}]" if flags else ""))
    _queue_status(runner.backend, stats)
    rejected = state.alerts(gen)[1]
    if rejected is not None:
        print(f"REFUSED: {time.time() - rejected[0]:.0f}s ago workers refused jobs signed with this "
              f"PACKMULE_SECRET (key id {state.signer.key_id.hex()}; theirs is {rejected[1]}): every process "
              "must share the same PACKMULE_SECRET")
    if progress.failed:
        p = prefix(name, gen)
        got = runner.backend.store.get_many([f"{p}f:{k}" for k in range(1, progress.failed + 1)])
        ids = [job_id(name, gen, raw.decode()) for raw in got.values()]
        recs = records(runner.backend.store, signer_for(runner.backend), ids)
        print(f"failures ({len(ids)}):")
        for ref_id in ids:
            rec = recs.get(ref_id)
            if rec is None or rec[0] != "err":
                print(f"  {ref_id}: (error record missing)")
                continue
            info = rec[1]
            print(f"  {ref_id} {info['method']}({info['args']}): {info['exc_type']}: {info['message']}")
            for line in info.get("traceback", "").rstrip().splitlines()[-3:]:
                print(f"      {line}")


def progress(name: str, watch: bool) -> int:
    from packmule._driver.runner import Runner  # (here: see the top)
    from packmule._model.keys import check_name  # (here: see the top)

    runner = Runner(check_name(name))
    if not watch:
        print(runner.update_progress())
        return 0
    from tqdm import tqdm

    with tqdm(total=0, desc=name, unit="job") as bar:
        while True:
            now = runner.update_progress()
            bar.total, bar.n = now.total, now.done
            bar.refresh()
            if now.complete:
                break
            time.sleep(0.25)
    print(runner.update_progress())
    return 0


LOCAL_DASHBOARD = (
    "the local backend's runs live in the process tree of the program that started them, which this command "
    "cannot see: serve the dashboard from that program instead - set PACKMULE_DASHBOARD_PORT=8765 in its "
    "environment, or call packmule.web.serve(port=8765, background=True) in it (or run "
    "`python -m packmule.examples.sleepy --dashboard`); `packmule dashboard` serves a cluster backend "
    "(PACKMULE_BACKEND=beanstalk)")


def dashboard(host: str, port: int, token: str | None) -> int:
    token = token or _config.dashboard_token()
    try:
        from packmule.web._serve import check_exposure  # (here: the web extra is optional)
    except ImportError as exc:
        print(f"packmule dashboard: {exc}", file=sys.stderr)
        return 1
    try:
        check_exposure(host, token)
    except ValueError as exc:
        print(f"packmule dashboard: {exc}", file=sys.stderr)
        return 2
    from packmule.backends import _choice  # (here: see the top)

    backend = os.environ.get("PACKMULE_BACKEND") or _choice.DEFAULT_BACKEND
    if backend == "local" and not os.environ.get("PACKMULE_LOCAL_ADDRESS"):
        print(f"packmule dashboard: {LOCAL_DASHBOARD}", file=sys.stderr)
        return 2
    import packmule.web  # (as above)

    print(f"packmule dashboard: serving http://{host}:{port}/ for the {backend} backend (Ctrl-C stops it)",
          file=sys.stderr, flush=True)
    packmule.web.serve(host, port, token=token)
    return 0


def _worker(a: argparse.Namespace) -> int:
    scheduler = None
    if not a.no_schedules and a.imports:
        from packmule.scheduling import (
            faces as scheduling,  # (here: only a worker that imports schedules loads the driver)
        )

        _supervisor.setup_logging(a.log_level)
        scheduler = scheduling.worker_schedules(a.imports)
    try:
        return _supervisor.worker_main(a)
    finally:
        if scheduler is not None:
            scheduler.stop()


def _schedules(a: argparse.Namespace) -> int:
    from packmule.scheduling import faces as scheduling  # (here: see the top)

    _supervisor.setup_logging(a.log_level)
    if a.command == "scheduler":
        return scheduling.scheduler_main(a.imports)
    return scheduling.print_schedules(a.imports)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="packmule", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    worker = sub.add_parser("worker", help="serve the queue on this machine")
    _supervisor.add_arguments(worker)
    worker.add_argument("--no-schedules", action="store_true",
                        help="do not fire the schedules the --import modules declare (a cluster backend's "
                             "worker fires them by default)")
    for command, text in (("scheduler", "fire the schedules the --import modules declare (no jobs run here)"),
                          ("schedules", "each schedule: its next fire time, its last tick and that run's state")):
        sp = sub.add_parser(command, help=text)
        sp.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="a module that declares schedules (repeat for several)")
        sp.add_argument("--log-level", default="INFO")
    st = sub.add_parser("status", help="a run's progress, failures and queue; each server's state")
    st.add_argument("name", nargs="?", help="the run (none: only the queue and the servers)")
    pr = sub.add_parser("progress", help="a run's progress")
    pr.add_argument("name")
    pr.add_argument("--watch", action="store_true", help="draw a live progress bar until the run is complete")
    dash = sub.add_parser("dashboard", help="serve the web dashboard (needs packmule[web])")
    dash.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other "
                                                          "needs a token)")
    dash.add_argument("--port", type=int, default=8765, help="TCP port (default 8765)")
    dash.add_argument("--token", default=None, help="the token every request must carry "
                                                    "(default: PACKMULE_DASHBOARD_TOKEN)")
    a = ap.parse_args(argv)
    try:
        if a.command == "worker":
            return _worker(a)
        if a.command in ("scheduler", "schedules"):
            return _schedules(a)
        if a.command == "dashboard":
            return dashboard(a.host, a.port, a.token)
        if a.command == "status":
            return status(a.name)
        return progress(a.name, a.watch)
    except (PackMuleError, ValueError) as exc:
        print(f"packmule {a.command}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
