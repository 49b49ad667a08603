"""Stored pixels <-> Hounsfield units, for the node and for training (one copy, no drift)."""

from __future__ import annotations

import copy
import datetime
import uuid

import numpy as np
from pydicom.dataset import Dataset
from pydicom.pixels import pixel_array

from pacs_node.errors import PermanentError

__all__ = ["hu_to_stored", "read_hu", "stored_range"]


def _rescale(ds: Dataset) -> tuple[float, float]:
    slope = float(ds.get("RescaleSlope", 1) or 1)
    intercept = float(ds.get("RescaleIntercept", 0) or 0)
    return slope, intercept


def read_hu(ds: Dataset) -> np.ndarray:
    """The pixel data of a single-frame CT data set in HU, float32 [rows, cols].

    Decodes any transfer syntax pydicom and pylibjpeg handle; raises PermanentError when it can't.
    """
    try:
        # pydicom.pixels.pixel_array, not ds.pixel_array: the same decoders, without keeping a
        # decoded copy in the data set (which the derived instance would deep-copy)
        arr = pixel_array(ds)
    except Exception as err:  # pydicom raises a variety of errors for undecodable pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PermanentError(f"cannot decode pixel data (transfer syntax {ts}): {err}") from err
    if arr.ndim != 2:
        raise PermanentError(f"expected a single-frame grayscale image, got shape {arr.shape}")
    slope, intercept = _rescale(ds)
    hu = arr.astype(np.float32)
    if slope != 1:
        hu *= np.float32(slope)
    hu += np.float32(intercept)
    return hu


def stored_range(ds: Dataset) -> tuple[int, int]:
    """The smallest and largest stored value that BitsStored and PixelRepresentation allow."""
    bits = int(ds.BitsStored)
    if int(ds.PixelRepresentation) == 1:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def hu_to_stored(hu: np.ndarray, ds: Dataset) -> np.ndarray:
    """HU -> stored values in ``ds``'s representation (slope, intercept, bits, sign), clipped."""
    slope, intercept = _rescale(ds)
    lo, hi = stored_range(ds)
    if int(ds.BitsAllocated) != 16:
        raise PermanentError(f"BitsAllocated {ds.BitsAllocated} is not supported (16 only)")
    stored = np.array(hu, np.float64)  # float64: exact for any float32 HU and 16-bit range
    stored -= intercept
    if slope != 1:
        stored /= slope
    np.rint(stored, out=stored)
    np.clip(stored, lo, hi, out=stored)
    return stored.astype(np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16)


# -- the derived instance ----------------------------------------------------------------------

SOFTWARE = "ldct-pacs-node"
SMOOTHING = ("113087", "DCM", "Smoothing")  # CID 7203 Image Derivation


def _values(value: object) -> list[str]:
    """A DICOM value (absent, single or multi-valued) as a list of strings."""
    if value is None or value == "":
        return []
    if isinstance(value, str) or not hasattr(value, "__iter__"):
        return [str(value)]
    return [str(v) for v in value]


_UID_NAMESPACE = uuid.UUID("5c1b6f0e-7a64-4c1e-9f1e-3b8d2f6a0c11")


def derived_uid(source_uid: str, model_version: str, kind: str) -> str:
    """A UID derived deterministically from a source UID and the model version: the 2.25 form
    of a name-based (v5) UUID, so reprocessing yields the same UIDs."""
    name = f"{SOFTWARE}|{kind}|{source_uid}|{model_version}"
    return f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}"


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def derive(
    source: Dataset,
    hu: np.ndarray,
    *,
    model_version: str,
    software_version: str,
    series_number_offset: int,
    series_description_suffix: str,
    strength: float = 1.0,
    now: datetime.datetime | None = None,
) -> Dataset:
    """The denoised counterpart of ``source`` holding ``hu``: same patient, study and geometry;
    a new series; DERIVED\\SECONDARY with its provenance; Explicit VR Little Endian whatever
    the source's transfer syntax (write it with ``pydicom.dcmwrite``, which converts a
    big-endian source's other elements).

    ``model_version`` is what the UIDs derive from and the provenance names (with the strength
    when it is not 1, see ``Denoiser.version_label``); ``strength`` is added to the series
    description when it is not 1."""
    from pydicom.sequence import Sequence
    from pydicom.uid import ExplicitVRLittleEndian

    now = now or datetime.datetime.now()
    ds = copy.deepcopy(source)
    ds.file_meta = copy.deepcopy(source.file_meta)
    stored = hu_to_stored(hu, source)
    src_series, src_sop = str(source.SeriesInstanceUID), str(source.SOPInstanceUID)
    ds.SeriesInstanceUID = derived_uid(src_series, model_version, "series")
    ds.SOPInstanceUID = derived_uid(src_sop, model_version, "instance")
    number = source.get("SeriesNumber")
    ds.SeriesNumber = (int(number) if number not in (None, "") else 0) + series_number_offset
    suffix = series_description_suffix
    if strength != 1.0:  # blended with the input: say how much
        suffix += f" [strength {strength:g}]"
    ds.SeriesDescription = (str(source.get("SeriesDescription", "")) + suffix)[-64:]
    image_type = list(source.get("ImageType", []) or [])
    ds.ImageType = ["DERIVED", "SECONDARY", *image_type[2:]]
    ds.DerivationDescription = (
        f"Low-dose CT denoised by a UNIT generator, model {model_version}, "
        f"{SOFTWARE} {software_version}"
    )[:1024]
    ds.DerivationCodeSequence = Sequence([_code(*SMOOTHING)])
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = src_sop
    ref.PurposeOfReferenceCodeSequence = Sequence(
        [_code("121320", "DCM", "Uncompressed predecessor")]
    )
    ds.SourceImageSequence = Sequence([ref])
    equipment = Dataset()
    equipment.Manufacturer = SOFTWARE
    equipment.ManufacturerModelName = "UNIT low-dose CT denoiser"
    equipment.SoftwareVersions = [software_version, f"model {model_version}"]
    equipment.ContributionDateTime = now.strftime("%Y%m%d%H%M%S")
    equipment.ContributionDescription = "Denoising of low-dose CT"
    equipment.PurposeOfReferenceCodeSequence = Sequence(
        [_code("109103", "DCM", "Modifying Equipment")]
    )
    previous = list(source.get("ContributingEquipmentSequence", []) or [])
    ds.ContributingEquipmentSequence = Sequence([*previous, equipment])
    ds.SoftwareVersions = [
        *_values(source.get("SoftwareVersions")),
        f"{SOFTWARE} {software_version}",
    ]
    ds.BurnedInAnnotation = "NO"
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate, ds.ContentTime = ds.InstanceCreationDate, ds.InstanceCreationTime
    ds.PixelData = stored.tobytes()
    ds["PixelData"].VR = "OW"
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationVersionName = f"LDCT_{software_version}"[:16]
    for elem in ("SmallestImagePixelValue", "LargestImagePixelValue"):
        if elem in ds:
            delattr(ds, elem)
    return ds
