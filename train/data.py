"""DICOM folders -> HU slices, unpaired sampling and augmentation for training.

Series are read recursively (every transfer syntax pydicom + pylibjpeg decode) and converted to HU
with ``pacs_node.dicom_io``. Hold-out splits are by series (hence by patient), never by slice.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError

from pacs_node.dicom_io import read_hu
from unit_model.transforms import HUWindow

logger = logging.getLogger(__name__)

LOW_DOSE_RE = re.compile(r"low[ _-]?dose", re.I)
FULL_DOSE_RE = re.compile(r"(full|regular|normal|high)[ _-]?dose", re.I)


@dataclass
class Series:
    uid: str
    patient: str
    folder: Path
    slices: np.ndarray  # float32 [N, H, W] HU, in slice order
    positions: list[float] = field(default_factory=list)

    @property
    def dose(self) -> str | None:
        name = self.folder.name
        if LOW_DOSE_RE.search(name):
            return "low"
        if FULL_DOSE_RE.search(name):
            return "full"
        return None


def read_series(root: Path) -> list[Series]:
    """Every CT series under ``root``, slices sorted along the patient z axis."""
    groups: dict[str, list[tuple[float, pydicom.Dataset, Path]]] = defaultdict(list)
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError):
            continue
        if "PixelData" not in ds or ds.get("Modality") not in ("CT", None):
            continue
        pos = ds.get("ImagePositionPatient")
        z = float(pos[2]) if pos else float(ds.get("InstanceNumber", 0) or 0)
        groups[str(ds.SeriesInstanceUID)].append((z, ds, path))
    out = []
    for uid, items in groups.items():
        items.sort(key=lambda t: t[0])
        slices = np.stack([read_hu(ds) for _, ds, _ in items])
        first = items[0]
        out.append(
            Series(
                uid,
                str(first[1].get("PatientID", "")),
                first[2].parent,
                slices,
                [z for z, _, _ in items],
            )
        )
    if not out:
        raise FileNotFoundError(f"no CT series found under {root}")
    return sorted(out, key=lambda s: (s.patient, str(s.folder)))


def split_by_dose(series: list[Series]) -> tuple[list[Series], list[Series]]:
    """Low- and full-dose series by their folder names (the LDCT-and-Projection-data layout)."""
    low = [s for s in series if s.dose == "low"]
    full = [s for s in series if s.dose == "full"]
    return low, full


def pairs(low: list[Series], full: list[Series]) -> list[tuple[Series, Series]]:
    """Low/full-dose series of the same patient and shape, for evaluation only."""
    by_patient = {(s.patient, s.slices.shape): s for s in full}
    out = []
    for s in low:
        match = by_patient.get((s.patient, s.slices.shape))
        if match is not None:
            out.append((s, match))
    return out


def augment(hu: np.ndarray, crop: int, window: HUWindow, rng: np.random.Generator) -> torch.Tensor:
    """One slice -> [1, crop, crop] in network units: random crop (or bicubic resize when the
    slice is smaller than ``crop``), random horizontal flip, fixed HU window."""
    h, w = hu.shape
    t = torch.from_numpy(np.ascontiguousarray(hu, dtype=np.float32))[None, None]
    if h < crop or w < crop:
        t = F.interpolate(t, size=(crop, crop), mode="bicubic", align_corners=False)
    else:
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        t = t[..., y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        t = t.flip(-1)
    return window.to_network(t)[0]


class UnpairedStream:
    """LD and HD slices, each shuffled independently every epoch; the HD stream restarts when
    it runs out (as the reference does). One epoch = one pass over the LD slices."""

    def __init__(
        self,
        low: list[np.ndarray],
        full: list[np.ndarray],
        crop: int,
        window: HUWindow,
        seed: int = 0,
        rank: int = 0,
        world: int = 1,
        body_fraction: float = 0.0,
    ) -> None:
        if not low or not full:
            raise ValueError("training needs both low-dose and full-dose slices")
        self.low, self.full = low, full
        self.crop, self.window = crop, window
        self.rng = np.random.default_rng(seed + 1000 * rank)
        self.rank, self.world = rank, world
        self.body_fraction = body_fraction
        self._hd_order: list[int] = []

    def __len__(self) -> int:
        return len(self.low) // self.world

    def _crop(self, hu: np.ndarray) -> torch.Tensor:
        # Retry crops that are mostly air: they teach nothing about noise.
        for _ in range(5):
            t = augment(hu, self.crop, self.window, self.rng)
            if (
                self.body_fraction <= 0
                or (t > self.window.to_network(torch.tensor(-500.0))).float().mean()
                >= self.body_fraction
            ):
                return t
        return t

    def _next_hd(self) -> np.ndarray:
        if not self._hd_order:
            self._hd_order = list(self.rng.permutation(len(self.full)))
        return self.full[self._hd_order.pop()]

    def epoch(self, batch_size: int):
        """Yields (ld, hd) batches, [B, 1, crop, crop] each, for one epoch."""
        order = self.rng.permutation(len(self.low))[self.rank :: self.world]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            ld = torch.stack([self._crop(self.low[i]) for i in idx])
            hd = torch.stack([self._crop(self._next_hd()) for _ in idx])
            yield ld, hd
