"""What the node accepts: transfer syntaxes, SOP class, and the checks on a CT instance's header.

Each refusal carries the DIMSE status to answer and a reason for the log line.
"""

from __future__ import annotations

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage

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


def check_sop_class(sop_class: str) -> None:
    """Raise Refused unless the presentation context is CT Image Storage."""
    if sop_class == EnhancedCTImageStorage:
        raise Refused(
            Status.SOP_CLASS_NOT_SUPPORTED,
            "Enhanced CT (multi-frame) is not supported yet; send CT Image Storage",
        )
    if sop_class != CTImageStorage:
        raise Refused(
            Status.SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not CT Image Storage"
        )


def validate(
    ds: Dataset, sop_class: str, affected_uid: str, has_pixel_data: bool
) -> tuple[str, str, str]:
    """(study, series, sop instance) UIDs of an acceptable CT instance, else raise Refused.

    ``ds`` is the data set up to its pixel data; ``has_pixel_data`` whether PixelData follows."""
    check_sop_class(sop_class)
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
    if ds.get("Modality") != "CT":
        raise Refused(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"Modality {ds.get('Modality')!r} is not CT"
        )
    for key in ("Rows", "Columns"):
        if not ds.get(key):
            raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, f"{key} is missing or zero")
    if not has_pixel_data:
        raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PixelData is missing")
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]
