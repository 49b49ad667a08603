"""The one place where pacs_node reaches into pynetdicom's internals.

Two changes, both for speed, both optional (pynetdicom's own paths serve without them):

* **Event-driven waits.** pynetdicom's association reactor sleeps 1 ms between looks at its DIMSE
  queue, and its DUL reactor sleeps 1 ms (then ``select(..., 0)``) between looks at the socket;
  each C-STORE waits through several of those naps. Here both naps become waits that end as soon
  as there is work: the DUL thread selects on its socket plus a wake-up socketpair written
  whenever something is queued for it; the association thread waits on an Event set whenever a
  DIMSE message or an ACSE primitive is queued for it. Every wait is bounded (50 ms), so timers
  and kill flags are still seen. It also closes a race in which the reactor steals a response
  meant for a sender on the same association (pynetdicom issues #435, #875).
* **A say in accepting associations.** :func:`set_acceptance` gives an AE a check of the
  association, its calling AE title and the peer's address, run where pynetdicom checks the
  calling AE title; a refusal is answered with the same A-ASSOCIATE-RJ (rejected-permanent,
  service-user, calling AE title not recognised), or, for a :class:`Busy` one, as pynetdicom
  answers its own association limit (rejected-transient, service-provider, local limit
  exceeded).
* **Streamed P-DATA.** While an association of an AE given to :func:`attach` is established
  (Sta6), its DUL thread reads each P-DATA-TF PDU whole and hands it to a router
  (:mod:`pacs_node.receive.stream`) instead of pynetdicom's state machine; every other PDU and
  state takes pynetdicom's path. :func:`hand_to_dimse` gives a fragment back to pynetdicom's
  DIMSE assembler, as its DT-2 action would.

Written for pynetdicom :data:`PINNED` exactly. :func:`install` first checks the version and every
private name it will touch (:data:`PRIVATE`, on the classes and on a throwaway association); if
any is missing, nothing is patched, one warning line says why, and pynetdicom's own paths serve.
``PACS_NODE_PYNETDICOM_PATCHES=off`` keeps them off on purpose (CI runs the intake and forwarding
tests that way too). :func:`uninstall` restores pynetdicom as it was.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import ssl
import struct
import threading
import time
import types
import weakref
from collections.abc import Callable
from io import BytesIO
from typing import Any, Protocol

from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import P_DATA

logger = logging.getLogger(__name__)

PINNED = "3.0.4"
ENV_SWITCH = "PACS_NODE_PYNETDICOM_PATCHES"
NAP = 0.001  # the naps being replaced
BOUND = 0.05  # the longest any replacement wait lasts
P_DATA_TF = 0x04

# Every private (or undocumented) name the patches touch, by owner. Instance attributes are
# checked on a throwaway association (construction starts no thread and opens no socket).
PRIVATE: dict[str, tuple[str, ...]] = {
    "pynetdicom.association": ("time",),
    "pynetdicom.dul": ("time", "LOGGER"),
    "pynetdicom.dsutils": ("decode",),
    "pynetdicom.pdu_primitives": ("P_DATA",),
    "Association": ("_run_reactor", "_reactor_checkpoint", "_accepted_cx", "dul", "dimse", "ae"),
    "DULServiceProvider": (
        "_read_pdu_data",
        "_decode_pdu",
        "run_reactor",
        "to_user_queue",
        "to_provider_queue",
        "event_queue",
        "_recv_pdu",
        "state_machine",
        "socket",
        "assoc",
    ),
    "DIMSEServiceProvider": ("msg_queue", "get_msg", "receive_primitive"),
    "ACSE": ("_negotiate_as_acceptor", "send_reject", "requestor", "assoc"),
}

_originals: dict[tuple[Any, str], Any] = {}
_routers: weakref.WeakKeyDictionary[Any, Callable[[Any], Router]] = weakref.WeakKeyDictionary()


class Busy(str):
    """A refusal for now, not for good: the node's association limit is reached."""


# AE -> check(association, calling AE title, peer address) -> why it is refused, or None
Acceptance = Callable[[Any, str, str], "str | None"]
_acceptance: weakref.WeakKeyDictionary[Any, Acceptance] = weakref.WeakKeyDictionary()


class Router(Protocol):
    """Takes one association's P-DATA-TF PDU bodies (on its DUL thread)."""

    def pdu(self, body: bytearray) -> None: ...

    def close(self) -> None: ...


# -- the check ----------------------------------------------------------------------------------
def problems() -> list[str]:
    """Why the patches cannot be installed here (empty: they can)."""
    import importlib

    import pynetdicom
    from pynetdicom import AE
    from pynetdicom.association import Association

    if str(pynetdicom.__version__) != PINNED:
        return [f"pynetdicom {pynetdicom.__version__} is not {PINNED}, which they are written for"]
    try:
        sample = Association(AE(), "acceptor")
    except Exception as err:  # pragma: no cover - a pynetdicom that changed its constructor
        return [f"cannot build an association to check: {err}"]
    owners: dict[str, Any] = {
        "Association": sample,
        "DULServiceProvider": sample.dul,
        "DIMSEServiceProvider": sample.dimse,
        "ACSE": sample.acse,
    }
    missing = []
    for owner, names in PRIVATE.items():
        obj = owners.get(owner) or importlib.import_module(owner)
        missing += [f"{owner}.{name}" for name in names if not hasattr(obj, name)]
    if not hasattr(sample.dul.state_machine, "current_state"):
        missing.append("DULServiceProvider.state_machine.current_state")
    return [f"missing {name}" for name in missing]


def installed() -> bool:
    return bool(_originals)


def install() -> bool:
    """Install both changes once; return whether they are active."""
    if _originals:
        return True
    if os.environ.get(ENV_SWITCH, "").lower() in ("0", "off", "false", "no"):
        logger.info("%s=off: pynetdicom's own receive and send paths serve", ENV_SWITCH)
        return False
    found = problems()
    if found:
        logger.warning(
            "pynetdicom patches not installed (%s); its own, slower paths serve", "; ".join(found)
        )
        return False
    from pynetdicom import acse, association, dul

    provider = dul.DULServiceProvider
    _patch(association.Association, "__init__", _patched_init(association.Association.__init__))
    _patch(
        acse.ACSE, "_negotiate_as_acceptor", _patched_negotiate(acse.ACSE._negotiate_as_acceptor)
    )
    _patch(dul, "time", _SHIM)
    _patch(association, "time", _SHIM)
    _patch(provider, "_read_pdu_data", _patched_read(provider._read_pdu_data))
    _patch(provider, "run_reactor", _patched_run(provider.run_reactor))
    return True


def uninstall() -> None:
    """Put pynetdicom back as it was (associations already running keep their waits)."""
    while _originals:
        (owner, name), value = _originals.popitem()
        setattr(owner, name, value)


def _patch(owner: Any, name: str, value: Any) -> None:
    _originals[(owner, name)] = getattr(owner, name)
    setattr(owner, name, value)


# -- helpers for the node's SCP and SCU ---------------------------------------------------------
def set_nodelay(event: Any) -> None:
    """EVT_CONN_OPEN handler: TCP_NODELAY on the association's socket (pynetdicom never sets it;
    without it a sender waits ~40 ms for a delayed ACK per C-STORE)."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def attach(ae: Any, router: Callable[[Any], Router]) -> bool:
    """Stream the P-DATA of associations accepted by ``ae`` to ``router(association)``. False
    where the patches are not installed (pynetdicom's own path serves)."""
    if not install():
        return False
    _routers[ae] = router
    return True


def set_acceptance(ae: Any, check: Acceptance) -> bool:
    """Let ``check(association, calling AE title, peer address)`` refuse associations to ``ae``
    (it returns the reason, or None to go on). False where the patches are not installed."""
    if not install():
        return False
    _acceptance[ae] = check
    return True


def accepted_context(assoc: Any, context_id: int) -> tuple[str, str] | None:
    """(abstract syntax, transfer syntax) of an accepted presentation context, or None."""
    cx = assoc._accepted_cx.get(context_id)
    return None if cx is None else (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))


def hand_to_dimse(assoc: Any, context_id: int, mch: int, data: bytes | memoryview) -> None:
    """Give a PDV fragment to pynetdicom's DIMSE assembler, as its DT-2 action would."""
    primitive = P_DATA()
    # pynetdicom's setter wants [ID, PDV] lists; its annotation says tuples
    pdv: Any = [context_id, bytes((mch,)) + bytes(data)]
    primitive.presentation_data_value_list = [pdv]
    assoc.dimse.receive_primitive(primitive)


def send_raw(assoc: Any, data: bytes) -> None:
    """Send encoded PDU bytes on the association's socket (from its DUL thread)."""
    assoc.dul.socket.send(data)


def decode_command(data: bytes) -> Any:
    """A DIMSE command set (Implicit VR Little Endian) as a pydicom Dataset."""
    return decode(BytesIO(data), True, True)


# -- event-driven waits -------------------------------------------------------------------------
def _notify_on_put(q: Any, notify: Callable[[], None]) -> None:
    put = q.put

    def put_and_notify(item: Any, block: bool = True, timeout: float | None = None) -> None:
        put(item, block, timeout)
        notify()

    q.put = put_and_notify


class _TimeShim(types.SimpleNamespace):
    """Stands in for the ``time`` module inside pynetdicom.dul and pynetdicom.association: the
    reactor naps go to the calling thread's wait function, everything else to ``time``."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        if seconds == NAP:
            wait = getattr(threading.current_thread(), "_ldct_wait", None)
            if wait is not None:
                wait()
                return
        time.sleep(seconds)


_SHIM = _TimeShim()


class _Checkpoint(threading.Event):
    """pynetdicom's _reactor_checkpoint, which also wakes the reactor when it is cleared."""

    def __init__(self, on_clear: Callable[[], None]) -> None:
        super().__init__()
        self.set()
        self._on_clear = on_clear

    def clear(self) -> None:
        super().clear()
        self._on_clear()


def _dul_wait(dul: Any) -> Callable[[], None]:
    r, w = socket.socketpair()
    r.setblocking(False)
    w.setblocking(False)
    dul._ldct_wake = w
    weakref.finalize(dul, r.close)
    weakref.finalize(dul, w.close)

    def wait() -> None:
        sock = getattr(getattr(dul, "socket", None), "socket", None)
        if not dul.to_provider_queue.empty() or not dul.event_queue.empty():
            return
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return
        try:
            ready, _, _ = select.select([r] if sock is None else [sock, r], [], [], BOUND)
        except (OSError, ValueError):
            time.sleep(NAP)
            return
        if r in ready:
            try:
                while r.recv(4096):
                    pass
            except OSError:
                pass

    return wait


def _wake_dul(dul: Any) -> None:
    if threading.current_thread() is dul:  # it queued for itself, so it is not waiting
        return
    with contextlib.suppress(OSError):  # buffer full (already awake) or closed
        dul._ldct_wake.send(b"\0")


def _patched_init(original: Callable[..., None]) -> Callable[..., None]:
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        dul, dimse = self.dul, self.dimse
        woke = threading.Event()
        # A sender (send_c_store, release, ...) pauses the reactor by clearing this checkpoint and
        # spinning until the reactor shows _is_paused, which it does only once its nap is over:
        # the clear wakes it, or each request would wait out the whole bounded wait.
        self._reactor_checkpoint = _Checkpoint(woke.set)

        def assoc_wait() -> None:
            if dimse.msg_queue.empty() and dul.to_user_queue.empty():
                woke.wait(BOUND)
            woke.clear()

        _notify_on_put(dimse.msg_queue, woke.set)
        _notify_on_put(dul.to_user_queue, woke.set)
        _notify_on_put(dul.to_provider_queue, lambda: _wake_dul(dul))
        _notify_on_put(dul.event_queue, lambda: _wake_dul(dul))
        self._ldct_wait = assoc_wait
        dul._ldct_wait = _dul_wait(dul)

        # The reactor race: a sender pauses the reactor by clearing _reactor_checkpoint and
        # waiting for _is_paused, but a reactor that has just passed the checkpoint still shows
        # _is_paused and can take the sender's response off the queue ("Received unexpected
        # C-STORE service message", then a DIMSE time-out). Here the reactor's own look at the
        # queue yields nothing while a sender holds it.
        get_msg = dimse.get_msg
        checkpoint = self._reactor_checkpoint

        def guarded_get_msg(block: bool = False) -> Any:
            if threading.current_thread() is self and not checkpoint.is_set():
                return None, None
            return get_msg(block)

        dimse.get_msg = guarded_get_msg

    return __init__


# -- acceptance -----------------------------------------------------------------------------------
def _patched_negotiate(original: Callable[[Any], None]) -> Callable[[Any], None]:
    from pynetdicom import evt

    def _negotiate_as_acceptor(self: Any) -> None:
        check = _acceptance.get(self.assoc.ae)
        if check is not None:
            rq = self.requestor.primitive
            calling = str(rq.calling_ae_title).strip()
            why = check(self.assoc, calling, str(self.requestor.address))
            if why is not None:
                self.requestor.ae_title = rq.calling_ae_title
                self.assoc._ldct_refusal = why  # for the EVT_REJECTED log line
                if isinstance(why, Busy):
                    self.send_reject(0x02, 0x03, 0x02)  # transient, provider, local limit
                else:
                    self.send_reject(0x01, 0x01, 0x03)  # permanent, user, calling AE title
                evt.trigger(self.assoc, evt.EVT_REJECTED, {})
                self.assoc.kill()
                return
        original(self)

    return _negotiate_as_acceptor


def refusal(assoc: Any) -> str | None:
    """Why an acceptance check refused this association (None: it did not)."""
    return getattr(assoc, "_ldct_refusal", None)


# -- streamed P-DATA ----------------------------------------------------------------------------
READ_SLICE = 1 << 22  # a PDU's buffer grows by at most this much ahead of its bytes arriving


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


def _router_for(dul: Any) -> Router | None:
    try:
        return dul.__dict__["_ldct_router"]
    except KeyError:
        assoc = dul.assoc
        factory = _routers.get(assoc.ae) if assoc.is_acceptor else None
        router = factory(assoc) if factory is not None else None
        dul._ldct_router = router
        return router


def _patched_read(original: Callable[[Any], None]) -> Callable[[Any], None]:
    from pynetdicom.dul import LOGGER as DUL_LOGGER

    def _read_pdu_data(dul: Any) -> None:
        router = _router_for(dul)
        if router is None or dul.state_machine.current_state != "Sta6":
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
            limit = dul.assoc.ae.maximum_pdu_size  # what we advertised (0: no limit)
            if limit and length > limit:  # PS3.8 D.1: the limit is on the PDU's variable field
                logger.warning(
                    "association from %s aborted: a PDU of %d bytes, above the %d it was offered",
                    dul.assoc.requestor.address,
                    length,
                    limit,
                )
                dul.event_queue.put("Evt19")  # as an unrecognised PDU: A-ABORT, then close
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
            router.pdu(body)  # an exception here aborts the association (DUL.run_reactor)
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
            router = dul.__dict__.get("_ldct_router")
            if router is not None:
                router.close()

    return run_reactor
