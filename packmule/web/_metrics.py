"""``/metrics``: a Prometheus collector that reads ``Watcher.metrics()`` - the
figures every worker publishes into the store - when it is scraped, so the
totals are those of all workers, not of the process serving the page."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from packmule.scheduling import published

if TYPE_CHECKING:
    from packmule._driver.watcher import Watcher

QUEUE_STATES = ("ready", "reserved", "delayed", "buried")


def _field(stats: Any, name: str) -> int:
    value = stats.get(name, 0) if isinstance(stats, dict) else getattr(stats, name, 0)
    return int(value)


def _le(bound: float) -> str:
    """A bucket's upper bound as Prometheus writes it."""
    text: str = floatToGoString(bound)  # type: ignore[no-untyped-call]
    return text


class PackmuleCollector(Collector):
    """The packmule_* metrics, read from the store at each scrape."""

    def __init__(self, watcher: Callable[[], Watcher]) -> None:
        self.watcher = watcher

    def collect(self) -> Iterator[Metric]:
        m = self.watcher().metrics()
        yield CounterMetricFamily("packmule_jobs_done", "Jobs completed (with a value or a failure), all workers",
                                  value=m.done)
        yield CounterMetricFamily("packmule_jobs_failed", "Jobs that failed for good, all workers", value=m.failed)
        yield CounterMetricFamily("packmule_jobs_retried", "Job attempts that raised and were retried",
                                  value=m.retried)
        yield GaugeMetricFamily("packmule_jobs_running", "Jobs running now, summed over live workers",
                                value=m.running)
        queue = GaugeMetricFamily("packmule_queue_jobs", "Queue items by server and state",
                                  labels=["server", "state"])
        for server, stats in sorted(m.queue.items()):
            for state in QUEUE_STATES:
                queue.add_metric([server, state], _field(stats, state))
        yield queue
        yield GaugeMetricFamily("packmule_workers_up", "Live workers (beating)", value=m.workers)
        yield GaugeMetricFamily("packmule_runs_active", "Runs in the registry that are running or stalled",
                                value=m.runs_active)
        buckets = [("+Inf" if math.isinf(le) else _le(le), count) for le, count in m.duration_buckets]
        if not buckets or buckets[-1][0] != "+Inf":
            buckets.append(("+Inf", m.duration_count))
        yield HistogramMetricFamily("packmule_job_duration_seconds", "Time jobs took to run",
                                    buckets=buckets, sum_value=m.duration_sum)
        yield from _ticks(self.watcher().backend)


def _ticks(backend: Any) -> Iterator[Metric]:
    """Each schedule's ticks fired, skipped (its misfire policy) and late, all schedulers."""
    families = {kind: CounterMetricFamily(f"packmule_schedule_ticks_{kind}", text, labels=["schedule"])
                for kind, text in (("fired", "Ticks of a schedule fired (their run queued)"),
                                   ("skipped", "Ticks of a schedule skipped by its misfire policy"),
                                   ("late", "Ticks fired later than their grace"))}
    for entry in published(backend):
        for kind, family in families.items():
            family.add_metric([entry["key"]], entry[kind])
    yield from families.values()


def exposition(watcher: Callable[[], Watcher]) -> Callable[[], bytes]:
    """A function that renders the metrics in the text format, on a registry of its own."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PackmuleCollector(watcher))
    return lambda: generate_latest(registry)
