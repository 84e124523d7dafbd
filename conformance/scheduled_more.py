"""Runners with schedules that only a test's own in-process scheduler fires
(a controlled clock): the misfire policies, DST, and crashes in a scheduler's
steps.  (Not imported by any scheduler process: see ``scheduled.py``.)"""

from __future__ import annotations

import packmule

from .scheduled import Noted


class Misfires(Noted):
    @packmule.every(seconds=1, misfire="skip")
    def skip(self) -> str:
        return self._note("Misfires.skip")

    @packmule.every(seconds=1, misfire="latest")
    def latest(self) -> str:
        return self._note("Misfires.latest")

    @packmule.every(seconds=1, misfire="all")
    def all(self) -> str:
        return self._note("Misfires.all")


class Crashy(Noted):
    @packmule.every(seconds=1)
    def tick(self) -> str:
        return self._note("Crashy.tick")


class Berlin(Noted):
    schedules = {"hourly": packmule.cron("0 * * * *", tz="Europe/Berlin"),
                 "daily": packmule.cron("30 2 * * *", tz="Europe/Berlin")}

    def hourly(self) -> str:
        return self._note("Berlin.hourly")

    def daily(self) -> str:
        return self._note("Berlin.daily")


class NewYork(Noted):
    schedules = {"hourly": packmule.cron("0 * * * *", tz="America/New_York"),
                 "daily": packmule.cron("30 1 * * *", tz="America/New_York")}

    def hourly(self) -> str:
        return self._note("NewYork.hourly")

    def daily(self) -> str:
        return self._note("NewYork.daily")
