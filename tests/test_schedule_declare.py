"""Schedules declared on Runner classes are checked when the class is defined:
a bad one raises ValueError naming the class, the method and the fix, and
nothing is noted; ``current_tick`` is None outside a tick's job."""

from __future__ import annotations

import subprocess
import sys

import pytest

import packmule
from packmule._model.scheduled import DECLARED


class Nightly(packmule.Runner):
    @packmule.cron("30 2 * * *", tz="Europe/Berlin")
    def report(self) -> None: ...

    schedules = {"refresh": packmule.every(minutes=5)}

    def refresh(self, force: bool = False) -> None: ...  # (defaults are allowed)


class Later(Nightly):
    pass


def test_a_schedule_is_noted_under_its_class_and_method_and_a_subclass_does_not_inherit_it() -> None:
    cls, schedule = DECLARED["Nightly.report"]
    assert cls is Nightly and schedule.method == "report" and schedule.expr == "30 2 * * *"
    assert DECLARED["Nightly.refresh"][1].method == "refresh"
    assert not [key for key in DECLARED if key.startswith("Later.")]


def test_a_class_whose_name_no_run_name_can_carry_cannot_declare_a_schedule() -> None:
    with pytest.raises(ValueError, match="not allowed"):
        class Inner(packmule.Runner):  # (its qualname holds '<locals>')
            @packmule.every(seconds=5)
            def beat(self) -> None: ...


@pytest.mark.parametrize(("body", "says"), [
    ("schedules = {'missing': packmule.every(seconds=5)}", "names no job method: X has no method 'missing'"),
    ("schedules = {'wait': packmule.every(seconds=5)}", "Runner's own"),
    ("@packmule.every(seconds=5)\n    def takes(self, x): ...", "takes no arguments besides self"),
    ("schedules = ['beat']", "must be a dict"),
    ("schedules = {'beat': 5}\n    def beat(self): ...", "must be packmule.every"),
    ("@packmule.every(seconds=5)\n    def beat(self): ...\n    schedules = {'beat': packmule.every(seconds=9)}",
     "two schedules"),
    ("priority = 101", "X.priority must be an int from -100 to 100"),
])
def test_a_bad_schedule_fails_when_the_class_is_defined_naming_it(body: str, says: str) -> None:
    before = dict(DECLARED)
    with pytest.raises(ValueError, match=says.replace("(", r"\(")):
        exec(f"class X(packmule.Runner):\n    {body}\n", {"packmule": packmule})
    assert before == DECLARED


@pytest.mark.parametrize(("call", "says"), [
    ("packmule.cron('61 * * * *')", "cron"), ("packmule.cron('0 * * * *', tz='Mars/Olympus')", "time zone"),
    ("packmule.every(seconds=0.5)", "1"), ("packmule.every(seconds=5, misfire='sometimes')", "misfire"),
])
def test_a_bad_schedule_expression_fails_at_the_decorator(call: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        eval(call, {"packmule": packmule})


def test_current_tick_is_none_outside_a_ticks_job() -> None:
    assert packmule.current_tick() is None


def test_packmule_scheduler_without_schedules_exits_non_zero_saying_so() -> None:
    done = subprocess.run([sys.executable, "-m", "packmule", "scheduler", "--import", "json"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and "no schedules" in done.stderr
