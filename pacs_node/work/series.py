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
from collections import defaultdict, deque
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
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

LOOK_AGAIN_SECONDS = 0.1  # while the network has room for more of a series still arriving


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


class Submitted:
    """Slices that may mix matrix sizes, handed to the network (one submission per size)."""

    def __init__(self, denoiser: Denoiser, hu: list[np.ndarray]) -> None:
        self.count = len(hu)
        self._parts = []
        for shape in {h.shape for h in hu}:
            sel = [k for k, h in enumerate(hu) if h.shape == shape]
            self._parts.append((sel, denoiser.submit_hu(np.stack([hu[k] for k in sel]))))

    def ready(self, timeout: float) -> bool:
        """Whether the outputs are there, waiting up to ``timeout`` seconds for them."""
        return not wait([f for _, f in self._parts], timeout).not_done

    def outputs(self) -> list[np.ndarray]:
        """The outputs in input order, once they are there."""
        out: list[np.ndarray] = [np.empty(0)] * self.count
        for sel, future in self._parts:
            for k, res in zip(sel, future.result(), strict=True):
                out[k] = res
        return out


def denoise_slices(denoiser: Denoiser, hu: list[np.ndarray]) -> list[np.ndarray]:
    """Denoise slices that may mix matrix sizes; the outputs in input order."""
    return Submitted(denoiser, hu).outputs()


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


_Pending = list[tuple[int, str, str | None]]  # (instance id, path, derived path)
_Read = tuple[list[pydicom.Dataset], list[np.ndarray], list[int]]  # sources, HU, instance ids


def _chunks(pending: _Pending, size: int) -> list[tuple[_Pending, int | None]]:
    """``pending`` in chunks of ``size``, each with the index in it of the middle slice of
    ``pending`` (the thumbnail's), or None."""
    middle = len(pending) // 2
    return [
        (pending[start : start + size], middle - start if start <= middle < start + size else None)
        for start in range(0, len(pending), size)
    ]


@dataclass
class _Queued:
    """A chunk whose slices wait in the network's queue."""

    middle: int | None  # where the middle slice of what was pending is in it, if it is
    sources: list[pydicom.Dataset]
    hu: list[np.ndarray]
    ids: list[int]
    network: Submitted
    submitted: float = field(default_factory=time.perf_counter)


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
        self._last_done = 0.0  # when the network last finished a chunk (throughput metric)

    def denoise(
        self, claim: Claim, stopping: threading.Event, name: str, quality: SeriesQuality
    ) -> int:
        """Denoise the received instances of the job, adding to ``quality`` (the series' figures,
        kept in the job table with each chunk); return how many there were. Raises Interrupted
        when ``stopping`` is set between chunks, once the chunk already queued is recorded."""
        pending = self.jobs.pending_instances(claim, InstanceState.RECEIVED)
        if not pending:
            return 0
        chunk = max(self.denoiser.batch_size, 16)
        seen = {iid for iid, _, _ in pending}
        parts = deque(_chunks(pending, chunk))
        # The network works on one chunk with the next queued behind it, read and submitted
        # meanwhile; when the known chunks run out, what arrived since is appended, looked for
        # every LOOK_AGAIN_SECONDS while the network has room (a series still arriving is one
        # run, not a round per arrival, and no stream waits for the chunk before it to end).
        # A helper thread measures each denoised chunk's quality figures, then encodes, writes
        # (fsync) and records its derived files; one chunk in flight there keeps the order. On
        # the CPU the network runs as single-threaded streams (unit_model.denoiser), which lose
        # only the share that reading and writing take.
        network: deque[_Queued] = deque()
        in_flight: Future[None] | None = None

        def room() -> bool:  # the network holds less than two chunks' worth
            return sum(q.network.count for q in network) < 2 * chunk

        with ThreadPoolExecutor(1, thread_name_prefix=f"{name}-write") as writer:
            while not stopping.is_set():
                while room():
                    if not parts:
                        more = self.jobs.pending_instances(claim, InstanceState.RECEIVED)
                        more = [p for p in more if p[0] not in seen]
                        seen.update(iid for iid, _, _ in more)
                        parts.extend(_chunks(more, chunk))
                    if not parts:
                        break
                    part, middle = parts.popleft()
                    sources, hu, ids = self._read_chunk(claim, part)
                    network.append(_Queued(middle, sources, hu, ids, Submitted(self.denoiser, hu)))
                if not network:
                    break
                if room() and not network[0].network.ready(LOOK_AGAIN_SECONDS):
                    continue  # the network could take more: look for new arrivals again
                in_flight = self._finish(claim, network.popleft(), in_flight, writer, quality)
            while network:  # stopping: what the network already has is kept
                in_flight = self._finish(claim, network.popleft(), in_flight, writer, quality)
            if in_flight is not None:
                in_flight.result()
        if parts:
            raise Interrupted
        return len(seen)

    def _finish(
        self,
        claim: Claim,
        queued: _Queued,
        in_flight: Future[None] | None,
        writer: ThreadPoolExecutor,
        quality: SeriesQuality,
    ) -> Future[None]:
        """Wait for a queued chunk's outputs and hand them to ``writer`` after ``in_flight``."""
        started = max(queued.submitted, self._last_done)
        outputs = queued.network.outputs()
        self._last_done = time.perf_counter()
        if self.metrics and outputs:
            self.metrics.observe_denoise(self._last_done - started, len(outputs))
        m = queued.middle
        if m is not None and m < len(outputs):  # (an unreadable instance may shorten a chunk)
            save_thumbnail(self.storage.thumb_path(claim.job_id), queued.hu[m], outputs[m])
        if in_flight is not None:
            in_flight.result()  # its errors (e.g. LostClaim) surface here
        return writer.submit(
            self._write_chunk, claim, queued.ids, queued.sources, queued.hu, outputs, quality
        )

    def _read_chunk(self, claim: Claim, part: _Pending) -> _Read:
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
        hu: list[np.ndarray],
        outputs: list[np.ndarray],
        quality: SeriesQuality,
    ) -> None:
        quality.add_slices(hu, outputs)
        done = [
            self._write_derived(claim, iid, src, res)
            for iid, src, res in zip(ids, sources, outputs, strict=True)
        ]
        self.jobs.mark_denoised(claim, done, self.denoiser.version_label, quality.to_json())

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
            outputs = denoise_slices(denoiser, hu)
            quality.add_slices(hu, outputs)
            for src, res in zip(part, outputs, strict=True):
                d = derive_output(config, denoiser, src, res)
                target = out_dir / str(d.SeriesInstanceUID) / f"{d.SOPInstanceUID}.dcm"
                target.parent.mkdir(parents=True, exist_ok=True)
                pydicom.dcmwrite(target, d, enforce_file_format=True)
        results[series] = (len(items), quality.figures())
    return results
