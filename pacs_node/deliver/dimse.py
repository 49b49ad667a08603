"""C-STORE SCU to the configured destination, every response status classified.

Success and Warning mean delivered. A Failure status, a refused or dropped association, or a
time-out raise RetryableError after the instances delivered so far have been reported, so a retry
sends only what is missing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from pacs_node import pynetdicom_compat as compat
from pacs_node.config import DestinationConfig
from pacs_node.errors import RetryableError
from pacs_node.status import category, describe

logger = logging.getLogger(__name__)


class Forwarder:
    def __init__(self, dest: DestinationConfig) -> None:
        self.dest = dest
        compat.install()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.dest.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_seconds
        ae.maximum_pdu_size = 0
        ae.add_requested_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        return ae

    def echo(self) -> bool:
        ae = self._ae()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate(
            self.dest.host,
            self.dest.port,
            ae_title=self.dest.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, compat.set_nodelay)],
        )
        if not assoc.is_established:
            return False
        try:
            status = assoc.send_c_echo()
            return bool(status) and int(status.Status) == 0
        finally:
            assoc.release()

    def send(self, items: Iterable[tuple[int, Path]], delivered: Callable[[int, int], None]) -> int:
        """C-STORE each (instance id, file); call ``delivered(id, status)`` for each delivered one.

        Returns how many were delivered; raises RetryableError at the first failure.
        """
        items = list(items)
        if not items:
            return 0
        d = self.dest
        assoc = self._ae().associate(
            d.host,
            d.port,
            ae_title=d.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, compat.set_nodelay)],
        )
        if not assoc.is_established:
            why = (
                "rejected"
                if assoc.is_rejected
                else "aborted"
                if assoc.is_aborted
                else "no connection"
            )
            raise RetryableError(f"destination {d.ae_title}@{d.host}:{d.port}: association {why}")
        sent = 0
        try:
            for instance_id, path in items:
                rsp = assoc.send_c_store(path)
                if not rsp or "Status" not in rsp:
                    raise RetryableError(
                        f"destination {d.ae_title}: no response to C-STORE (time-out or abort)"
                    )
                code = int(rsp.Status)
                kind = category(code)
                if kind == "Warning":
                    logger.warning(
                        "destination %s accepted %s with warning 0x%04X (%s)",
                        d.ae_title,
                        path.name,
                        code,
                        describe(code),
                    )
                elif kind != "Success":
                    raise RetryableError(
                        f"destination {d.ae_title} answered 0x{code:04X} ({kind}: {describe(code)})"
                    )
                delivered(instance_id, code)
                sent += 1
        finally:
            if assoc.is_established:
                assoc.release()
        return sent
