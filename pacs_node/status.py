"""DIMSE status codes the node answers, named and described by pynetdicom's own tables.

:class:`Status` holds only the codes the node sends; what a code means (for log lines, and for
the codes peers send back) comes from ``pynetdicom.status``, not from a copy of it.
"""

from __future__ import annotations

from enum import IntEnum

from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category


class Status(IntEnum):
    SUCCESS = 0x0000
    # C-STORE failures (PS3.4 B.2.3, PS3.7 C)
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    OUT_OF_RESOURCES = 0xA700
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    CANNOT_UNDERSTAND = 0xC000
    PROCESSING_FAILURE = 0x0110


def describe(code: int) -> str:
    """pynetdicom's description of a C-STORE status code, e.g. 0xB007 'Data Set Does Not Match
    SOP Class'; '' for success and for codes it does not know."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(code) or GENERAL_STATUS.get(code)
    return str(entry[1]) if entry else ""


def category(code: int) -> str:
    """'Success', 'Warning', 'Failure', 'Cancel' or 'Pending' for a peer's status code."""
    return str(code_to_category(code))
