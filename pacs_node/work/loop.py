"""The worker loop: claim -> denoise -> gate -> dispatch, with heartbeats, and the mapping from
what went wrong to what happens to the job (:mod:`pacs_node.work.retry`)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
import time

from pacs_node.config import Config
from pacs_node.errors import PermanentError
from pacs_node.jobs import Action, Claim, JobState, JobStore, LostClaim
from pacs_node.jobs.queries import Completion
from pacs_node.metrics import Metrics
from pacs_node.storage import Storage
from pacs_node.work.dispatch import Dispatcher
from pacs_node.work.quality import QualityFigures, judge
from pacs_node.work.retry import Outcome, RetryPolicy
from pacs_node.work.series import Interrupted, SeriesProcessor, SeriesQuality
from unit_model.denoiser import Denoiser

logger = logging.getLogger(__name__)

SWEEP_SECONDS = 300  # how often a worker removes the files that storage.keep_days let expire
REAP_SECONDS = 1.0  # how often a worker looks for jobs whose worker went silent
# woken by an arrival, a worker looks at the job table after this pause, so that a burst of
# instances (hundreds a second) costs it one look, not one each
WAKE_PAUSE_SECONDS = 0.05


class Worker:
    def __init__(
        self,
        config: Config,
        jobs: JobStore,
        storage: Storage,
        denoiser: Denoiser,
        name: str | None = None,
        metrics: Metrics | None = None,
        wake: threading.Event | None = None,
    ) -> None:
        self.config, self.jobs, self.storage = config, jobs, storage
        # set by this process's intake when it stores an instance: look for work (after
        # WAKE_PAUSE_SECONDS) instead of waiting out the poll
        self.wake = wake or threading.Event()
        self.denoiser, self.metrics = denoiser, metrics
        self.series = SeriesProcessor(config, jobs, storage, denoiser, metrics)
        self.dispatcher = Dispatcher(config, jobs, metrics)
        # a job whose processing failed for a passing reason (job table, disk) is retried with
        # the back-off of its first destination
        d = config.destination[0]
        self.retry = RetryPolicy(
            d.retry_backoff_seconds, d.retry_backoff_max_seconds, d.max_attempts
        )
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.stopping = threading.Event()
        q = config.queue
        self.completion = Completion(
            q.series_quiet_seconds, "release" in q.complete_on, q.release_grace_seconds
        )
        # denoise a series while it arrives: from its first slice, then whenever one batch of
        # the network waits
        self.early_chunk = denoiser.batch_size if q.denoise_while_receiving else 0

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        self.stopping = stop
        q = self.config.queue
        next_sweep = next_reap = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    self.jobs.sweep(self.storage, self.config.storage.keep_days)
                    next_sweep = time.monotonic() + SWEEP_SECONDS
                if time.monotonic() >= next_reap:
                    self.jobs.reap(q.stale_after_seconds)
                    next_reap = time.monotonic() + REAP_SECONDS
                claim = self.jobs.claim(self.name, self.completion, early_chunk=self.early_chunk)
            except Exception:
                logger.exception("job table unavailable; retrying")
                stop.wait(5)
                continue
            if claim is None:
                if self.wake.wait(poll):
                    stop.wait(WAKE_PAUSE_SECONDS)
                    self.wake.clear()
                continue
            self.process(claim)

    def run_once(self) -> bool:
        """Process one job if one is ready (for tests and `denoise`); True if one was."""
        claim = self.jobs.claim(self.name, self.completion, early_chunk=self.early_chunk)
        if claim is None:
            return False
        self.process(claim)
        return True

    def process(self, claim: Claim) -> None:
        beat = threading.Event()
        pulse = threading.Thread(target=self._heartbeat, args=(claim, beat), daemon=True)
        pulse.start()
        log = {"job_id": claim.job_id}
        try:
            logger.info(
                "job %d: series %s, attempt %d",
                claim.job_id,
                claim.series_uid,
                claim.attempts,
                extra=log,
            )
            quality = SeriesQuality.from_json(claim.tally)
            new = 0
            if claim.action == Action.DENOISE:
                while n := self.series.denoise(claim, self.stopping, self.name, quality):
                    new += n  # and again for what arrived meanwhile
            if not self.jobs.is_complete(claim, self.completion):
                self.jobs.release(claim)  # receiving again: the rest of the series is to come
                logger.info(
                    "job %d: denoised as far as it has arrived; waiting for the rest",
                    claim.job_id,
                    extra=log,
                )
                return
            # judged once the series is whole, and again only if more of it came since (a
            # retried job that the gate held is forwarded: retry is the admin's override)
            judge = claim.action == Action.DENOISE and (new or not claim.judged)
            if judge and not self._gate(claim, quality.figures()):
                return
            self.jobs.start_forwarding(claim)
            self.dispatcher.deliver(claim)
            state, due = self.jobs.settle(claim)
            if state == JobState.DONE and self.config.storage.keep_days <= 0:
                self.jobs.remove_delivered(self.storage, claim)
            if state == JobState.READY and due > time.time():
                logger.info(
                    "job %d: a destination retries in %.0f s", claim.job_id, due - time.time()
                )
            else:
                logger.info("job %d: %s", claim.job_id, state.value, extra=log)
        except Interrupted:
            with contextlib.suppress(LostClaim):
                self.jobs.release(claim)
            logger.info("job %d: shutting down, returned to the queue", claim.job_id, extra=log)
        except Exception as err:
            self._after_error(claim, err)
        finally:
            beat.set()
            pulse.join()

    def _after_error(self, claim: Claim, err: Exception) -> None:
        log = {"job_id": claim.job_id}
        outcome = self.retry.outcome(err)
        if outcome is Outcome.LEAVE:
            logger.warning("job %d: %s; leaving it", claim.job_id, err, extra=log)
            return
        try:
            if outcome is Outcome.RETRY:
                delay = self.retry.delay(claim.attempts)
                state = self.jobs.defer(claim, str(err), delay, self.retry.max_attempts)
                if state == JobState.FAILED:
                    logger.error(
                        "job %d failed after %d attempts: %s",
                        claim.job_id,
                        claim.attempts,
                        err,
                        extra=log,
                    )
                else:
                    logger.warning(
                        "job %d: %s; retry in %.0f s", claim.job_id, err, delay, extra=log
                    )
                return
            if not isinstance(err, PermanentError):
                logger.error("job %d: unexpected error", claim.job_id, exc_info=err, extra=log)
            self.jobs.fail(claim, f"{type(err).__name__}: {err}")
            logger.error("job %d failed: %s", claim.job_id, err, extra=log)
        except LostClaim:
            return

    def _heartbeat(self, claim: Claim, stop: threading.Event) -> None:
        while not stop.wait(self.config.queue.heartbeat_seconds):
            try:
                self.jobs.heartbeat(claim)
            except LostClaim:
                return
            except Exception:
                logger.warning("job %d: heartbeat failed", claim.job_id, exc_info=True)

    def _gate(self, claim: Claim, q: QualityFigures) -> bool:
        """Record the figures; hold the series (fail the job) if the verdict says so."""
        cfg = self.config.quality
        verdict = judge(q, cfg.max_hu_bias, cfg.max_edge_ratio)
        record = json.dumps(q.to_dict())
        if not verdict.measurable:  # nothing to measure on: forward, flagged, not held blindly
            logger.warning("job %d: no uniform region to measure; forwarding flagged", claim.job_id)
            self.jobs.record_quality(claim, record, flagged=True)
            return True
        problems = "; ".join(verdict.problems)
        if problems and not cfg.forward_on_failure:
            self.jobs.fail(claim, "quality gate: " + problems, quality=record)
            logger.error("job %d held by the quality gate: %s", claim.job_id, problems)
            return False
        self.jobs.record_quality(claim, record, flagged=bool(problems))
        if problems:
            logger.warning(
                "job %d: quality gate failed but quality.forward_on_failure is set: %s",
                claim.job_id,
                problems,
            )
        return True
