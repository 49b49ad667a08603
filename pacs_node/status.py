"""Named DIMSE status codes (PS3.4 Annex B and PS3.7 Annex C), matching ``pynetdicom.status``."""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import code_to_category


class Status(IntEnum):
    SUCCESS = 0x0000
    # C-STORE failures (PS3.4 B.2.3)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110
    # C-STORE warnings
    COERCION_OF_DATA_ELEMENTS = 0xB000
    ELEMENTS_DISCARDED = 0xB007
    DATASET_DOES_NOT_MATCH_SOP_CLASS_WARNING = 0xB006


def category(code: int) -> str:
    """'Success', 'Warning', 'Failure', 'Cancel' or 'Pending' for a peer's status code."""
    return str(code_to_category(code))
