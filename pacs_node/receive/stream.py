"""C-STORE data sets written to their files while their PDUs arrive.

pynetdicom reads a P-DATA-TF PDU 4 KB per ``recv``, copies it several times, runs each PDU
through its state machine and assembles the whole DIMSE message in memory; then its association
thread runs the handler and hands the response back to the DUL thread to encode and send. For a
512 KB CT image that path alone costs more than DCMTK's whole exchange. Here, while an
association of the intake's AE is established (state Sta6), its DUL thread reads each
P-DATA-TF PDU whole, into one buffer, and routes the fragments itself:

- a C-STORE request's data set fragments go straight into the intake's temporary file
  (:class:`pacs_node.intake.Incoming`) as they arrive; when the last one is in, the intake's
  verdict goes back as the C-STORE-RSP, from the same thread;
- every other message (C-ECHO, anything unexpected or malformed) is handed, fragment by
  fragment, to pynetdicom's own DIMSE assembler exactly as its DT-2 action does, and is served
  (or refused) by pynetdicom.

Other PDUs and other states take pynetdicom's path unchanged. pynetdicom's per-PDU and DIMSE
events (EVT_DATA_RECV, EVT_PDU_RECV, EVT_DIMSE_RECV, EVT_C_STORE) are not triggered for
streamed requests. The hook that brings the PDUs here, and every pynetdicom internal this uses,
are in :mod:`pacs_node.pynetdicom_compat`; where it is not installed, the intake's EVT_C_STORE
handler serves.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pacs_node import pynetdicom_compat as compat

if TYPE_CHECKING:
    from pacs_node.receive.intake import Incoming, Intake

logger = logging.getLogger(__name__)

P_DATA_TF = 0x04
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
NO_DATA_SET = 0x0101


# -- C-STORE-RSP -------------------------------------------------------------------------------
def _element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def _ui(uid: str) -> bytes:
    raw = uid.encode("ascii", "replace")
    return raw + b"\0" if len(raw) % 2 else raw


def store_rsp(sop_class: str, sop_instance: str, message_id: int, status: int) -> bytes:
    """The command set of a C-STORE-RSP (PS3.7 9.3.1.2), Implicit VR Little Endian."""
    body = b"".join(
        (
            _element(0x0002, _ui(sop_class)),
            _element(0x0100, struct.pack("<H", C_STORE_RSP)),
            _element(0x0120, struct.pack("<H", message_id)),
            _element(0x0800, struct.pack("<H", NO_DATA_SET)),
            _element(0x0900, struct.pack("<H", status)),
            _element(0x1000, _ui(sop_instance)),
        )
    )
    return _element(0x0000, struct.pack("<I", len(body))) + body


def command_pdus(context_id: int, command: bytes, max_pdu: int) -> Iterator[bytes]:
    """P-DATA-TF PDUs carrying a command set, each within the peer's maximum length
    (0: unlimited); one PDV per PDU."""
    room = len(command) if not max_pdu else max(1, max_pdu - 6)
    for start in range(0, len(command), room):
        fragment = command[start : start + room]
        mch = COMMAND | (LAST if start + room >= len(command) else 0)
        yield struct.pack(">BBIIBB", P_DATA_TF, 0, len(fragment) + 6, len(fragment) + 2,
                          context_id, mch) + fragment  # fmt: skip


# -- one association -----------------------------------------------------------------------------
class Stream:
    """Routes one association's P-DATA fragments (a :class:`pacs_node.pynetdicom_compat.Router`).
    Runs on that association's DUL thread only."""

    def __init__(self, assoc: Any, intake: Intake) -> None:
        self.assoc, self.intake = assoc, intake
        self.command: list[tuple[int, int, bytes]] = []
        self.incoming: Incoming | None = None
        self.context_id = 0
        self.request: tuple[str, str, int] = ("", "", 0)
        self.data_to_pynetdicom = False  # the current message's data set is pynetdicom's

    def pdu(self, body: bytearray) -> None:
        view, at, end = memoryview(body), 0, len(body)
        while at < end:
            if end - at < 6:
                raise ValueError("P-DATA-TF PDU ends inside a PDV item header")
            (length,) = struct.unpack_from(">I", body, at)
            if length < 2 or at + 4 + length > end:
                raise ValueError(f"PDV item length {length} does not fit its PDU")
            self.pdv(body[at + 4], body[at + 5], view[at + 6 : at + 4 + length])
            at += 4 + length

    def pdv(self, context_id: int, mch: int, data: memoryview) -> None:
        if self.incoming is not None:
            if mch & COMMAND or context_id != self.context_id:
                raise ValueError("a fragment of another message inside a C-STORE data set")
            self.incoming.write(data)
            if mch & LAST:
                self._answer()
        elif self.data_to_pynetdicom or not mch & COMMAND:
            compat.hand_to_dimse(self.assoc, context_id, mch, data)
            if not mch & COMMAND and mch & LAST:
                self.data_to_pynetdicom = False
        else:
            self.command.append((context_id, mch, bytes(data)))
            if mch & LAST:
                self._command_complete()

    def _command_complete(self) -> None:
        fragments, self.command = self.command, []
        context_id = fragments[-1][0]
        try:
            cmd = compat.decode_command(b"".join(f[2] for f in fragments))
            field, has_data = cmd.CommandField, cmd.CommandDataSetType != NO_DATA_SET
        except Exception:  # pynetdicom's assembler meets the same bytes and aborts
            cmd, field, has_data = None, None, False
        context = compat.accepted_context(self.assoc, context_id)
        if cmd is not None and field == C_STORE_RQ and has_data and context is not None:
            self.context_id = context_id
            sop_class = str(cmd.get("AffectedSOPClassUID", ""))
            sop_instance = str(cmd.get("AffectedSOPInstanceUID", ""))
            self.request = (sop_class, sop_instance, int(cmd.get("MessageID", 0)))
            self.incoming = self.intake.incoming(self.assoc, *context, sop_instance)
            return
        for fragment in fragments:
            compat.hand_to_dimse(self.assoc, *fragment)
        self.data_to_pynetdicom = has_data

    def _answer(self) -> None:
        incoming, self.incoming = self.incoming, None
        assert incoming is not None
        try:
            status = incoming.finish()
        except BaseException:  # a bug, not a refusal: drop the file; the association aborts
            incoming.abort()
            raise
        command = store_rsp(*self.request, status)
        max_pdu = self.assoc.requestor.maximum_length or 0
        for pdu in command_pdus(self.context_id, command, max_pdu):
            compat.send_raw(self.assoc, pdu)

    def close(self) -> None:
        """The association ended: a data set still arriving is dropped with its temporary file."""
        if self.incoming is not None:
            self.incoming.abort()
            self.incoming = None


def attach(ae: Any, intake: Intake) -> bool:
    """Stream the C-STORE requests of associations accepted by ``ae`` into ``intake``. False
    where the pynetdicom patches are not installed (its EVT_C_STORE path serves)."""
    return compat.attach(ae, lambda assoc: Stream(assoc, intake))
