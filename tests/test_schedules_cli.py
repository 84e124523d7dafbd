"""The faces of schedules: ``packmule schedules`` lists each schedule with its
next fire time, its last tick and that run's state; on the local backend,
``packmule.run_schedules()`` fires the schedules of the classes the program
defined (README's rule).  Real servers, real processes."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from conformance import scheduled
from conformance.harness import Harness, beanstalk_harness, environ_for
from packmule._model.scheduled import DECLARED
from packmule.scheduling import Scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WAIT = 60.0


@pytest.fixture(scope="module")
def cluster() -> Iterator[Harness]:
    with beanstalk_harness(concurrency=1) as h:
        yield h


def test_packmule_schedules_lists_the_next_fire_the_last_tick_and_its_runs_state(cluster: Harness) -> None:
    clock = [datetime(2034, 5, 1, 9, 0, 0, 250_000, tzinfo=timezone.utc)]
    scheduler = Scheduler(cluster.backend, {"Beat.beat": DECLARED["Beat.beat"]}, clock=lambda: clock[0])
    scheduler.run_pass()
    clock[0] += timedelta(seconds=1)
    scheduler.run_pass()
    (run,) = scheduler.queued
    scheduled.Beat(run, backend=cluster.backend).wait(timeout=WAIT)
    env = environ_for(cluster)
    env["PYTHONPATH"] = ROOT
    done = subprocess.run([sys.executable, "-m", "packmule", "schedules", "--import", "conformance.scheduled"],
                          env=env, capture_output=True, text=True, timeout=WAIT)
    assert done.returncode == 0, done.stderr
    (line,) = [line for line in done.stdout.splitlines() if line.startswith("Beat.beat ")]
    assert "every 1s" in line and "misfire=all" in line and "last 2034-05-01T09:00:01+00:00" in line
    assert f"{run} 1.0 / 1.0" in line and "(fired 1," in line
    next_fire = datetime.fromisoformat(line.split("next ")[1].split()[0])
    assert next_fire > datetime.now(timezone.utc) - timedelta(seconds=5)


LOCAL_PROGRAM = textwrap.dedent("""
    import sys, time
    import packmule

    class Pulse(packmule.Runner):
        record_return_values = True

        @packmule.every(seconds=1)
        def pulse(self):
            return packmule.current_tick().isoformat()

    scheduler = packmule.run_schedules()
    time.sleep(4.5)
    scheduler.stop()
    fired = list(scheduler.queued)
    for name in fired:
        assert Pulse(name).wait(timeout=30) == "1.0 / 1.0", name
        assert Pulse(name).get_return_value().replace("+00:00", "Z").replace("-", "").replace(":", "") == \\
            name.split(":", 1)[1], name
    print(len(fired))
""")


def test_on_the_local_backend_run_schedules_fires_the_schedules_of_the_program(tmp_path: Any) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACKMULE_")}
    env.update(PACKMULE_BACKEND="local", PACKMULE_WORKERS="1")
    program = tmp_path / "program.py"
    program.write_text(LOCAL_PROGRAM)
    done = subprocess.run([sys.executable, str(program)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    # (first sight at start: the ticks of the next 4.5 s fire, one each)
    assert int(done.stdout.split()[-1]) in (3, 4, 5)
