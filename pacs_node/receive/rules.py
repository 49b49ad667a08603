"""What the node accepts: transfer syntaxes, and the checks on an instance's header (any stored
instance; more for one to be denoised). Which SOP classes it takes is the routing rules' call.

Each refusal carries the DIMSE status to answer and a reason for the log line.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage

from pacs_node.status import Status
from pacs_node.storage import valid_uid

# The transfer syntaxes the worker decodes (pydicom + pylibjpeg). pynetdicom picks the first of
# these that a proposed context lists, so lossless compressions come first: a sender that offers
# its stored compressed form beside uncompressed sends what it has, without transcoding.
TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, process 14
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.2",  # Explicit VR Big Endian (retired, still sent by old modalities)
]


class Refused(Exception):
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def _uid_name(uid: str) -> str:
    name = UID(uid).name
    return f"{name} ({uid})" if name != uid else uid


def refuse_unrouted(sop_class: str, why: str = "no rule routes it") -> Refused:
    return Refused(Status.SOP_CLASS_NOT_SUPPORTED, f"{_uid_name(sop_class)}: {why}")


def validate(ds: Dataset, sop_class: str, affected_uid: str) -> tuple[str, str, str]:
    """(study, series, sop instance) UIDs of an instance the node may store, else raise
    Refused. ``ds`` is the data set up to its pixel data."""
    if ds.get("SOPClassUID") != sop_class:
        raise Refused(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"SOPClassUID {ds.get('SOPClassUID')} differs from the presentation context",
        )
    uids = {}
    for key in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
        value = ds.get(key)
        if value is None:
            raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{key} is missing")
        if not valid_uid(str(value)):
            raise Refused(Status.CANNOT_UNDERSTAND, f"{key} is not a valid UID")
        uids[key] = str(value)
    if uids["SOPInstanceUID"] != affected_uid:
        raise Refused(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOPInstanceUID differs from the request's Affected SOP Instance UID",
        )
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]


def check_denoisable(ds: Dataset, sop_class: str, has_pixel_data: bool, rule: str) -> None:
    """Raise Refused unless the instance is one the worker can denoise: a single-frame CT
    image with its pixel data."""
    if sop_class == EnhancedCTImageStorage:
        raise refuse_unrouted(
            sop_class, f"rule {rule!r} says denoise; Enhanced CT (multi-frame) cannot be yet"
        )
    if sop_class != CTImageStorage:
        raise refuse_unrouted(
            sop_class, f"rule {rule!r} says denoise; only CT Image Storage can be denoised"
        )
    if ds.get("Modality") != "CT":
        raise Refused(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Modality {ds.get('Modality')!r} is not CT"
        )
    for key in ("Rows", "Columns"):
        if not ds.get(key):
            raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{key} is missing or zero")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "multi-frame CT cannot be denoised")
    if not has_pixel_data:
        raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PixelData is missing")
