"""The node's Prometheus metrics, in a registry of its own: what the intake, the workers and
the HTTP endpoint count and read (``/metrics`` serves them; the job-table gauges are added there).

With ``node.receive_processes`` > 1 each other receiving process publishes its intake counters
to a file of its own under ``<data_dir>/run/metrics`` (:class:`Publisher`, once a second and when
it stops), and the serving process adds them to its own (:meth:`Metrics.exposed`). A process that
ended keeps its file, so the sums never go back when one is restarted.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import Metric

logger = logging.getLogger(__name__)

# what a receiving process counts: the sums of every process's
RECEIVING = {
    "pacs_node_associations",
    "pacs_node_instances_received",
    "pacs_node_instances_ignored",
    "pacs_node_instances_rejected",
}


class Metrics:
    """The node's Prometheus metrics, in a registry of its own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.associations = Counter(
            "pacs_node_associations", "Associations by outcome", ["outcome"], registry=r
        )
        self.received = Counter("pacs_node_instances_received", "Instances stored", registry=r)
        self.ignored = Counter(
            "pacs_node_instances_ignored",
            "Instances answered Success and not kept (rule)",
            registry=r,
        )
        self.rejected = Counter(
            "pacs_node_instances_rejected", "Instances refused, by reason", ["reason"], registry=r
        )
        self.denoise_seconds = Histogram(
            "pacs_node_denoise_seconds",
            "Seconds per denoised chunk of slices",
            registry=r,
            buckets=(0.1, 0.5, 1, 2, 5, 10, 30, 60, 120, 300),
        )
        self.slices = Counter("pacs_node_denoised_slices", "Slices denoised", registry=r)
        self.slices_per_second = Gauge(
            "pacs_node_denoise_slices_per_second", "Throughput of the last chunk", registry=r
        )
        self.forward_failures = Counter(
            "pacs_node_forward_failures",
            "Failed delivery attempts, by destination",
            ["destination"],
            registry=r,
        )
        self.delivered = Counter(
            "pacs_node_instances_delivered",
            "Objects delivered, by destination",
            ["destination"],
            registry=r,
        )
        self.last_delivery = Gauge(
            "pacs_node_last_delivery_timestamp_seconds",
            "Unix time of the last delivery",
            registry=r,
        )

        self.last_delivery_at: float | None = None

    def counts(self) -> dict[str, float]:
        """This process's receiving counters, by sample name and labels."""
        return {
            _key(sample.name, sample.labels): sample.value
            for family in self.registry.collect()
            if family.name in RECEIVING
            for sample in family.samples
            if sample.name.endswith("_total")
        }

    def exposed(self, others: Path | None) -> _Summed:
        """What /metrics serves: this registry, plus the receiving counters published under
        ``others``."""
        return _Summed(self.registry, others)

    def observe_delivery(self, destination: str) -> None:
        self.delivered.labels(destination).inc()
        self.last_delivery_at = time.time()
        self.last_delivery.set(self.last_delivery_at)

    def observe_denoise(self, seconds: float, slices: int) -> None:
        self.denoise_seconds.observe(seconds)
        self.slices.inc(slices)
        if seconds > 0:
            self.slices_per_second.set(slices / seconds)


def _key(name: str, labels: dict[str, str]) -> str:
    return json.dumps([name, sorted(labels.items())])


class _Summed:
    def __init__(self, registry: CollectorRegistry, others: Path | None) -> None:
        self.registry, self.others = registry, others

    def _published(self) -> dict[str, float]:
        sums: dict[str, float] = {}
        for path in sorted(self.others.glob("*.json")) if self.others else []:
            try:
                counts = json.loads(path.read_text())
            except (OSError, ValueError) as err:  # written by rename: only a bug gets here
                logger.warning("metrics of another receiving process unreadable: %s", err)
                continue
            for key, value in counts.items():
                sums[key] = sums.get(key, 0.0) + float(value)
        return sums

    def collect(self) -> Iterator[Metric]:
        extra = self._published()
        for family in self.registry.collect():
            if family.name in RECEIVING and extra:
                seen = {_key(s.name, s.labels) for s in family.samples}
                family.samples = [
                    s._replace(value=s.value + extra.get(_key(s.name, s.labels), 0.0))
                    for s in family.samples
                ]
                for key, value in extra.items():  # labels only the others have seen
                    name, labels = json.loads(key)
                    if key not in seen and name.removesuffix("_total") == family.name:
                        family.add_sample(name, dict(labels), value)
            yield family


class Publisher:
    """Writes ``metrics.counts()`` to a file of this process's own under ``folder`` once a
    second while they change, and once more on ``stop()``."""

    def __init__(self, metrics: Metrics, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.metrics = metrics
        self.path = folder / f"{os.getpid()}-{time.time_ns()}.json"  # pids are reused
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)
        self._last: dict[str, float] | None = None

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            try:
                self.publish()
            except OSError as err:  # a full disk: /metrics lags, receiving goes on
                logger.warning("publishing this process's metrics failed: %s", err)

    def publish(self) -> None:
        counts = self.metrics.counts()
        if counts == self._last:
            return
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(counts))
        tmp.replace(self.path)
        self._last = counts

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.publish()
