"""Synthetic paired regular-dose / low-dose CT, written as DICOM series.

Anatomy: random procedural body phantoms (outline, fat and muscle layers, lungs, spine and ribs,
organs and vessels with realistic HU and texture), plus pydicom's ``CT_small.dcm`` and
scikit-image's Shepp-Logan phantom mapped to HU.

Low dose: projection-domain noise insertion (Yu et al., Med. Phys. 39(5), 2012). For line
integrals ``p`` of the regular-dose image, dose fraction ``a``, incident photons ``I0`` and
electronic noise variance ``Ne``::

    p_LD = p + sqrt((1-a)/a * e^p/I0 * (1 + (1+a)/a * Ne * e^p/I0)) * N(0, 1)
    LD   = ND + FBP(p_LD - p)

with ``skimage.transform.radon`` / ``iradon`` (720 views over 180 degrees). The filter of the
reconstruction (``ramp``, ``shepp-logan``, ``cosine``, ``hamming``, ``hann``: sharp to soft) sets
the noise texture, as a scanner's kernel does; a mix of them, and a range of dose fractions, can
be drawn per series, so that a model does not learn one noise texture and one level only.

Calibration: ``I0 = I0_DEFAULT`` was chosen so that a quarter dose (a = 0.25) adds noise of
15-20 HU SD in a uniform soft-tissue region at the centre of a 320 x 240 mm body on a 512 x 512
slice with a 380 mm field of view (``python -m train synth --calibrate`` reprints the figure;
``tests/test_synth.py`` checks it). Noise scales with pixel size: smaller matrices over the same
field of view see less noise per pixel.

:func:`synthesize_from` does the same to a site's own routine-dose series (a PACS export): each
CT series is the regular dose, with its own pixel spacing and field of view.

Output layout, as the LDCT-and-Projection-data collection::

    OUT/<case>/<study>/1.000000-Full dose images-<n>/<i>.dcm
    OUT/<case>/<study>/1.000000-Low Dose Images-<n>/<i>.dcm
"""

from __future__ import annotations

import copy
import datetime as dt
import logging
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage
from skimage.transform import iradon, radon, resize

from pacs_node.storage import valid_uid
from pacs_node.work import dicom_io

logger = logging.getLogger(__name__)

MU_WATER_PER_MM = 0.0192  # linear attenuation of water at ~70 keV effective energy
I0_DEFAULT = 6.0e6
NE_DEFAULT = 8.0
VIEWS = 720
FOV_MM = 380.0
UID_ROOT = "1.2.826.0.1.3680043.10.1045."  # pydicom's example root + a project suffix


FILTERS = ("ramp", "shepp-logan", "cosine", "hamming", "hann")


@dataclass(frozen=True)
class DoseChoice:
    """Dose fractions to draw from, one per series: a value ``"0.25"``, a range ``"0.15:0.4"``
    (uniform) or a list ``"0.15,0.25,0.5"``."""

    low: float
    high: float
    values: tuple[float, ...] = ()

    @classmethod
    def parse(cls, text: str) -> DoseChoice:
        try:
            if ":" in text:
                a, b = (float(x) for x in text.split(":"))
                choice = cls(min(a, b), max(a, b))
            else:
                values = tuple(float(x) for x in text.split(","))
                choice = cls(min(values), max(values), values)
        except ValueError:
            raise ValueError(
                f"dose {text!r}: give a fraction (0.25), a range (0.15:0.4) or a list "
                "(0.15,0.25,0.5)"
            ) from None
        if not 0 < choice.low <= choice.high < 1:
            raise ValueError(f"dose {text!r}: fractions must lie in (0, 1)")
        return choice

    def draw(self, rng: np.random.Generator) -> float:
        if self.values:
            return float(self.values[int(rng.integers(len(self.values)))])
        return float(rng.uniform(self.low, self.high)) if self.high > self.low else self.low


def parse_filters(text: str) -> tuple[str, ...]:
    """``"ramp,hann"`` -> the reconstruction filters to draw from, one per series."""
    names = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    bad = [f for f in names if f not in FILTERS]
    if bad or not names:
        raise ValueError(f"filter {text!r}: choose from {', '.join(FILTERS)}")
    return names


@dataclass(frozen=True)
class NoiseModel:
    dose: float = 0.25
    i0: float = I0_DEFAULT
    electronic_noise: float = NE_DEFAULT
    views: int = VIEWS
    filter: str = "ramp"

    def describe(self) -> str:
        return f"dose {self.dose:.3g}, {self.filter} filter"

    def low_dose(self, hu: np.ndarray, pixel_mm: float, rng: np.random.Generator) -> np.ndarray:
        """The low-dose counterpart of the regular-dose slice ``hu`` (float HU, square)."""
        a = self.dose
        if not 0 < a < 1:
            raise ValueError(f"dose must be in (0, 1), got {a}")
        n = hu.shape[0]
        mu = np.clip(MU_WATER_PER_MM * (1 + hu.astype(np.float64) / 1000.0), 0, None)
        yy, xx = np.mgrid[:n, :n] - (n - 1) / 2
        mu[xx**2 + yy**2 > (n / 2) ** 2] = 0  # radon's reconstruction circle
        theta = np.linspace(0.0, 180.0, self.views, endpoint=False)
        with warnings.catch_warnings():  # its circle test is stricter than the mask above
            warnings.simplefilter("ignore", UserWarning)
            p = radon(mu * pixel_mm, theta, circle=True)
        q = np.exp(p) / self.i0
        var = (1 - a) / a * q * (1 + (1 + a) / a * self.electronic_noise * q)
        dp = np.sqrt(var) * rng.standard_normal(p.shape)
        dmu = iradon(dp, theta, circle=True, filter_name=self.filter, output_size=n) / pixel_mm
        return (hu + dmu / MU_WATER_PER_MM * 1000.0).astype(np.float32)


def _ellipse(
    shape: tuple[int, int], cx: float, cy: float, rx: float, ry: float, angle: float = 0.0
) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]].astype(np.float32)
    x, y = xx - cx, yy - cy
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * x + s * y, -s * x + c * y
    return bool_((u / max(rx, 0.5)) ** 2 + (v / max(ry, 0.5)) ** 2 <= 1.0)


def bool_(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=bool)


def _texture(
    shape: tuple[int, int], rng: np.random.Generator, sigma: float, amp: float
) -> np.ndarray:
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return (field / (field.std() + 1e-9) * amp).astype(np.float32)


@dataclass
class BodyCase:
    """Random body-phantom parameters for one case (a series of slices)."""

    rx: float
    ry: float
    fat_mm: float
    chest: bool
    liver_hu: float
    seed: int

    @classmethod
    def random(cls, rng: np.random.Generator) -> BodyCase:
        return cls(
            rx=float(rng.uniform(130, 185)),
            ry=float(rng.uniform(90, 135)),
            fat_mm=float(rng.uniform(5, 35)),
            chest=bool(rng.random() < 0.5),
            liver_hu=float(rng.uniform(50, 70)),
            seed=int(rng.integers(2**31)),
        )

    def slice_hu(self, n: int, pixel_mm: float, z: float) -> np.ndarray:
        """Regular-dose slice at relative height ``z`` in [0, 1], float32 HU."""
        rng = np.random.default_rng(self.seed + int(z * 1000))
        px = 1.0 / pixel_mm
        c = (n - 1) / 2
        shape = (n, n)
        img = np.full(shape, -1000.0, np.float32)
        body = _ellipse(shape, c, c, self.rx * px, self.ry * px)
        img[body] = -100.0 + _texture(shape, rng, 4, 8)[body]  # subcutaneous fat
        inner_rx, inner_ry = self.rx - self.fat_mm, self.ry - self.fat_mm
        muscle = _ellipse(shape, c, c, inner_rx * px, inner_ry * px)
        img[muscle] = 50.0 + _texture(shape, rng, 3, 10)[muscle]
        cavity = _ellipse(shape, c, c - 5 * px, (inner_rx - 12) * px, (inner_ry - 14) * px)
        img[cavity] = -90.0 + _texture(shape, rng, 6, 10)[cavity]  # visceral fat
        wob = 1.0 + 0.08 * np.sin(z * 2 * np.pi)
        if self.chest:
            for side in (-1, 1):
                lung = _ellipse(
                    shape,
                    c + side * 0.45 * inner_rx * px,
                    c - 0.05 * inner_ry * px,
                    0.38 * inner_rx * px * wob,
                    0.72 * inner_ry * px,
                    side * 0.15,
                )
                img[lung] = -860.0 + _texture(shape, rng, 2, 25)[lung]
                for _ in range(25):  # lung vessels
                    vx = c + side * 0.45 * inner_rx * px + rng.uniform(-0.3, 0.3) * inner_rx * px
                    vy = c + rng.uniform(-0.5, 0.4) * inner_ry * px
                    v = _ellipse(shape, vx, vy, rng.uniform(0.8, 3) * px, rng.uniform(0.8, 3) * px)
                    img[v & lung] = 40.0
            heart = _ellipse(
                shape,
                c + 0.1 * inner_rx * px,
                c - 0.1 * inner_ry * px,
                0.28 * inner_rx * px,
                0.4 * inner_ry * px,
                0.4,
            )
            img[heart] = 45.0 + _texture(shape, rng, 5, 6)[heart]
        else:
            liver = _ellipse(
                shape,
                c - 0.35 * inner_rx * px,
                c - 0.05 * inner_ry * px,
                0.45 * inner_rx * px * wob,
                0.6 * inner_ry * px,
                0.3,
            )
            img[liver] = self.liver_hu + _texture(shape, rng, 5, 5)[liver]
            spleen = _ellipse(
                shape,
                c + 0.55 * inner_rx * px,
                c - 0.15 * inner_ry * px,
                0.18 * inner_rx * px,
                0.3 * inner_ry * px,
                -0.4,
            )
            img[spleen] = 45.0 + _texture(shape, rng, 5, 5)[spleen]
            for side in (-1, 1):
                kidney = _ellipse(
                    shape,
                    c + side * 0.4 * inner_rx * px,
                    c + 0.45 * inner_ry * px,
                    0.12 * inner_rx * px,
                    0.2 * inner_ry * px,
                    side * 0.5,
                )
                img[kidney] = 150.0 + _texture(shape, rng, 3, 10)[kidney]
            for _ in range(4):  # lesions
                lx = c - 0.35 * inner_rx * px + rng.uniform(-0.2, 0.2) * inner_rx * px
                ly = c + rng.uniform(-0.3, 0.2) * inner_ry * px
                les = _ellipse(shape, lx, ly, rng.uniform(3, 9) * px, rng.uniform(3, 9) * px)
                img[les & (img > 30)] = self.liver_hu - rng.uniform(15, 40)
        aorta = _ellipse(
            shape, c + 0.05 * inner_rx * px, c + 0.35 * inner_ry * px, 11 * px, 11 * px
        )
        img[aorta] = 180.0 + _texture(shape, rng, 2, 4)[aorta]
        ivc = _ellipse(shape, c - 0.15 * inner_rx * px, c + 0.3 * inner_ry * px, 9 * px, 7 * px)
        img[ivc] = 120.0
        vert_y = c + 0.62 * inner_ry * px
        vert = _ellipse(shape, c, vert_y, 18 * px, 16 * px)
        img[vert] = 250.0 + _texture(shape, rng, 2, 40)[vert]
        cortex = vert & ~_ellipse(shape, c, vert_y, 15 * px, 13 * px)
        img[cortex] = 900.0
        canal = _ellipse(shape, c, vert_y + 20 * px, 6 * px, 6 * px)
        img[canal] = 20.0
        if self.chest:
            for k in range(10):  # ribs just inside the muscle wall
                t = np.pi * (0.15 + 0.7 * k / 9)
                for side in (-1, 1):
                    rx_ = c + side * np.cos(t) * (inner_rx - 4) * px
                    ry_ = c - np.sin(t) * (inner_ry - 4) * px + 0.3 * inner_ry * px * (k % 2)
                    rib = _ellipse(shape, rx_, ry_, 5 * px, 3.5 * px, t)
                    img[rib & muscle] = 700.0
        return img.astype(np.float32)


def _constant(img: np.ndarray, z: float) -> np.ndarray:
    return img


def shepp_logan_hu(n: int) -> np.ndarray:
    from skimage.data import shepp_logan_phantom

    v = resize(shepp_logan_phantom(), (n, n), order=1, anti_aliasing=True)
    return np.interp(v, [0, 0.1, 0.2, 0.3, 0.4, 1.0], [-1000, 0, 30, 60, 90, 1000]).astype(
        np.float32
    )


def ct_small_hu(n: int) -> np.ndarray:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        raise FileNotFoundError("pydicom's CT_small.dcm test file is not installed")
    hu = dicom_io.read_hu(pydicom.dcmread(path))
    return resize(hu, (n, n), order=3, preserve_range=True, anti_aliasing=True).astype(np.float32)


def ct_dataset(
    hu: np.ndarray,
    *,
    study: dict[str, str],
    series_uid: str,
    series_number: int,
    description: str,
    index: int,
    pixel_mm: float,
    thickness_mm: float,
    frame_uid: str,
) -> Dataset:
    """A CT Image Storage data set holding ``hu`` as unsigned 12-bit with intercept -1024."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study["date"]
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = "120000"
    ds.AccessionNumber = ""
    ds.Modality = "CT"
    ds.Manufacturer = "ldct-pacs-node synth"
    ds.ReferringPhysicianName = ""
    ds.SeriesDescription = description
    ds.PatientName = study["patient_name"]
    ds.PatientID = study["patient_id"]
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.BodyPartExamined = study.get("body_part", "ABDOMEN")
    ds.PatientPosition = "HFS"
    ds.SliceThickness = f"{thickness_mm:g}"
    ds.KVP = "120"
    ds.StudyInstanceUID = study["uid"]
    ds.SeriesInstanceUID = series_uid
    ds.StudyID = "1"
    ds.SeriesNumber = series_number
    ds.AcquisitionNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImagePositionPatient = [
        f"{-pixel_mm * hu.shape[1] / 2:.3f}",
        f"{-pixel_mm * hu.shape[0] / 2:.3f}",
        f"{-index * thickness_mm:.3f}",
    ]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = frame_uid
    ds.PositionReferenceIndicator = ""
    ds.SliceLocation = f"{-index * thickness_mm:.3f}"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = hu.shape
    ds.PixelSpacing = [f"{pixel_mm:.6g}", f"{pixel_mm:.6g}"]
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = dicom_io.hu_to_stored(hu, ds).tobytes()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    return ds


def synthesize(
    out: Path,
    *,
    cases: int,
    dose: float | DoseChoice = 0.25,
    filters: tuple[str, ...] = ("ramp",),
    seed: int = 0,
    size: int = 512,
    slices: int = 8,
    fov_mm: float = FOV_MM,
    thickness_mm: float = 1.0,
    extras: bool = True,
    i0: float = I0_DEFAULT,
) -> list[Path]:
    """Write ``cases`` paired series under ``out``; return the case folders.

    Each case draws its dose fraction from ``dose`` and its reconstruction filter from
    ``filters`` (from a generator of its own, so a seed gives the same anatomy and noise
    whatever the choices). With ``extras``, two more cases: Shepp-Logan and pydicom's CT_small
    (slices repeated with independent noise).
    """
    rng = np.random.default_rng(seed)
    choices = np.random.default_rng([seed, 1])
    doses = dose if isinstance(dose, DoseChoice) else DoseChoice(dose, dose)
    pixel_mm = fov_mm / size
    kinds: list[str] = [f"body{i}" for i in range(cases)]
    if extras:
        kinds += ["shepplogan", "ctsmall"]
    folders = []
    for k, kind in enumerate(kinds):
        case_id = f"S{seed:03d}{k:03d}"
        study = {
            "uid": generate_uid(UID_ROOT),
            "date": (dt.date(2020, 1, 1) + dt.timedelta(days=k)).strftime("%Y%m%d"),
            "patient_name": f"SYNTH^{case_id}",
            "patient_id": case_id,
        }
        frame_uid = generate_uid(UID_ROOT)
        anatomy: Callable[[float], np.ndarray]
        if kind.startswith("body"):
            body = BodyCase.random(rng)
            study["body_part"] = "CHEST" if body.chest else "ABDOMEN"
            anatomy = partial(body.slice_hu, size, pixel_mm)
        else:
            fixed = shepp_logan_hu(size) if kind == "shepplogan" else ct_small_hu(size)
            study["body_part"] = "HEAD" if kind == "shepplogan" else "ABDOMEN"
            anatomy = partial(_constant, fixed)
        case_dir = out / case_id / f"{study['date']}-synthetic"
        nd_uid, ld_uid = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
        nd_dir = case_dir / f"1.000000-Full dose images-{k:05d}"
        ld_dir = case_dir / f"1.000000-Low Dose Images-{k:05d}"
        nd_dir.mkdir(parents=True, exist_ok=True)
        ld_dir.mkdir(parents=True, exist_ok=True)
        noise = NoiseModel(
            dose=doses.draw(choices),
            i0=i0,
            filter=filters[int(choices.integers(len(filters)))],
        )
        for i in range(slices):
            nd = anatomy(i / max(slices - 1, 1))
            ld = noise.low_dose(nd, pixel_mm, rng)
            for hu, uid, number, desc, folder in (
                (nd, nd_uid, 2, "Full dose images", nd_dir),
                (ld, ld_uid, 3, f"Low Dose Images ({noise.describe()})", ld_dir),
            ):
                ds = ct_dataset(
                    hu,
                    study=study,
                    series_uid=uid,
                    series_number=number,
                    description=desc,
                    index=i,
                    pixel_mm=pixel_mm,
                    thickness_mm=thickness_mm,
                    frame_uid=frame_uid,
                )
                ds.save_as(folder / f"1-{i + 1:03d}.dcm", enforce_file_format=True)
        logger.info("case %s (%s): %d slices, %s", case_id, kind, slices, noise.describe())
        folders.append(out / case_id)
    return folders


# -- a site's own routine-dose series -------------------------------------------------------------


def insert_noise(
    hu: np.ndarray,
    pixel_mm: float,
    noise: NoiseModel,
    rng: np.random.Generator,
    reconstruction_diameter_mm: float | None = None,
) -> np.ndarray:
    """The simulated low dose of one regular-dose slice of any shape, float32 HU.

    The slice is centred on a square canvas. A targeted reconstruction (an image that covers
    only part of its ``reconstruction_diameter_mm``) is embedded in water out to that diameter,
    so the rays cross a body of about the scanned size rather than the crop alone.
    """
    rows, cols = hu.shape
    n = max(rows, cols)
    fill = -1000.0
    if reconstruction_diameter_mm and reconstruction_diameter_mm > 1.05 * n * pixel_mm:
        n = int(np.ceil(reconstruction_diameter_mm / pixel_mm))
        fill = 0.0
    canvas = np.full((n, n), fill, np.float32)
    y0, x0 = (n - rows) // 2, (n - cols) // 2
    canvas[y0 : y0 + rows, x0 : x0 + cols] = hu
    added = noise.low_dose(canvas, pixel_mm, rng) - canvas
    return (hu + added[y0 : y0 + rows, x0 : x0 + cols]).astype(np.float32)


@dataclass
class FromSummary:
    """What :func:`synthesize_from` did."""

    series: int = 0
    slices: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (file, reason)

    def reasons(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for _, why in self.skipped:
            key = why.split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        return counts


def _skip_reason(ds: Dataset) -> str | None:
    """Why a header cannot be a regular-dose CT slice to simulate from; None if it can."""
    modality = str(ds.get("Modality", "") or "")
    if modality != "CT":
        return f"modality {modality or 'missing'}, not CT"
    if "LOCALIZER" in [str(v).upper() for v in (ds.get("ImageType") or [])]:
        return "localizer (ImageType LOCALIZER)"
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return "multi-frame image (not supported)"
    if not ds.get("Rows") or not ds.get("Columns"):
        return "no image (Rows/Columns missing)"
    spacing = ds.get("PixelSpacing")
    if not spacing or len(spacing) != 2 or float(spacing[0]) <= 0:
        return "no usable PixelSpacing"
    if not valid_uid(str(ds.get("SeriesInstanceUID", ""))):
        return "no valid SeriesInstanceUID"
    return None


def scan_series(src: Path, summary: FromSummary) -> dict[str, list[tuple[float, Path]]]:
    """CT slices under ``src`` by series, sorted along z; everything else into ``summary``."""
    from pydicom.errors import InvalidDicomError

    groups: dict[str, list[tuple[float, Path]]] = {}
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        name = str(path.relative_to(src))
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as err:
            summary.skipped.append((name, f"unreadable: not a DICOM file ({type(err).__name__})"))
            continue
        why = _skip_reason(ds)
        if why is not None:
            summary.skipped.append((name, why))
            continue
        pos = ds.get("ImagePositionPatient")
        z = float(pos[2]) if pos and len(pos) == 3 else float(ds.get("InstanceNumber", 0) or 0)
        groups.setdefault(str(ds.SeriesInstanceUID), []).append((z, path))
    for items in groups.values():
        items.sort(key=lambda t: t[0])
    return groups


def low_dose_dataset(
    source: Dataset, hu: np.ndarray, noise: NoiseModel, series_uid: str
) -> Dataset:
    """``source`` with ``hu`` as its pixels, labelled as a simulated low dose of it: a new
    series, DERIVED, Explicit VR Little Endian whatever the source's transfer syntax."""
    ds = copy.deepcopy(source)
    stored = dicom_io.hu_to_stored(hu, source)
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = generate_uid(UID_ROOT)
    ds.SeriesDescription = f"Low Dose Images ({noise.describe()})"[:64]
    image_type = [str(v) for v in (source.get("ImageType") or ["ORIGINAL", "PRIMARY"])]
    ds.ImageType = ["DERIVED", *image_type[1:]]
    ds.ImageComments = (
        f"Simulated low dose ({noise.describe()}) by projection-domain noise insertion "
        "(Yu et al. 2012) into a regular-dose image"
    )
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    for elem in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if elem in ds:
            delattr(ds, elem)
    ds.file_meta = copy.deepcopy(source.file_meta)
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def _from_series(
    job: tuple[int, int, list[Path], Path, Path, DoseChoice, tuple[str, ...], int, float],
) -> tuple[int, list[tuple[str, str]]]:
    """One source series -> its case folder (regular dose copied, low dose simulated); ``r``
    numbers the independent simulations of the same series."""
    k, r, paths, src, out, doses, filters, seed, i0 = job
    choices = np.random.default_rng([seed, k, r, 1])
    rng = np.random.default_rng([seed, k, r, 2])
    noise = NoiseModel(
        dose=doses.draw(choices), i0=i0, filter=filters[int(choices.integers(len(filters)))]
    )
    skipped: list[tuple[str, str]] = []
    case = out / (f"R{k:05d}" if not r else f"R{k:05d}-{r}") / "study"
    nd_dir = case / f"1.000000-Full dose images-{k:05d}"
    ld_dir = case / f"1.000000-Low Dose Images-{k:05d}"
    ld_uid = generate_uid(UID_ROOT)
    shape: tuple[int, ...] | None = None
    written = 0
    for i, path in enumerate(paths):
        name = str(path.relative_to(src))
        try:
            ds = pydicom.dcmread(path)
            hu = dicom_io.read_hu(ds)
        except Exception as err:  # an undecodable or damaged slice: skip it, say why
            skipped.append((name, f"unreadable pixel data: {err}"))
            continue
        if shape is None:
            shape = hu.shape
        elif hu.shape != shape:
            skipped.append((name, f"matrix {hu.shape} differs from its series' {shape}"))
            continue
        pixel_mm = float(np.mean([float(v) for v in ds.PixelSpacing]))
        diameter = ds.get("ReconstructionDiameter")
        ld = insert_noise(hu, pixel_mm, noise, rng, float(diameter) if diameter else None)
        nd_dir.mkdir(parents=True, exist_ok=True)
        ld_dir.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, nd_dir / f"{i + 1:05d}.dcm")
        pydicom.dcmwrite(
            ld_dir / f"{i + 1:05d}.dcm",
            low_dose_dataset(ds, ld, noise, ld_uid),
            enforce_file_format=True,
        )
        written += 1
    logger.info("series %d%s: %d slices, %s", k, f"-{r}" if r else "", written, noise.describe())
    return written, skipped


def synthesize_from(
    src: Path,
    out: Path,
    *,
    dose: DoseChoice,
    filters: tuple[str, ...] = ("ramp",),
    seed: int = 0,
    i0: float = I0_DEFAULT,
    workers: int = 1,
    repeat: int = 1,
    progress: bool = True,
) -> FromSummary:
    """Every CT series under ``src`` as a regular dose, with a simulated low dose beside it, in
    the layout ``fit`` and ``evaluate`` read (``out/R<k>/study/{Full dose,Low Dose}...``).

    Non-CT files, localizers, multi-frame images and unreadable files are skipped, each with a
    one-line reason (logged, and listed in the returned summary). Series are numbered in the
    order of their first file's path; folder names never come from the files' contents. With
    ``repeat`` > 1 each series is simulated that many times, independently, each a case of its
    own (more low-dose noise from few regular-dose scans).
    """
    from concurrent.futures import ProcessPoolExecutor

    from rich.progress import Progress

    summary = FromSummary()
    groups = scan_series(src, summary)
    for name, why in summary.skipped:
        logger.warning("skipped %s: %s", name, why)
    jobs = [
        (k, r, [p for _, p in items], src, out, dose, filters, seed, i0)
        for k, items in enumerate(groups.values())
        for r in range(repeat)
    ]
    total = sum(len(j[2]) for j in jobs)
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("simulating low dose", total=total)
        if workers > 1:
            pool = ProcessPoolExecutor(workers)
            results = pool.map(_from_series, jobs)
        else:
            pool = None
            results = map(_from_series, jobs)
        try:
            for job, (written, skipped) in zip(jobs, results, strict=True):
                for name, why in skipped:
                    logger.warning("skipped %s: %s", name, why)
                summary.skipped.extend(skipped)
                summary.series += written > 0
                summary.slices += written
                bar.advance(task, len(job[2]))
        finally:
            if pool is not None:
                pool.shutdown()
    return summary


def simple_series(
    folder: Path,
    n: int = 10,
    size: int = 64,
    seed: int = 0,
    noise_sd: float = 0.0,
    patient_name: str = "SYNTH^SIMPLE",
    patient_id: str = "SYNTH-0",
) -> list[Path]:
    """A quick CT series (procedural body, optional white noise instead of noise insertion),
    one file a slice: for tests and benchmarks where the noise model is not the point."""
    rng = np.random.default_rng(seed)
    body = BodyCase.random(rng)
    pixel_mm = FOV_MM / size
    study = {
        "uid": generate_uid(UID_ROOT),
        "date": "20240102",
        "patient_name": patient_name,
        "patient_id": patient_id,
    }
    series_uid, frame = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        hu = body.slice_hu(size, pixel_mm, i / max(n - 1, 1))
        if noise_sd:
            hu = hu + rng.normal(0, noise_sd, hu.shape).astype(np.float32)
        ds = ct_dataset(
            hu,
            study=study,
            series_uid=series_uid,
            series_number=3,
            description="Low Dose Images",
            index=i,
            pixel_mm=pixel_mm,
            thickness_mm=1.0,
            frame_uid=frame,
        )
        path = folder / f"{i + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def uniform_patch_sd(ld: np.ndarray, nd: np.ndarray, center: tuple[int, int], half: int) -> float:
    """Noise SD (HU) added in a square patch: SD of LD - ND there."""
    y, x = center
    diff = (ld - nd)[y - half : y + half, x - half : x + half]
    return float(diff.std())


def calibrate(size: int = 512, dose: float = 0.25, seed: int = 0, i0: float = I0_DEFAULT) -> float:
    """Added noise SD in soft tissue at the centre of a 320 x 240 mm body (the documented case)."""
    pixel_mm = FOV_MM / size
    body = BodyCase(rx=160, ry=120, fat_mm=20, chest=False, liver_hu=60, seed=seed)
    nd = body.slice_hu(size, pixel_mm, 0.0)
    c = size // 2
    nd[c - size // 16 : c + size // 16, c - size // 16 : c + size // 16] = 50.0
    ld = NoiseModel(dose=dose, i0=i0).low_dose(nd, pixel_mm, np.random.default_rng(seed))
    return uniform_patch_sd(ld, nd, (c, c), size // 20)
