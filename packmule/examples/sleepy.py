"""The seed's SleepyRunner, on whatever backend PACKMULE_BACKEND names.

    python -m packmule.examples.sleepy [--naps 100] [--nap-seconds 0.2]

Runs the example twice, as the original README does: synchronously (blocks,
returns the sum), then in the background with a progress bar, reading the run's
progress and return value by name.
"""

from __future__ import annotations

import argparse
import random
import time

import packmule


class SleepyRunner(packmule.Runner):
    record_return_values = True
    nap_seconds = 1.0  # how long one unit of snooze lasts

    def run_async(self, nap_count: int = 100) -> packmule.JobRef:
        return self.enqueue("run", nap_count)

    def run(self, nap_count: int = 100) -> int:
        jobs = [self.enqueue("snooze", random.randint(0, 1)) for _ in range(nap_count)]
        return self.deferred_result("wakeup", jobs)  # type: ignore[no-any-return]

    def wakeup(self, durations: list[int]) -> int:
        return sum(durations)

    def snooze(self, duration: int) -> int:
        time.sleep(duration * self.nap_seconds)
        return duration


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--naps", type=int, default=100)
    ap.add_argument("--nap-seconds", type=float, default=0.2)
    a = ap.parse_args()
    runner = SleepyRunner("this_is_an_arbitrary_name", False)
    runner.nap_seconds = a.nap_seconds
    print(f">> runner.run({a.naps})")
    print(f"=> {runner.run(a.naps)}")
    print(f">> task = runner.run_async({a.naps})")
    print(f"=> {runner.run_async(a.naps)!r}")
    print(f">> runner.update_progress()\n=> {runner.update_progress()!r}")
    same = SleepyRunner("this_is_an_arbitrary_name")
    print(f'>> SleepyRunner("this_is_an_arbitrary_name").update_progress()\n=> {same.update_progress()!r}')
    runner.wait(timeout=3600, progress=True)
    print(f">> runner.update_progress()\n=> {runner.update_progress()!r}")
    print(f">> runner.get_return_value()\n=> {runner.get_return_value()!r}")


if __name__ == "__main__":
    main()
