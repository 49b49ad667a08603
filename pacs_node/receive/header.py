"""Reading a received data set's header up to its pixel data, from all or part of its bytes."""

from __future__ import annotations

import zlib
from io import BytesIO

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from pacs_node.receive.rules import Refused
from pacs_node.status import Status

# Judging while the data set arrives stops if its header is not read within this many bytes;
# such a data set is judged once complete.
EARLY_HEADER_LIMIT = 1 << 20
_PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009}  # Pixel Data, Float and Double Float


class _Incomplete(Exception):
    pass


class _Prefix(BytesIO):
    """The first bytes of a data set: reading past them raises _Incomplete (not EOFError, which
    pydicom turns into a warning and a truncated data set)."""

    def read(self, n: int | None = -1) -> bytes:
        b = super().read(n)
        if n is not None and n >= 0 and len(b) < n:
            raise _Incomplete
        return b


def read_header(
    data: bytes | bytearray, transfer_syntax: str, complete: bool = True
) -> tuple[Dataset, bool] | None:
    """The data set up to its pixel data, and whether Pixel Data follows (not read: the worker
    decodes it). Raises Refused when the bytes are not a data set in ``transfer_syntax``. With
    ``complete=False`` ``data`` is only the data set's beginning: None if it ends before the
    pixel data."""
    ts = UID(transfer_syntax)
    found: list[int] = []

    def at_pixels(tag: int, vr: str | None, length: int) -> bool:
        if tag in _PIXEL_TAGS:
            found.append(tag)
            return True
        return False

    try:
        if ts.is_deflated:
            data = zlib.decompress(data, -zlib.MAX_WBITS)
        fp = BytesIO(data) if complete else _Prefix(data)
        ds = read_dataset(fp, ts.is_implicit_VR, ts.is_little_endian, stop_when=at_pixels)
    except _Incomplete:
        return None
    except Exception as err:
        raise Refused(Status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {err}") from None
    if not complete and not found:
        return None
    return ds, 0x7FE00010 in found
