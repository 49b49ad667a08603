"""One series' work: read its stored instances in chunks, denoise them, write and record the
derived instances, and gather the quality gate's figures.

Chunks keep memory flat for long series and record progress as they go: a worker killed mid-job
leaves every finished instance marked, and whoever takes the job next does only what is left.
"""

from __future__ import annotations

import io
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom

from pacs_node import __version__
from pacs_node.config import Config
from pacs_node.errors import PermanentError
from pacs_node.jobs import Claim, InstanceState, JobStore
from pacs_node.metrics import Metrics
from pacs_node.storage import Storage, valid_uid
from pacs_node.work.dicom_io import derive, read_hu
from pacs_node.work.images import save_thumbnail
from pacs_node.work.quality import QualityFigures, RegionTally, find_uniform_regions
from unit_model.denoiser import Denoiser

logger = logging.getLogger(__name__)


class Interrupted(Exception):
    """The worker is shutting down: the job goes back to the queue as it is."""


class SeriesQuality(RegionTally):
    """The gate's figures over the chunks of one job: output against input in one uniform
    region per slice, found on the input, and what was removed on edges and flat tissue."""

    def add_chunk(self, hu_in: np.ndarray, hu_out: np.ndarray) -> None:
        self.add(hu_in, hu_out, find_uniform_regions(hu_in, per_slice=1))
        self.add_edges(hu_in, hu_out)

    def add_slices(self, hu_in: list[np.ndarray], hu_out: list[np.ndarray]) -> None:
        """Slices that may mix matrix sizes."""
        for shape in {h.shape for h in hu_in}:
            sel = [k for k, h in enumerate(hu_in) if h.shape == shape]
            self.add_chunk(np.stack([hu_in[k] for k in sel]), np.stack([hu_out[k] for k in sel]))


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


def denoise_slices(denoiser: Denoiser, hu: list[np.ndarray]) -> tuple[list[np.ndarray], float]:
    """Denoise slices that may mix matrix sizes (one batch per size); return the outputs in
    input order and the seconds spent in the network."""
    out: list[np.ndarray] = [np.empty(0)] * len(hu)
    seconds = 0.0
    for shape in {h.shape for h in hu}:
        sel = [k for k, h in enumerate(hu) if h.shape == shape]
        batch = np.stack([hu[k] for k in sel])
        t0 = time.perf_counter()
        res = denoiser.denoise_hu(batch)
        seconds += time.perf_counter() - t0
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


class SeriesProcessor:
    """Denoises the received instances of a claimed job into derived files."""

    def __init__(
        self,
        config: Config,
        jobs: JobStore,
        storage: Storage,
        denoiser: Denoiser,
        metrics: Metrics | None = None,
    ) -> None:
        self.config, self.jobs, self.storage = config, jobs, storage
        self.denoiser, self.metrics = denoiser, metrics

    def denoise(
        self, claim: Claim, stopping: threading.Event, name: str, quality: SeriesQuality
    ) -> int:
        """Denoise the received instances of the job, adding to ``quality`` (the series' figures,
        kept in the job table with each chunk); return how many there were. Raises Interrupted
        when ``stopping`` is set between chunks."""
        pending = self.jobs.pending_instances(claim, InstanceState.RECEIVED)
        if not pending:
            return 0
        chunk = max(self.denoiser.batch_size, 16)
        # Each chunk's derived files are encoded, written (fsync) and recorded on a helper thread
        # while the network works on the next chunk; one chunk in flight keeps the order. (The
        # quality figures are measured here, between chunks: beside the network's threads they
        # slowed it by more than they cost.)
        with ThreadPoolExecutor(1, thread_name_prefix=f"{name}-write") as writer:
            in_flight: Future[None] | None = None
            for start in range(0, len(pending), chunk):
                if stopping.is_set():
                    if in_flight is not None:
                        in_flight.result()
                    raise Interrupted
                sources, hu, ids = self._read_chunk(claim, pending[start : start + chunk])
                outputs, seconds = denoise_slices(self.denoiser, hu)
                quality.add_slices(hu, outputs)
                if self.metrics and hu:
                    self.metrics.observe_denoise(seconds, len(hu))
                middle = len(pending) // 2 - start  # the series' middle slice, if in this chunk
                if 0 <= middle < len(hu):
                    save_thumbnail(
                        self.storage.thumb_path(claim.job_id), hu[middle], outputs[middle]
                    )
                if in_flight is not None:
                    in_flight.result()  # its errors (e.g. LostClaim) surface here
                in_flight = writer.submit(
                    self._write_chunk, claim, ids, sources, outputs, quality.to_json()
                )
            if in_flight is not None:
                in_flight.result()
        return len(pending)

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
                self.jobs.mark_instance_failed(claim, iid, str(err))
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
        tally: str,
    ) -> None:
        done = [
            self._write_derived(claim, iid, src, res)
            for iid, src, res in zip(ids, sources, outputs, strict=True)
        ]
        self.jobs.mark_denoised(claim, done, self.denoiser.version_label, tally)

    def _write_derived(
        self, claim: Claim, iid: int, source: pydicom.Dataset, hu: np.ndarray
    ) -> tuple[int, str, str]:
        ds = derive_output(self.config, self.denoiser, source, hu)
        buf = io.BytesIO()
        # dcmwrite, not save_as: it converts a big-endian source to the derived instance's
        # little-endian syntax (save_as refuses to)
        pydicom.dcmwrite(buf, ds, enforce_file_format=True)
        path = self.storage.derived_path(claim.job_id, str(ds.SOPInstanceUID))
        self.storage.write_atomic(path, buf.getvalue())
        return iid, str(ds.SOPInstanceUID), str(path)


def denoise_folder(
    in_dir: Path, out_dir: Path, config: Config, denoiser: Denoiser
) -> dict[str, tuple[int, QualityFigures]]:
    """The worker's decode -> denoise -> derive path over a folder (no queue, no network).

    Writes ``out_dir/<derived series UID>/<derived SOP UID>.dcm``; returns per source series the
    instance count and the quality figures.
    """
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
            hu = [read_hu(ds) for ds in part]
            outputs, _ = denoise_slices(denoiser, hu)
            quality.add_slices(hu, outputs)
            for src, res in zip(part, outputs, strict=True):
                d = derive_output(config, denoiser, src, res)
                target = out_dir / str(d.SeriesInstanceUID) / f"{d.SOPInstanceUID}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                pydicom.dcmwrite(target, d, enforce_file_format=True)
        results[series] = (len(items), quality.figures())
    return results
