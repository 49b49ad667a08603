"""The C-STORE handler: validate, write durably, record, and only then answer Success.

No pixel decoding, inference or network calls happen on the association's thread.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
from collections import Counter
from io import BytesIO
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

from pacs_node.http import Metrics
from pacs_node.queue import Queue
from pacs_node.status import Status
from pacs_node.storage import Storage, valid_uid

logger = logging.getLogger(__name__)

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


class Refused(Exception):
    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def validate(ds: Dataset, sop_class: str, affected_uid: str) -> tuple[str, str, str]:
    """(study, series, sop instance) UIDs of an acceptable CT instance, else raise Refused."""
    if sop_class == EnhancedCTImageStorage:
        raise Refused(
            Status.SOP_CLASS_NOT_SUPPORTED,
            "Enhanced CT (multi-frame) is not supported yet; send CT Image Storage",
        )
    if sop_class != CTImageStorage:
        raise Refused(
            Status.SOP_CLASS_NOT_SUPPORTED, f"SOP class {sop_class} is not CT Image Storage"
        )
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
    if "PixelData" not in ds:
        raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS, "PixelData is missing")
    return uids["StudyInstanceUID"], uids["SeriesInstanceUID"], uids["SOPInstanceUID"]


class Intake:
    """Handles C-STORE requests for one node; counts per association for the audit line."""

    def __init__(self, storage: Storage, queue: Queue, metrics: Metrics | None = None) -> None:
        self.storage = storage
        self.queue = queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._per_assoc: dict[int, Counter[str]] = {}

    def _count(self, event: evt.Event, key: str) -> None:
        with self._lock:
            self._per_assoc.setdefault(id(event.assoc), Counter())[key] += 1

    def handle_store(self, event: evt.Event) -> int:
        caller = str(event.assoc.requestor.ae_title).strip()
        affected = str(getattr(event.request, "AffectedSOPInstanceUID", ""))
        try:
            if not self.storage.has_room():
                raise Refused(
                    Status.OUT_OF_RESOURCES,
                    f"free disk below storage.min_free_bytes ({self.storage.min_free_bytes})",
                )
            try:
                ds = event.dataset
            except Exception as err:
                raise Refused(
                    Status.CANNOT_UNDERSTAND, f"data set cannot be decoded: {err}"
                ) from None
            study, series, sop = validate(ds, event.context.abstract_syntax, affected)
            self._store(event, study, series, sop)
        except Refused as r:
            self._count(event, f"refused:{r.status.name.lower()}")
            if self.metrics:
                self.metrics.rejected.labels(r.status.name.lower()).inc()
            logger.warning(
                "C-STORE from %s refused with 0x%04X (%s): %s; SOP instance %s",
                caller,
                r.status,
                r.status.name,
                r.reason,
                affected if valid_uid(affected) else "(invalid UID)",
            )
            return int(r.status)
        self._count(event, "stored")
        if self.metrics:
            self.metrics.received.inc()
        return int(Status.SUCCESS)

    def _store(self, event: evt.Event, study: str, series: str, sop: str) -> None:
        path = self.storage.received_path(series, sop)
        existed = path.exists()
        try:
            header = part10_header(
                event.context.abstract_syntax, sop, event.context.transfer_syntax
            )
            request = cast(C_STORE, event.request)
            received = cast(BytesIO, request.DataSet)
            with received.getbuffer() as data:  # the bytes as received, not copied
                self.storage.write_atomic(path, [header, data])
        except OSError as err:
            status = (
                Status.OUT_OF_RESOURCES
                if err.errno in (errno.ENOSPC, errno.EDQUOT)
                else Status.PROCESSING_FAILURE
            )
            raise Refused(status, f"cannot write the file: {err.strerror}") from None
        try:
            self.queue.record_instance(
                sop_uid=sop, series_uid=series, study_uid=study, path=str(path)
            )
        except Exception as err:
            if not existed:
                self.storage.remove(path)
            logger.exception("recording SOP instance %s failed", sop)
            raise Refused(
                Status.OUT_OF_RESOURCES, f"job table unavailable: {type(err).__name__}"
            ) from None

    # -- association audit -------------------------------------------------------------------
    def handle_accepted(self, event: evt.Event) -> None:
        with self._lock:
            self._per_assoc[id(event.assoc)] = Counter()

    def handle_closed(self, event: evt.Event) -> None:
        with self._lock:
            counts = self._per_assoc.pop(id(event.assoc), Counter())
        rq = event.assoc.requestor
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if self.metrics:
            self.metrics.associations.labels(outcome).inc()
        refused = sum(v for k, v in counts.items() if k.startswith("refused"))
        logger.info(
            "association from %s (%s:%s) %s: %d stored, %d refused",
            str(rq.ae_title).strip(),
            rq.address,
            rq.port,
            outcome,
            counts["stored"],
            refused,
        )

    def handle_rejected(self, event: evt.Event) -> None:
        if self.metrics:
            self.metrics.associations.labels("rejected").inc()

    def handlers(self) -> list[Any]:
        return [
            (evt.EVT_REJECTED, self.handle_rejected),
            (evt.EVT_C_STORE, self.handle_store),
            (evt.EVT_ACCEPTED, self.handle_accepted),
            (evt.EVT_RELEASED, self.handle_closed),
            (evt.EVT_ABORTED, self.handle_closed),
        ]
