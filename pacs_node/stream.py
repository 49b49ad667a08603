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
streamed requests. Like :mod:`pacs_node.scp_fast` this reaches into pynetdicom internals, so it
is installed only on the 3.0 line; elsewhere the intake's EVT_C_STORE handler serves.
"""

from __future__ import annotations

import logging
import struct
import weakref
from collections.abc import Callable, Iterator
from io import BytesIO
from typing import TYPE_CHECKING, Any, cast

from pacs_node import scp_fast

if TYPE_CHECKING:
    from pacs_node.intake import Incoming, Intake

logger = logging.getLogger(__name__)

P_DATA_TF = 0x04
COMMAND, LAST = 0x01, 0x02  # message control header bits (PS3.8 E.2)
C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
NO_DATA_SET = 0x0101
READ_SLICE = 1 << 22  # a PDU's buffer grows by at most this much ahead of its bytes arriving

_intakes: weakref.WeakKeyDictionary[Any, Intake] = weakref.WeakKeyDictionary()
_installed = False


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
class _Stream:
    """Routes one association's P-DATA fragments. Runs on that association's DUL thread only."""

    def __init__(self, dul: Any, intake: Intake) -> None:
        self.dul, self.assoc, self.intake = dul, dul.assoc, intake
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
            self._hand_over(context_id, mch, data)
            if not mch & COMMAND and mch & LAST:
                self.data_to_pynetdicom = False
        else:
            self.command.append((context_id, mch, bytes(data)))
            if mch & LAST:
                self._command_complete()

    def _command_complete(self) -> None:
        from pynetdicom.dsutils import decode

        fragments, self.command = self.command, []
        context_id = fragments[-1][0]
        try:
            cmd = decode(BytesIO(b"".join(f[2] for f in fragments)), True, True)
            field, has_data = cmd.CommandField, cmd.CommandDataSetType != NO_DATA_SET
        except Exception:  # pynetdicom's assembler meets the same bytes and aborts
            cmd, field, has_data = None, None, False
        context = self.assoc._accepted_cx.get(context_id)
        if cmd is not None and field == C_STORE_RQ and has_data and context is not None:
            self.context_id = context_id
            sop_class = str(cmd.get("AffectedSOPClassUID", ""))
            sop_instance = str(cmd.get("AffectedSOPInstanceUID", ""))
            self.request = (sop_class, sop_instance, int(cmd.get("MessageID", 0)))
            self.incoming = self.intake.incoming(
                self.assoc, str(context.abstract_syntax), str(context.transfer_syntax[0]),
                sop_instance,
            )  # fmt: skip
            return
        for fragment in fragments:
            self._hand_over(*fragment)
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
            self.dul.socket.send(pdu)

    def _hand_over(self, context_id: int, mch: int, data: bytes | memoryview) -> None:
        """Give a fragment to pynetdicom's DIMSE assembler, as its DT-2 action would."""
        from pynetdicom.pdu_primitives import P_DATA

        primitive = P_DATA()
        # pynetdicom's setter wants [ID, PDV] lists; its annotation says tuples
        pdv: Any = [context_id, bytes((mch,)) + bytes(data)]
        primitive.presentation_data_value_list = [pdv]
        self.assoc.dimse.receive_primitive(primitive)

    def close(self) -> None:
        """The association ended: a data set still arriving is dropped with its temporary file."""
        if self.incoming is not None:
            self.incoming.abort()
            self.incoming = None


# -- the DUL hooks -------------------------------------------------------------------------------
def _recv(sock: Any, n: int) -> bytearray | None:
    """Exactly ``n`` bytes, or None if the peer closed first."""
    buf = bytearray()
    while len(buf) < n:
        part = bytearray(min(n - len(buf), READ_SLICE))
        view, got = memoryview(part), 0
        while got < len(part):
            k = sock.recv_into(view[got:], len(part) - got)
            if not k:
                return None
            got += k
        if not buf and len(part) == n:
            return part
        buf += part
    return buf


def _stream_for(dul: Any) -> _Stream | None:
    try:
        return cast("_Stream | None", dul.__dict__["_ldct_stream"])
    except KeyError:
        assoc = dul.assoc
        intake = _intakes.get(assoc.ae) if assoc.is_acceptor else None
        stream = _Stream(dul, intake) if intake is not None else None
        dul._ldct_stream = stream
        return stream


def _patched_read(original: Callable[[Any], None]) -> Callable[[Any], None]:
    from pynetdicom.dul import LOGGER as DUL_LOGGER

    def _read_pdu_data(dul: Any) -> None:
        stream = _stream_for(dul)
        if stream is None or dul.state_machine.current_state != "Sta6":
            original(dul)
            return
        sock = dul.socket.socket
        try:
            head = _recv(sock, 6)
            if head is None:
                dul.event_queue.put("Evt17")  # transport connection closed
                return
            pdu_type, _, length = struct.unpack(">BBL", head)
            if not 0x01 <= pdu_type <= 0x07:
                DUL_LOGGER.error(f"Unknown PDU type received '0x{pdu_type:02X}'")
                dul.event_queue.put("Evt19")  # unrecognised PDU
                return
            body = _recv(sock, length)
        except (OSError, TimeoutError) as exc:
            DUL_LOGGER.error("Connection closed before the entire PDU was received")
            DUL_LOGGER.exception(exc)
            dul.event_queue.put("Evt17")
            return
        if body is None:
            DUL_LOGGER.error("Connection closed before the entire PDU was received")
            dul.event_queue.put("Evt17")
            return
        if pdu_type == P_DATA_TF:
            stream.pdu(body)  # an exception here aborts the association (DUL.run_reactor)
            return
        try:  # any other PDU: as pynetdicom's own _read_pdu_data ends
            pdu, event = dul._decode_pdu(head + body)
        except Exception as exc:
            DUL_LOGGER.error("Unable to decode the received PDU data")
            DUL_LOGGER.exception(exc)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    return _read_pdu_data


def _patched_run(original: Callable[[Any], None]) -> Callable[[Any], None]:
    def run_reactor(dul: Any) -> None:
        try:
            original(dul)
        finally:
            stream = dul.__dict__.get("_ldct_stream")
            if stream is not None:
                stream.close()

    return run_reactor


def install() -> bool:
    """Install the DUL hooks once; return whether they are active."""
    global _installed
    if _installed:
        return True
    if not scp_fast.supported():
        return False
    from pynetdicom import dul

    provider = dul.DULServiceProvider
    if not all(hasattr(provider, name) for name in ("_read_pdu_data", "_decode_pdu")):
        logger.warning("pynetdicom's DUL internals differ; C-STORE takes pynetdicom's path")
        return False
    provider._read_pdu_data = _patched_read(provider._read_pdu_data)  # type: ignore[method-assign,assignment]
    provider.run_reactor = _patched_run(provider.run_reactor)  # type: ignore[method-assign,assignment]
    _installed = True
    return True


def attach(ae: Any, intake: Intake) -> bool:
    """Stream the C-STORE requests of associations accepted by ``ae`` into ``intake``. False
    where pynetdicom is not the release line this was written for."""
    if not install():
        return False
    _intakes[ae] = intake
    return True
