"""Sending a job's denoised instances to the destination, recording each delivery."""

from __future__ import annotations

from pathlib import Path

from pacs_node.config import DestinationConfig
from pacs_node.deliver.dimse import Forwarder
from pacs_node.jobs import Claim, InstanceState, JobStore
from pacs_node.metrics import Metrics

BATCH = 16  # deliveries recorded per transaction


class Dispatcher:
    def __init__(
        self, destination: DestinationConfig, jobs: JobStore, metrics: Metrics | None = None
    ) -> None:
        self.forwarder = Forwarder(destination)
        self.jobs, self.metrics = jobs, metrics

    def deliver(self, claim: Claim) -> None:
        """C-STORE every denoised, undelivered instance of the job; the ones delivered are
        recorded even when a later one fails (a retry sends only what is missing)."""
        pending = self.jobs.pending_instances(claim, InstanceState.DENOISED)
        batch: list[int] = []

        def delivered(iid: int, _status: int) -> None:
            batch.append(iid)
            if self.metrics:
                self.metrics.observe_delivery()
            if len(batch) >= BATCH:
                self.jobs.mark_delivered(claim, batch)
                batch.clear()

        try:
            self.forwarder.send(((iid, Path(str(dp))) for iid, _, dp in pending), delivered)
        finally:
            self.jobs.mark_delivered(claim, batch)
