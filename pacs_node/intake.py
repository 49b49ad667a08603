"""The C-STORE handler: validate, write durably, record, and only then answer Success.

No pixel decoding, inference or network calls happen on the association's thread.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading
import zlib
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, CTImageStorage, EnhancedCTImageStorage
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, evt
from pynetdicom.dimse_primitives import C_STORE

from pacs_node.http import Metrics
from pacs_node.queue import Queue
from pacs_node.status import Status
from pacs_node.storage import Storage, valid_uid, write_all

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


def _write_refusal(err: OSError) -> Refused:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    status = Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE
    return Refused(status, f"cannot write the file: {err.strerror}")


class Incoming:
    """One C-STORE data set on its way in.

    Its bytes go to a temporary file in the data folder as they arrive (:meth:`write`, called per
    P-DATA fragment by :mod:`pacs_node.stream`, or once with the whole data set), and it is judged
    as soon as its header up to the pixel data is in, while the rest still arrives; :meth:`finish`
    makes the file durable under its final name, records it and returns the status to answer.
    :meth:`abort` drops it (association gone mid-transfer). Nothing is written for an instance
    refused before its data arrive (not CT, invalid Affected SOP Instance UID, disk below the
    watermark), nor after it is refused.
    """

    def __init__(
        self,
        intake: Intake,
        assoc_key: int,
        caller: str,
        sop_class: str,
        transfer_syntax: str,
        affected_uid: str,
    ) -> None:
        self.intake, self.assoc_key, self.caller = intake, assoc_key, caller
        self.sop_class, self.affected = sop_class, affected_uid
        self.transfer_syntax = transfer_syntax
        self.refused: Refused | None = None
        self.accepted: tuple[str, str, str] | None = None  # study, series, SOP instance UIDs
        self.head: bytearray | None = bytearray()  # the data set's bytes until it is judged
        self.tag_seen = False  # a Pixel Data tag arrived but the header could not be read yet
        ts = UID(transfer_syntax)
        # Judged early only where the header can be read from the first bytes (not deflated).
        self.early = not ts.is_deflated
        self.pixel_tag = struct.pack("<HH" if ts.is_little_endian else ">HH", 0x7FE0, 0x0010)
        self.fd, self.tmp = -1, Path()
        storage = intake.storage
        try:
            if not storage.has_room():
                raise Refused(
                    Status.OUT_OF_RESOURCES,
                    f"free disk below storage.min_free_bytes ({storage.min_free_bytes})",
                )
            check_sop_class(sop_class)
        except Refused as r:
            self.refused = r
            return
        if valid_uid(affected_uid):
            try:
                self.fd, self.tmp = storage.open_temp()
                write_all(self.fd, part10_header(sop_class, affected_uid, transfer_syntax))
            except OSError as err:
                self._write_failed(err)

    def _write_failed(self, err: OSError) -> None:
        self._drop_temp()
        self.refused = _write_refusal(err)

    def _drop_temp(self) -> None:
        if self.fd >= 0:
            self.intake.storage.discard_temp(self.fd, self.tmp)
            self.fd = -1

    def write(self, data: bytes | memoryview) -> None:
        if self.refused is not None:
            return  # its answer is known; the rest of its bytes only need to be read
        if self.fd >= 0:
            try:
                write_all(self.fd, data)
            except OSError as err:
                self._write_failed(err)
                return
        if self.head is not None:
            start = max(0, len(self.head) - 3)
            self.head += data
            early = self.early and len(self.head) <= EARLY_HEADER_LIMIT
            if early and (self.tag_seen or self.head.find(self.pixel_tag, start) >= 0):
                # Not judged yet: the element's header is cut, or those bytes were inside an
                # earlier element (an icon's pixel data); try again with the next bytes.
                self.tag_seen = not self._judge(complete=False)

    def _judge(self, complete: bool) -> bool:
        """Judge from the bytes so far; False if they do not reach the pixel data yet."""
        assert self.head is not None
        try:
            header = read_header(self.head, self.transfer_syntax, complete)
            if header is None:
                return False
            self.head = None
            self.accepted = validate(header[0], self.sop_class, self.affected, header[1])
        except Refused as r:
            self.head = None
            self.refused = r
            self._drop_temp()
        return True

    def abort(self) -> None:
        self.head = None
        self._drop_temp()

    def finish(self) -> int:
        """Judge (if not yet), store durably, record; the status for the C-STORE response."""
        try:
            if self.refused is None and self.accepted is None:
                self._judge(complete=True)
            if self.refused is not None:
                raise self.refused
            assert self.accepted is not None
            self._commit(*self.accepted)
        except Refused as r:
            self._drop_temp()
            return self.intake.refused(self, r)
        return self.intake.stored(self)

    def _commit(self, study: str, series: str, sop: str) -> None:
        assert self.fd >= 0, "validated instances always have their temporary file"
        storage = self.intake.storage
        path = storage.received_path(series, sop)
        existed = path.exists()
        fd, self.fd = self.fd, -1
        try:
            storage.commit_temp(fd, self.tmp, path)  # removes the temporary file on error
        except OSError as err:
            raise _write_refusal(err) from None
        try:
            self.intake.queue.record_instance(
                sop_uid=sop, series_uid=series, study_uid=study, path=str(path)
            )
        except Exception as err:
            if not existed:
                storage.remove(path)
            logger.exception("recording SOP instance %s failed", sop)
            raise Refused(
                Status.OUT_OF_RESOURCES, f"job table unavailable: {type(err).__name__}"
            ) from None


class Intake:
    """Handles C-STORE requests for one node; counts per association for the audit line."""

    def __init__(self, storage: Storage, queue: Queue, metrics: Metrics | None = None) -> None:
        self.storage = storage
        self.queue = queue
        self.metrics = metrics
        self._lock = threading.Lock()
        self._per_assoc: dict[int, Counter[str]] = {}

    def _count(self, assoc_key: int, key: str) -> None:
        with self._lock:
            self._per_assoc.setdefault(assoc_key, Counter())[key] += 1

    def incoming(
        self, assoc: Any, sop_class: str, transfer_syntax: str, affected_uid: str
    ) -> Incoming:
        caller = str(assoc.requestor.ae_title).strip()
        return Incoming(self, id(assoc), caller, sop_class, transfer_syntax, affected_uid)

    def stored(self, incoming: Incoming) -> int:
        self._count(incoming.assoc_key, "stored")
        if self.metrics:
            self.metrics.received.inc()
        return int(Status.SUCCESS)

    def refused(self, incoming: Incoming, r: Refused) -> int:
        self._count(incoming.assoc_key, f"refused:{r.status.name.lower()}")
        affected = incoming.affected
        if self.metrics:
            self.metrics.rejected.labels(r.status.name.lower()).inc()
        logger.warning(
            "C-STORE from %s refused with 0x%04X (%s): %s; SOP instance %s",
            incoming.caller,
            r.status,
            r.status.name,
            r.reason,
            affected if valid_uid(affected) else "(invalid UID)",
        )
        return int(r.status)

    def handle_store(self, event: evt.Event) -> int:
        """EVT_C_STORE, for a data set pynetdicom assembled (when :mod:`pacs_node.stream` is not
        installed): the same checks and writes as the streamed path, in one go."""
        request = cast(C_STORE, event.request)
        incoming = self.incoming(
            event.assoc,
            event.context.abstract_syntax,
            event.context.transfer_syntax,
            str(getattr(request, "AffectedSOPInstanceUID", "")),
        )
        received = cast(BytesIO, request.DataSet)
        with received.getbuffer() as data:  # the bytes as received, not copied
            incoming.write(data)
            return incoming.finish()

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
