"""The File Meta Information written in front of each received data set."""

from __future__ import annotations

import struct

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION


def _meta_element(elem: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    if vr == b"OB":
        return struct.pack("<HH2s2xI", 2, elem, vr, len(value)) + value
    return struct.pack("<HH2sH", 2, elem, vr, len(value)) + value


def part10_header(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information (PS3.10 7.1) for a received data set.

    Hand-encoded (Explicit VR Little Endian, group 0002): it is written once per C-STORE, and
    building it through pydicom cost more than the data set's own write. Same elements as
    pynetdicom's ``Event.file_meta``.
    """
    body = b"".join(
        (
            _meta_element(0x0001, b"OB", b"\0\1"),
            _meta_element(0x0002, b"UI", sop_class.encode()),
            _meta_element(0x0003, b"UI", sop_instance.encode()),
            _meta_element(0x0010, b"UI", transfer_syntax.encode()),
            _meta_element(0x0012, b"UI", PYNETDICOM_IMPLEMENTATION_UID.encode()),
            _meta_element(0x0013, b"SH", PYNETDICOM_IMPLEMENTATION_VERSION.encode()),
        )
    )
    group_length = struct.pack("<HH2sHI", 2, 0x0000, b"UL", 4, len(body))
    return b"\0" * 128 + b"DICM" + group_length + body
