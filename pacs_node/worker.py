"""The worker loop: claim -> read -> denoise -> gate -> derive -> forward.

A job is processed in chunks of slices, so memory stays flat for long series and the database
records progress as it goes: a worker killed mid-job leaves every finished instance marked, and
whoever takes the job next (after the heartbeat goes stale) does only what is left.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

from pacs_node import __version__
from pacs_node.config import Config
from pacs_node.dicom_io import derive, read_hu
from pacs_node.errors import PermanentError, RetryableError
from pacs_node.forward import Forwarder
from pacs_node.http import Metrics
from pacs_node.images import save_thumbnail
from pacs_node.quality import QualityFigures, RegionTally, find_uniform_regions, judge
from pacs_node.queue import Claim, InstanceState, JobState, LostClaim, Queue
from pacs_node.storage import Storage
from unit_model.denoiser import Denoiser

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """The worker is shutting down: the job goes back to the queue as it is."""


class SeriesQuality(RegionTally):
    """The gate's figures over the chunks of one job: output against input in one uniform
    region per slice, found on the input."""

    def add_chunk(self, hu_in: np.ndarray, hu_out: np.ndarray) -> None:
        self.add(hu_in, hu_out, find_uniform_regions(hu_in, per_slice=1))
        self.add_edges(hu_in, hu_out)


def denoise_slices(
    denoiser: Denoiser, hu: list[np.ndarray], quality: SeriesQuality
) -> tuple[list[np.ndarray], float]:
    """Denoise slices that may mix matrix sizes (one batch per size); return the outputs in
    input order and the seconds spent in the network. Adds each batch to ``quality``."""
    out: list[np.ndarray] = [np.empty(0)] * len(hu)
    seconds = 0.0
    for shape in {h.shape for h in hu}:
        sel = [k for k, h in enumerate(hu) if h.shape == shape]
        batch = np.stack([hu[k] for k in sel])
        t0 = time.perf_counter()
        res = denoiser.denoise_hu(batch)
        seconds += time.perf_counter() - t0
        quality.add_chunk(batch, res)
        for n, k in enumerate(sel):
            out[k] = res[n]
    return out, seconds


def derive_output(
    config: Config, denoiser: Denoiser, source: pydicom.Dataset, hu: np.ndarray
) -> pydicom.Dataset:
    """The derived instance for ``source`` holding ``hu``, labelled as ``[output]`` says."""
    return derive(
        source,
        hu,
        model_version=denoiser.version_label,
        strength=denoiser.strength,
        software_version=__version__,
        series_number_offset=config.output.series_number_offset,
        series_description_suffix=config.output.series_description_suffix,
    )


def load_denoiser(config: Config) -> Denoiser:
    m = config.model
    return Denoiser.from_checkpoint(
        m.checkpoint,
        device=m.device,
        precision=m.precision,
        batch_size=m.batch_size,
        compile=m.compile,
        strength=m.strength,
    )


class Worker:
    def __init__(
        self,
        config: Config,
        queue: Queue,
        storage: Storage,
        denoiser: Denoiser,
        name: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        self.config = config
        self.metrics = metrics
        self.queue = queue
        self.storage = storage
        self.denoiser = denoiser
        self.forwarder = Forwarder(config.destination)
        self.name = name or f"{socket.gethostname()}:{os.getpid()}:{threading.get_ident() % 10000}"
        self.stopping = threading.Event()

    # -- the loop ---------------------------------------------------------------------------
    def run(self, stop: threading.Event, poll: float = 0.5) -> None:
        self.stopping = stop
        q = self.config.queue
        next_sweep = 0.0
        while not stop.is_set():
            try:
                if time.monotonic() >= next_sweep:
                    self.sweep()
                    next_sweep = time.monotonic() + 300
                self.queue.reap(q.stale_after_seconds)
                claim = self.queue.claim(self.name, q.series_quiet_seconds)
            except Exception:
                logger.exception("job table unavailable; retrying")
                stop.wait(5)
                continue
            if claim is None:
                stop.wait(poll)
                continue
            self.process(claim)

    def run_once(self) -> bool:
        """Process one job if one is ready (for tests and `denoise`); True if one was."""
        claim = self.queue.claim(self.name, self.config.queue.series_quiet_seconds)
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
            quality = self._denoise(claim)
            if quality is not None and not self._gate(claim, quality):
                return
            self.queue.set_state(claim, JobState.FORWARDING)
            self._forward(claim)
            state = self.queue.finish(claim)
            if state == JobState.DONE:
                self._retain(claim)
            logger.info("job %d: %s", claim.job_id, state.value, extra=log)
        except LostClaim as err:
            logger.warning("job %d: %s; leaving it", claim.job_id, err, extra=log)
        except Interrupted:
            with contextlib.suppress(LostClaim):
                self.queue.release(claim)
            logger.info("job %d: shutting down, returned to the queue", claim.job_id, extra=log)
        except RetryableError as err:
            if self.metrics:
                self.metrics.forward_failures.inc()
            d = self.config.destination
            delay = min(
                d.retry_backoff_seconds * 2 ** (claim.attempts - 1), d.retry_backoff_max_seconds
            )
            try:
                state = self.queue.defer(claim, str(err), delay, d.max_attempts)
            except LostClaim:
                return
            if state == JobState.FAILED:
                logger.error(
                    "job %d failed after %d attempts: %s",
                    claim.job_id,
                    claim.attempts,
                    err,
                    extra=log,
                )
            else:
                logger.warning("job %d: %s; retry in %.0f s", claim.job_id, err, delay, extra=log)
        except Exception as err:  # a permanent error, or a bug: fail the job, keep the node up
            if not isinstance(err, PermanentError):
                logger.exception("job %d: unexpected error", claim.job_id, extra=log)
            try:
                self.queue.fail(claim, f"{type(err).__name__}: {err}")
            except LostClaim:
                return
            logger.error("job %d failed: %s", claim.job_id, err, extra=log)
        finally:
            beat.set()
            pulse.join()

    def _heartbeat(self, claim: Claim, stop: threading.Event) -> None:
        while not stop.wait(self.config.queue.heartbeat_seconds):
            try:
                self.queue.heartbeat(claim)
            except LostClaim:
                return
            except Exception:
                logger.warning("job %d: heartbeat failed", claim.job_id, exc_info=True)

    # -- steps ------------------------------------------------------------------------------
    def _denoise(self, claim: Claim) -> QualityFigures | None:
        """Denoise every received instance of the job; return the gate's figures (None if there
        was nothing new)."""
        pending = self.queue.pending_instances(claim, InstanceState.RECEIVED)
        if not pending:
            return None
        quality = SeriesQuality()
        chunk = max(self.config.model.batch_size, 16)
        # Each chunk's derived files are encoded, written (fsync) and recorded on a helper thread
        # while the network works on the next chunk; one chunk in flight keeps the order.
        with ThreadPoolExecutor(1, thread_name_prefix=f"{self.name}-write") as writer:
            in_flight: Future[None] | None = None
            for start in range(0, len(pending), chunk):
                if self.stopping.is_set():
                    if in_flight is not None:
                        in_flight.result()
                    raise Interrupted
                sources, hu, ids = self._read_chunk(claim, pending[start : start + chunk])
                outputs, seconds = denoise_slices(self.denoiser, hu, quality)
                if self.metrics and hu:
                    self.metrics.observe_denoise(seconds, len(hu))
                middle = len(pending) // 2 - start  # the series' middle slice, if in this chunk
                if 0 <= middle < len(hu):
                    save_thumbnail(
                        self.storage.thumb_path(claim.job_id), hu[middle], outputs[middle]
                    )
                if in_flight is not None:
                    in_flight.result()  # its errors (e.g. LostClaim) surface here
                in_flight = writer.submit(self._write_chunk, claim, ids, sources, outputs)
            if in_flight is not None:
                in_flight.result()
        return quality.figures()

    def _read_chunk(
        self, claim: Claim, part: list[tuple[int, str, str | None]]
    ) -> tuple[list[pydicom.Dataset], list[np.ndarray], list[int]]:
        """Sources, HU slices and instance ids of the readable instances in ``part``; an
        unreadable one is marked failed and left out."""
        sources: list[pydicom.Dataset] = []
        hu: list[np.ndarray] = []
        ids: list[int] = []
        for iid, path, _ in part:
            try:
                ds = pydicom.dcmread(path)
                slice_hu = read_hu(ds)
            except (PermanentError, OSError, pydicom.errors.InvalidDicomError) as err:
                self.queue.mark_instance_failed(claim, iid, str(err))
                logger.error("job %d: instance %d cannot be read: %s", claim.job_id, iid, err)
                continue
            sources.append(ds)
            hu.append(slice_hu)
            ids.append(iid)
        return sources, hu, ids

    def _write_chunk(
        self,
        claim: Claim,
        ids: list[int],
        sources: Sequence[pydicom.Dataset],
        outputs: list[np.ndarray],
    ) -> None:
        done = [
            self._write_derived(claim, iid, src, res)
            for iid, src, res in zip(ids, sources, outputs, strict=True)
        ]
        self.queue.mark_denoised(claim, done, self.denoiser.version_label)

    def _write_derived(
        self, claim: Claim, iid: int, source: pydicom.Dataset, hu: np.ndarray
    ) -> tuple[int, str, str]:
        ds = derive_output(self.config, self.denoiser, source, hu)
        buf = io.BytesIO()
        ds.save_as(buf, enforce_file_format=True)
        path = self.storage.derived_path(claim.job_id, str(ds.SOPInstanceUID))
        self.storage.write_atomic(path, buf.getvalue())
        return iid, str(ds.SOPInstanceUID), str(path)

    def _gate(self, claim: Claim, q: QualityFigures) -> bool:
        """Store the figures; hold the series (fail the job) if they are out of bounds."""
        cfg = self.config.quality
        verdict = judge(q, cfg.max_hu_bias, cfg.max_edge_ratio)
        record = json.dumps(q.to_dict())
        if not verdict.measurable:  # nothing to measure on: forward, flagged, not held blindly
            logger.warning("job %d: no uniform region to measure; forwarding flagged", claim.job_id)
            self.queue.set_state(claim, JobState.RUNNING, quality=record, flagged=True)
            return True
        problems = "; ".join(verdict.problems)
        if problems and not cfg.forward_on_failure:
            self.queue.fail(claim, "quality gate: " + problems, quality=record)
            logger.error("job %d held by the quality gate: %s", claim.job_id, problems)
            return False
        self.queue.set_state(claim, JobState.RUNNING, quality=record, flagged=bool(problems))
        if problems:
            logger.warning(
                "job %d: quality gate failed but quality.forward_on_failure is set: %s",
                claim.job_id,
                problems,
            )
        return True

    def _forward(self, claim: Claim) -> None:
        pending = self.queue.pending_instances(claim, InstanceState.DENOISED)
        batch: list[int] = []

        def delivered(iid: int, _status: int) -> None:
            batch.append(iid)
            if self.metrics:
                self.metrics.observe_delivery()
            if len(batch) >= 16:
                self.queue.mark_delivered(claim, batch)
                batch.clear()

        try:
            self.forwarder.send(((iid, Path(str(dp))) for iid, _, dp in pending), delivered)
        finally:
            self.queue.mark_delivered(claim, batch)

    def _retain(self, claim: Claim) -> None:
        """Remove the job's delivered files now, unless storage.keep_days keeps them (then the
        periodic sweep removes them once they are that old)."""
        if self.config.storage.keep_days > 0:
            return
        done = self.queue.pending_instances(claim, InstanceState.DELIVERED)
        self._remove_files(done)

    def sweep(self) -> int:
        """Remove files of jobs delivered more than storage.keep_days ago."""
        keep = self.config.storage.keep_days
        if keep <= 0:
            return 0
        expired = self.queue.expired_files(time.time() - keep * 86400)
        self._remove_files(expired)
        if expired:
            logger.info("retention: removed the files of %d delivered instances", len(expired))
        return len(expired)

    def _remove_files(self, items: list[tuple[int, str, str | None]]) -> None:
        for _, path, derived in items:
            if path:
                self.storage.remove(Path(path))
            if derived:
                self.storage.remove(Path(derived))
        self.queue.forget_files([iid for iid, _, _ in items])


def denoise_folder(
    in_dir: Path, out_dir: Path, config: Config, denoiser: Denoiser
) -> dict[str, tuple[int, QualityFigures]]:
    """The worker's decode -> denoise -> derive path over a folder (no queue, no network).

    Writes ``out_dir/<derived series UID>/<derived SOP UID>.dcm``; returns per source series the
    instance count and the quality figures.
    """
    from collections import defaultdict

    from pacs_node.storage import valid_uid

    groups: dict[str, list[pydicom.Dataset]] = defaultdict(list)
    for path in sorted(p for p in in_dir.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (pydicom.errors.InvalidDicomError, OSError):
            continue
        if (
            ds.get("Modality") == "CT"
            and "PixelData" in ds
            and valid_uid(str(ds.get("SeriesInstanceUID", "")))
        ):
            groups[str(ds.SeriesInstanceUID)].append(ds)
    results: dict[str, tuple[int, QualityFigures]] = {}
    for series, items in groups.items():
        quality = SeriesQuality()
        for start in range(0, len(items), 32):
            part = items[start : start + 32]
            outputs, _ = denoise_slices(denoiser, [read_hu(ds) for ds in part], quality)
            for src, res in zip(part, outputs, strict=True):
                d = derive_output(config, denoiser, src, res)
                target = out_dir / str(d.SeriesInstanceUID) / f"{d.SOPInstanceUID}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                d.save_as(target, enforce_file_format=True)
        results[series] = (len(items), quality.figures())
    return results
