"""Sending a job's objects to each of its destinations, independently.

Each due destination gets a thread of its own, so a destination that is down or slow holds back
none of the others; what a destination received is recorded as it goes, and a destination that
fails backs off on its own schedule (its ``retry_backoff_seconds`` ... ``max_attempts``).
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from pacs_node.config import Config
from pacs_node.deliver import Sender, sender_for
from pacs_node.errors import PermanentError, RetryableError
from pacs_node.jobs import Claim, JobStore
from pacs_node.metrics import Metrics
from pacs_node.work.retry import RetryPolicy

logger = logging.getLogger(__name__)

BATCH = 16  # deliveries recorded per transaction


class Dispatcher:
    def __init__(self, config: Config, jobs: JobStore, metrics: Metrics | None = None) -> None:
        self.jobs, self.metrics = jobs, metrics
        self.destinations = {d.name: d for d in config.destination}
        self._senders: dict[str, Sender] = {}
        self.policies = {
            d.name: RetryPolicy(
                d.retry_backoff_seconds, d.retry_backoff_max_seconds, d.max_attempts
            )
            for d in config.destination
        }

    def sender(self, name: str) -> Sender:
        if name not in self._senders:
            self._senders[name] = sender_for(self.destinations[name])
        return self._senders[name]

    def deliver(self, claim: Claim) -> None:
        """Try every destination of the job whose turn has come, each in its own thread."""
        due = self.jobs.due_destinations(claim)
        if not due:
            return
        with ThreadPoolExecutor(len(due), thread_name_prefix=f"job{claim.job_id}-send") as pool:
            futures = [pool.submit(self._one, claim, name, attempts) for name, attempts in due]
            for f in futures:
                f.result()  # LostClaim and bugs surface here

    def _one(self, claim: Claim, name: str, attempts: int) -> None:
        log = {"job_id": claim.job_id}
        if name not in self.destinations:
            self.jobs.destination_failed(
                claim, name, f"destination {name!r} is no longer configured", 0, 1
            )
            logger.error("job %d: destination %r is no longer configured", claim.job_id, name)
            return
        batch: list[int] = []

        def delivered(delivery_id: int, _status: int) -> None:
            batch.append(delivery_id)
            if self.metrics:
                self.metrics.observe_delivery(name)
            if len(batch) >= BATCH:
                self.jobs.mark_sent(claim, batch)
                batch.clear()

        pending = self.jobs.pending_deliveries(claim, name)
        try:
            try:
                self.sender(name).send([(i, Path(f)) for i, f in pending], delivered)
            finally:
                self.jobs.mark_sent(claim, batch)
        except (RetryableError, PermanentError) as err:
            policy = self.policies[name]
            most = policy.max_attempts if isinstance(err, RetryableError) else 1
            state = self.jobs.destination_failed(
                claim, name, str(err), policy.delay(attempts + 1), most
            )
            if self.metrics:
                self.metrics.forward_failures.labels(name).inc()
            if state == "failed":
                logger.error(
                    "job %d: destination %s failed after %d attempts: %s",
                    claim.job_id,
                    name,
                    attempts + 1,
                    err,
                    extra=log,
                )
            else:
                logger.warning(
                    "job %d: destination %s: %s; retry in %.0f s",
                    claim.job_id,
                    name,
                    err,
                    policy.delay(attempts + 1),
                    extra=log,
                )
            return
        self.jobs.destination_done(claim, name)
        logger.info("job %d: %d objects delivered to %s", claim.job_id, len(pending), name)
