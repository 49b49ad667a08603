"""One C-STORE data set on its way in: written as it arrives, judged early, made durable and
recorded before its status is answered."""

from __future__ import annotations

import errno
import logging
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydicom.uid import UID

from pacs_node.receive.filemeta import part10_header
from pacs_node.receive.header import EARLY_HEADER_LIMIT, read_header
from pacs_node.receive.rules import Refused, check_denoisable, refuse_unrouted, validate
from pacs_node.route.rules import Decision, Facts, could_match, decide
from pacs_node.status import Status
from pacs_node.storage import valid_uid, write_all

if TYPE_CHECKING:
    from pacs_node.receive.intake import Intake

logger = logging.getLogger(__name__)


def _write_refusal(err: OSError) -> Refused:
    full = err.errno in (errno.ENOSPC, errno.EDQUOT)
    status = Status.OUT_OF_RESOURCES if full else Status.PROCESSING_FAILURE
    return Refused(status, f"cannot write the file: {err.strerror}")


@dataclass(frozen=True)
class Accepted:
    """An instance judged acceptable: its UIDs, where the rules send it, and what the job
    table keeps of its header."""

    study: str
    series: str
    sop: str
    route: Decision
    series_description: str


class Incoming:
    """One C-STORE data set on its way in.

    Its bytes go to a temporary file in the data folder as they arrive (:meth:`write`, called per
    P-DATA fragment by :mod:`pacs_node.receive.stream`, or once with the whole data set), and it
    is judged as soon as its header up to the pixel data is in (the routing rules, then the checks
    their action needs), while the rest still arrives; :meth:`finish` makes the file durable
    under its final name, records it and returns the status to answer. :meth:`abort` drops it
    (association gone mid-transfer). Nothing is written for an instance refused before its data
    arrive (no rule can take its SOP class from this sender, invalid Affected SOP Instance UID,
    disk below the watermark), nor after it is refused or ignored.
    """

    def __init__(
        self,
        intake: Intake,
        assoc_key: int,
        caller: str,
        peer: str,
        sop_class: str,
        transfer_syntax: str,
        affected_uid: str,
    ) -> None:
        self.intake, self.assoc_key, self.caller, self.peer = intake, assoc_key, caller, peer
        self.sop_class, self.affected = sop_class, affected_uid
        self.transfer_syntax = transfer_syntax
        self.refused: Refused | None = None
        self.ignored: Decision | None = None  # a rule says: answer Success, keep nothing
        self.accepted: Accepted | None = None
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
            if not could_match(intake.rules, self._facts(None)):
                raise refuse_unrouted(sop_class, f"no rule routes it from {caller}")
        except Refused as r:
            self.refused = r
            return
        if valid_uid(affected_uid):
            try:
                self.fd, self.tmp = storage.open_temp()
                write_all(self.fd, part10_header(sop_class, affected_uid, transfer_syntax))
            except OSError as err:
                self._write_failed(err)

    def _facts(self, header: object) -> Facts:
        return Facts(self.caller, self.peer, self.sop_class, header)

    def _write_failed(self, err: OSError) -> None:
        self._drop_temp()
        self.refused = _write_refusal(err)

    def _drop_temp(self) -> None:
        if self.fd >= 0:
            self.intake.storage.discard_temp(self.fd, self.tmp)
            self.fd = -1

    def write(self, data: bytes | memoryview) -> None:
        if self.refused is not None or self.ignored is not None:
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
            ds, has_pixels = header
            route = decide(self.intake.rules, self._facts(ds), self.intake.destinations)
            if route.action == "refuse":
                raise refuse_unrouted(self.sop_class, route.note)
            study, series, sop = validate(ds, self.sop_class, self.affected)
            if route.action == "ignore":
                self.ignored = route
                self._drop_temp()
                return True
            if route.action == "denoise":
                check_denoisable(ds, self.sop_class, has_pixels, route.rule)
            description = str(ds.get("SeriesDescription", "") or "")[:64]
            self.accepted = Accepted(study, series, sop, route, description)
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
            if self.refused is None and self.accepted is None and self.ignored is None:
                self._judge(complete=True)
            if self.refused is not None:
                raise self.refused
            if self.ignored is not None:
                return self.intake.ignored(self, self.ignored)
            assert self.accepted is not None
            self._commit(self.accepted)
        except Refused as r:
            self._drop_temp()
            return self.intake.refused(self, r)
        return self.intake.stored(self)

    def _commit(self, accepted: Accepted) -> None:
        assert self.fd >= 0, "validated instances always have their temporary file"
        storage = self.intake.storage
        sop = accepted.sop
        path = storage.received_path(accepted.series, sop)
        existed = path.exists()
        fd, self.fd = self.fd, -1
        try:
            storage.commit_temp(fd, self.tmp, path)  # removes the temporary file on error
        except OSError as err:
            raise _write_refusal(err) from None
        try:
            self.intake.jobs.record_instance(
                sop_uid=sop,
                series_uid=accepted.series,
                study_uid=accepted.study,
                path=str(path),
                action=accepted.route.action,
                rule=accepted.route.rule,
                destinations=accepted.route.destinations,
                send_original=accepted.route.send_original,
                calling_ae=self.caller,
                series_description=accepted.series_description,
            )
        except Exception as err:
            if not existed:
                storage.remove(path)
            logger.exception("recording SOP instance %s failed", sop)
            raise Refused(
                Status.OUT_OF_RESOURCES, f"job table unavailable: {type(err).__name__}"
            ) from None
