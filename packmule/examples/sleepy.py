"""The seed's SleepyRunner, on whatever backend PACKMULE_BACKEND names.

    python -m packmule.examples.sleepy [--naps 100] [--nap-seconds 0.2] [--dashboard [--port 8765]]

Runs the example twice, as the original README does: synchronously (blocks,
returns the sum), then in the background with a progress bar, reading the run's
progress and return value by name.  With --dashboard this process serves the
web dashboard (packmule[web]) on 127.0.0.1, prints its address, and serves until
the run has ended (and --linger seconds more, for the pages to show the end).
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
    ap.add_argument("--dashboard", action="store_true", help="serve the web dashboard from this process")
    ap.add_argument("--port", type=int, default=8765, help="the dashboard's port (default 8765)")
    ap.add_argument("--linger", type=float, default=5.0, help="seconds the dashboard stays up after the run")
    a = ap.parse_args()
    if a.dashboard:
        import packmule.web

        url = packmule.web.serve(port=a.port, background=True)
        print(f"dashboard: {url}/  (run page: {url}/runs/this_is_an_arbitrary_name)", flush=True)
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
    if a.dashboard:
        print(f"the run has ended; the dashboard stops in {a.linger:g}s", flush=True)
        time.sleep(a.linger)


if __name__ == "__main__":
    main()
