"""test_shop.py: a runner tested with packmule's pytest plugin."""

import time

import pytest

import packmule


class Shop(packmule.Runner):
    record_return_values = True
    max_retries = 2  # a job that raises runs at most 3 times

    def total(self, prices):
        return self.deferred_result("add", self.enqueue_each("price", prices))

    def price(self, cents):
        if cents < 0:
            raise ValueError(f"a price cannot be negative: {cents}")
        return cents

    def add(self, values):
        return sum(values)

    def nap(self, seconds):
        time.sleep(seconds)

    def fetch(self, tally):
        """A flaky server: fails twice, then answers (``tally`` counts the attempts)."""
        with open(tally, "a+") as f:
            f.write("x")
            f.seek(0)
            attempt = len(f.read())
        if attempt < 3:
            raise ConnectionError(f"attempt {attempt}: the server is busy")
        return "page"


def test_a_run_left_running_is_stopped_at_teardown(packmule_backend):
    shop = Shop("shop")
    shop.enqueue_each("nap", [30] * 5)  # still running when the test ends
    assert shop.update_progress() == "0.0 / 5.0"


def test_the_next_test_of_that_name_sees_only_its_own_jobs(packmule_backend):
    shop = Shop("shop")
    shop.enqueue_each("price", [100, 250])
    packmule_backend.join(timeout=30)
    assert shop.update_progress() == "2.0 / 2.0"


@pytest.mark.packmule(workers=1)
def test_a_deferred_result_adds_the_prices(packmule_backend):
    shop = Shop("shop")
    assert shop.total([100, 250, 399]) == 749
    assert shop.update_progress() == "3.0 / 3.0"


def test_join_raises_the_failure_of_a_job(packmule_backend):
    Shop("shop").enqueue("price", -5)
    with pytest.raises(packmule.JobFailed, match="ValueError: a price cannot be negative: -5"):
        packmule_backend.join(timeout=30)


def test_a_flaky_job_is_retried_without_waiting(packmule_backend, tmp_path):
    shop = Shop("shop")
    ref = shop.enqueue("fetch", str(tmp_path / "tally"))
    packmule_backend.join(timeout=30)
    assert shop.get_return_value(ref) == "page"
    assert packmule_backend.attempts(ref) == 3
