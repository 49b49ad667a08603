"""DICOM folders -> HU slices; unpaired and paired sampling and augmentation for training.

Series are read recursively (every transfer syntax pydicom + pylibjpeg decode) and converted to HU
with ``pacs_node.work.dicom_io``. Hold-out splits are by series (hence by patient), never by slice.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
import torch
import torch.nn.functional as F
from pydicom.errors import InvalidDicomError

from pacs_node.work.dicom_io import read_hu
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
    """Every CT series under ``root``, slices sorted along the patient z axis. A series is its
    SeriesInstanceUID in one folder: the same series copied to two folders (``synth --from
    --repeat`` keeps each regular dose's UIDs) counts twice."""
    groups: dict[tuple[str, Path], list[tuple[float, pydicom.Dataset, Path]]] = defaultdict(list)
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path)
        except (InvalidDicomError, OSError, EOFError):
            continue
        if "PixelData" not in ds or ds.get("Modality") not in ("CT", None):
            continue
        pos = ds.get("ImagePositionPatient")
        z = float(pos[2]) if pos else float(ds.get("InstanceNumber", 0) or 0)
        groups[(str(ds.SeriesInstanceUID), path.parent)].append((z, ds, path))
    out = []
    for (uid, _), items in groups.items():
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
    """Low/full-dose series of the same slices: in the same study folder (the LDCT layout)
    and of the same shape."""
    by_study = {(s.folder.parent, s.slices.shape): s for s in full}
    out = []
    for s in low:
        match = by_study.get((s.folder.parent, s.slices.shape))
        if match is not None and np.allclose(s.positions, match.positions, atol=1e-3):
            out.append((s, match))
    return out


Augment = Literal["flip", "dihedral"]


def augment(
    images: list[np.ndarray],
    crop: int,
    window: HUWindow,
    rng: np.random.Generator,
    mode: Augment = "flip",
) -> list[torch.Tensor]:
    """Slices of one shape -> [1, crop, crop] each in network units, all cut and turned alike:
    one random crop (or bicubic resize when the slice is smaller than ``crop``), a random
    horizontal flip (``flip``, the reference's) or one of the eight flips and quarter turns
    (``dihedral``), the fixed HU window."""
    h, w = images[0].shape
    t = torch.from_numpy(np.stack([np.asarray(x, dtype=np.float32) for x in images]))[:, None]
    if h < crop or w < crop:
        t = F.interpolate(t, size=(crop, crop), mode="bicubic", align_corners=False)
    else:
        y, x = int(rng.integers(0, h - crop + 1)), int(rng.integers(0, w - crop + 1))
        t = t[..., y : y + crop, x : x + crop]
    if rng.random() < 0.5:
        t = t.flip(-1)
    if mode == "dihedral":
        t = torch.rot90(t, int(rng.integers(4)), dims=(-2, -1))
    return list(window.to_network(t.contiguous()))


@dataclass
class Batch:
    """One training batch, [B, 1, crop, crop] each: low-dose crops, regular-dose crops drawn
    independently of them (unpaired), and for the low-dose crops that have one, the same crop
    of the same slice at regular dose (``paired`` says which)."""

    ld: torch.Tensor
    hd: torch.Tensor
    target: torch.Tensor
    paired: torch.Tensor  # bool [B]


class TrainingStream:
    """Crops for training. LD and HD slices are shuffled independently every epoch, the HD
    stream restarting when it runs out (as the reference does); an LD slice with a regular-dose
    partner (``targets``) also yields that partner's crop, cut alike. One epoch = one pass over
    the LD slices."""

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
        targets: list[np.ndarray | None] | None = None,
        mode: Augment = "flip",
    ) -> None:
        if not low or not full:
            raise ValueError("training needs both low-dose and full-dose slices")
        if targets is not None and len(targets) != len(low):
            raise ValueError("targets must pair up with the low-dose slices one to one")
        self.low, self.full = low, full
        self.targets = targets or [None] * len(low)
        self.crop, self.window, self.mode = crop, window, mode
        self.rng = np.random.default_rng(seed + 1000 * rank)
        self.rank, self.world = rank, world
        self.body_fraction = body_fraction
        self._hd_order: list[int] = []
        self._air = float(window.to_network(torch.tensor(-500.0)))

    def __len__(self) -> int:
        return len(self.low) // self.world

    @property
    def paired_slices(self) -> int:
        return sum(t is not None for t in self.targets)

    def _crop(self, images: list[np.ndarray]) -> list[torch.Tensor]:
        # Retry crops that are mostly air: they teach nothing about noise.
        for _ in range(5):
            ts = augment(images, self.crop, self.window, self.rng, self.mode)
            if self.body_fraction <= 0 or (ts[0] > self._air).float().mean() >= self.body_fraction:
                return ts
        return ts

    def _next_hd(self) -> np.ndarray:
        if not self._hd_order:
            self._hd_order = list(self.rng.permutation(len(self.full)))
        return self.full[self._hd_order.pop()]

    def epoch(self, batch_size: int) -> Iterator[Batch]:
        """Yields one epoch of batches."""
        order = self.rng.permutation(len(self.low))[self.rank :: self.world]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            ld, target, paired = [], [], []
            for i in order[start : start + batch_size]:
                partner = self.targets[i]
                crops = self._crop([self.low[i]] if partner is None else [self.low[i], partner])
                ld.append(crops[0])
                target.append(crops[-1])
                paired.append(partner is not None)
            hd = [self._crop([self._next_hd()])[0] for _ in range(len(ld))]
            yield Batch(torch.stack(ld), torch.stack(hd), torch.stack(target), torch.tensor(paired))
