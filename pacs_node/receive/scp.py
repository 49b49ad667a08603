"""The Storage SCP: application entity, presentation contexts, allow-list, TLS, handlers."""

from __future__ import annotations

import ipaddress
import logging
import socket
import socketserver
import ssl
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node import pynetdicom_compat as compat
from pacs_node.config import NodeConfig
from pacs_node.receive import stream
from pacs_node.receive.slots import AssociationSlots
from pacs_node.status import Status

if TYPE_CHECKING:
    from pacs_node.receive.intake import Intake

logger = logging.getLogger(__name__)

VERIFICATION = "1.2.840.10008.1.1"


def handle_echo(event: evt.Event) -> int:
    return Status.SUCCESS


def address_check(node: NodeConfig) -> compat.Acceptance:
    """Refuses an allowed calling AE title calling from outside the networks it is bound to
    (``"CT1@10.2.0.0/24"`` in node.allowed_calling_ae_titles)."""
    callers = node.callers

    def check(assoc: Any, calling: str, address: str) -> str | None:
        networks = callers.get(calling, ())
        if not networks:
            return None
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            ip = None
        if ip is not None and any(ip in net for net in networks):
            return None
        where = ", ".join(str(n) for n in networks)
        return f"calling AE title {calling!r} may call only from {where}, not from {address}"

    return check


def handle_rejected(event: evt.Event, node: NodeConfig) -> None:
    rq = event.assoc.requestor
    called = str(getattr(rq.primitive, "called_ae_title", "?")).strip()
    calling = str(rq.ae_title).strip()
    bound = compat.refusal(event.assoc)
    if bound is not None:
        reason = bound
    elif not node.accepts_any_caller and calling not in node.callers:
        reason = "calling AE title not in node.allowed_calling_ae_titles"
    elif called != node.ae_title:
        reason = f"called AE title is not {node.ae_title!r}"
    else:
        reason = f"node.max_associations ({node.max_associations}) reached"
    logger.warning(
        "association rejected: calling AE %r, called AE %r, peer %s:%s: %s",
        calling,
        called,
        rq.address,
        rq.port,
        reason,
    )


def make_ssl_context(node: NodeConfig) -> ssl.SSLContext | None:
    if node.tls is None:
        return None
    tls = node.tls
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(tls.certificate), str(tls.private_key))
    if tls.ca_certificates is not None:
        ctx.load_verify_locations(cafile=str(tls.ca_certificates))
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_certificate else ssl.CERT_OPTIONAL
    if tls.ca_certificates is None:
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class SharedPortServer(ThreadedAssociationServer):
    """Binds with SO_REUSEPORT: every receiving process listens on the same port and the kernel
    spreads new connections over them."""

    def server_bind(self) -> None:
        assert self.socket is not None
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def shutdown(self) -> None:
        # as pynetdicom's, less forgetting it in the AE's list of servers it never joined
        socketserver.BaseServer.shutdown(self)
        self.server_close()


class StorageSCP:
    """One listening AE. ``start()`` returns once the port is bound; ``stop()`` closes it.

    With ``slots`` (``node.receive_processes`` > 1) it shares its port with the other receiving
    processes, and node.max_associations counts the associations of all of them."""

    def __init__(
        self,
        node: NodeConfig,
        handlers: list[Any] | None = None,
        storage_syntaxes: list[str] | None = None,
        stream_to: Intake | None = None,
        slots: Path | None = None,
    ) -> None:
        self.config = node
        compat.install()
        self.ae = AE(ae_title=node.ae_title)
        # C-STORE data sets straight to the intake's files as they arrive; where that cannot be
        # installed, the intake's EVT_C_STORE handler (in ``handlers``) serves instead.
        self.streaming = stream_to is not None and stream.attach(self.ae, stream_to)
        # pynetdicom's own limit counts every connection's thread, negotiated or not (a port probe,
        # a half-open socket); where the slots count the node's associations, it only bounds those
        # threads, far above the limit the slots keep.
        self.ae.maximum_associations = node.max_associations + (64 if slots else 0)
        self.ae.maximum_pdu_size = node.max_pdu_size
        self.ae.network_timeout = node.network_timeout_seconds
        self.ae.acse_timeout = node.network_timeout_seconds
        self.ae.dimse_timeout = node.network_timeout_seconds
        self.ae.require_called_aet = True
        if not node.accepts_any_caller:
            self.ae.require_calling_aet = list(node.callers)
        self._check_address = address_check(node)
        self.slots = AssociationSlots(slots, node.max_associations) if slots else None
        # A title bound to addresses, or no free slot: refused at negotiation where the patches
        # serve; else (pynetdicom's own path) aborted as soon as it is accepted, before any data.
        checked = any(node.callers.values()) or self.slots is not None
        self.binds = checked and not compat.set_acceptance(self.ae, self._check)
        self.ae.add_supported_context(VERIFICATION)
        if storage_syntaxes:
            # Every storage SOP class is accepted at negotiation so that a non-CT instance gets a
            # C-STORE status and a log line naming the reason, not a silent context rejection.
            for cx in AllStoragePresentationContexts:
                self.ae.add_supported_context(str(cx.abstract_syntax), storage_syntaxes)
        self._handlers = [
            *([(evt.EVT_ACCEPTED, self._abort_unbound)] if self.binds else []),
            (evt.EVT_C_ECHO, handle_echo),
            (evt.EVT_CONN_OPEN, compat.set_nodelay),
            (evt.EVT_REJECTED, handle_rejected, [node]),
            *([(evt.EVT_CONN_CLOSE, self._give_back)] if self.slots else []),
            *(handlers or []),
        ]
        self.server: ThreadedAssociationServer | None = None

    def _check(self, assoc: Any, calling: str, address: str) -> str | None:
        why = self._check_address(assoc, calling, address)
        if why is None and self.slots is not None and not self.slots.take(id(assoc)):
            n = self.config.max_associations
            return compat.Busy(f"node.max_associations ({n}) reached across receiving processes")
        return why

    def _give_back(self, event: evt.Event) -> None:
        assert self.slots is not None
        self.slots.give_back(id(event.assoc))

    def _abort_unbound(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        why = self._check(event.assoc, str(rq.ae_title).strip(), str(rq.address))
        if why is not None:
            logger.warning("association aborted: %s", why)
            event.assoc.abort()

    def start(self) -> None:
        address = (self.config.bind, self.config.port)
        ssl_context = make_ssl_context(self.config)
        if self.slots is None:
            self.server = self.ae.start_server(
                address, block=False, evt_handlers=self._handlers, ssl_context=ssl_context
            )
        else:
            self.server = self.ae.make_server(
                address,
                evt_handlers=self._handlers,
                ssl_context=ssl_context,
                server_class=SharedPortServer,
            )
            threading.Thread(
                target=self.server.serve_forever, name="AcceptorServer", daemon=True
            ).start()
        logger.info(
            "listening as %s on %s:%d%s",
            self.config.ae_title,
            self.config.bind,
            self.port,
            " (TLS)" if self.config.tls else "",
        )

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.server_address[1])

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None
