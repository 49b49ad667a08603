"""The Storage SCP: application entity, presentation contexts, allow-list, TLS, handlers."""

from __future__ import annotations

import ipaddress
import logging
import ssl
from typing import TYPE_CHECKING, Any

from pynetdicom import AE, AllStoragePresentationContexts, evt
from pynetdicom.transport import ThreadedAssociationServer

from pacs_node import pynetdicom_compat as compat
from pacs_node.config import NodeConfig
from pacs_node.receive import stream
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

    def check(calling: str, address: str) -> str | None:
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


class StorageSCP:
    """One listening AE. ``start()`` returns once the port is bound; ``stop()`` closes it."""

    def __init__(
        self,
        node: NodeConfig,
        handlers: list[Any] | None = None,
        storage_syntaxes: list[str] | None = None,
        stream_to: Intake | None = None,
    ) -> None:
        self.config = node
        compat.install()
        self.ae = AE(ae_title=node.ae_title)
        # C-STORE data sets straight to the intake's files as they arrive; where that cannot be
        # installed, the intake's EVT_C_STORE handler (in ``handlers``) serves instead.
        self.streaming = stream_to is not None and stream.attach(self.ae, stream_to)
        self.ae.maximum_associations = node.max_associations
        self.ae.maximum_pdu_size = node.max_pdu_size
        self.ae.network_timeout = node.network_timeout_seconds
        self.ae.acse_timeout = node.network_timeout_seconds
        self.ae.dimse_timeout = node.network_timeout_seconds
        self.ae.require_called_aet = True
        if not node.accepts_any_caller:
            self.ae.require_calling_aet = list(node.callers)
        self._check_address = address_check(node)
        # A title bound to addresses: refused at negotiation where the patches serve; else
        # (pynetdicom's own path) aborted as soon as it is accepted, before any data.
        self.binds = any(node.callers.values()) and not compat.set_acceptance(
            self.ae, self._check_address
        )
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
            *(handlers or []),
        ]
        self.server: ThreadedAssociationServer | None = None

    def _abort_unbound(self, event: evt.Event) -> None:
        rq = event.assoc.requestor
        why = self._check_address(str(rq.ae_title).strip(), str(rq.address))
        if why is not None:
            logger.warning("association aborted: %s", why)
            event.assoc.abort()

    def start(self) -> None:
        self.server = self.ae.start_server(
            (self.config.bind, self.config.port),
            block=False,
            evt_handlers=self._handlers,
            ssl_context=make_ssl_context(self.config),
        )
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
