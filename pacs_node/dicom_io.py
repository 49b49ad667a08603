"""Stored pixels <-> Hounsfield units, for the node and for training (one copy, no drift)."""

from __future__ import annotations

import numpy as np
from pydicom.dataset import Dataset

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
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises a variety of errors for undecodable pixel data
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise PermanentError(f"cannot decode pixel data (transfer syntax {ts}): {err}") from err
    if arr.ndim != 2:
        raise PermanentError(f"expected a single-frame grayscale image, got shape {arr.shape}")
    slope, intercept = _rescale(ds)
    return (arr.astype(np.float32) * np.float32(slope) + np.float32(intercept)).astype(np.float32)


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
    stored = np.rint((np.asarray(hu, np.float64) - intercept) / slope)
    dtype = np.int16 if int(ds.PixelRepresentation) == 1 else np.uint16
    if int(ds.BitsAllocated) != 16:
        raise PermanentError(f"BitsAllocated {ds.BitsAllocated} is not supported (16 only)")
    return np.clip(stored, lo, hi).astype(dtype)
