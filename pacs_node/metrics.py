"""The node's Prometheus metrics, in a registry of its own: what the intake, the workers and
the HTTP endpoint count and read (``/metrics`` serves them; the job-table gauges are added there).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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

    def observe_delivery(self, destination: str) -> None:
        self.delivered.labels(destination).inc()
        self.last_delivery_at = time.time()
        self.last_delivery.set(self.last_delivery_at)

    def observe_denoise(self, seconds: float, slices: int) -> None:
        self.denoise_seconds.observe(seconds)
        self.slices.inc(slices)
        if seconds > 0:
            self.slices_per_second.set(slices / seconds)
