"""C-STORE SCU to a DIMSE destination, every response status classified.

Files go out as they are stored: each (SOP class, transfer syntax) among them gets a presentation
context of its own, and a file whose exact context the destination accepted is sent byte for
byte, without being decoded (pynetdicom's STORE_SEND_CHUNKED_DATASET). A file whose transfer
syntax the destination refused is decoded and sent in one it accepted (logged once per
association). Success and Warning mean delivered. A Failure status, a refused or dropped
association, or a time-out raise RetryableError after the files delivered so far have been
reported, so a retry sends only what is missing.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable
from pathlib import Path

import pydicom
from pydicom.filereader import read_file_meta_info
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt

from pacs_node import pynetdicom_compat as compat
from pacs_node.config import DestinationConfig
from pacs_node.errors import PermanentError, RetryableError
from pacs_node.status import category, describe

logger = logging.getLogger(__name__)

_config.STORE_SEND_CHUNKED_DATASET = True  # files are sent as stored, not decoded and re-encoded
MAX_CONTEXTS = 128  # PS3.8: odd context IDs 1-255
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

Delivered = Callable[[int, int], None]  # (item id, status) for each delivered file


def _tls_context(dest: DestinationConfig) -> ssl.SSLContext | None:
    if dest.tls is None:
        return None
    ctx = ssl.create_default_context(
        cafile=str(dest.tls.ca_certificates) if dest.tls.ca_certificates else None
    )
    if dest.tls.certificate is not None:
        ctx.load_cert_chain(
            str(dest.tls.certificate),
            str(dest.tls.private_key) if dest.tls.private_key else None,
        )
    return ctx


class Forwarder:
    def __init__(self, dest: DestinationConfig) -> None:
        self.dest = dest
        compat.install()

    def _ae(self) -> AE:
        ae = AE(ae_title=self.dest.calling_ae_title)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.dest.timeout_seconds
        ae.maximum_pdu_size = 0
        return ae

    def _associate(self, ae: AE) -> object:
        d = self.dest
        ctx = _tls_context(d)
        return ae.associate(
            d.host,
            d.port,
            ae_title=d.ae_title,
            evt_handlers=[(evt.EVT_CONN_OPEN, compat.set_nodelay)],
            tls_args=(ctx, d.host) if ctx is not None else None,
        )

    def echo(self) -> bool:
        ae = self._ae()
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = self._associate(ae)
        if not assoc.is_established:  # type: ignore[attr-defined]
            return False
        try:
            status = assoc.send_c_echo()  # type: ignore[attr-defined]
            return bool(status) and int(status.Status) == 0
        finally:
            assoc.release()  # type: ignore[attr-defined]

    def send(self, items: list[tuple[int, Path]], delivered: Delivered) -> int:
        """C-STORE each (id, file); call ``delivered(id, status)`` for each delivered one.

        Returns how many were delivered; raises RetryableError at the first failure.
        """
        if not items:
            return 0
        d = self.dest
        kinds: dict[Path, tuple[str, str]] = {}
        for _, path in items:
            try:
                meta = read_file_meta_info(path)
                kinds[path] = (str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID))
            except Exception as err:
                raise PermanentError(f"{path.name}: not a DICOM file to send: {err}") from None
        ae = self._ae()
        wanted = sorted(set(kinds.values()))
        for sop_class in sorted({k[0] for k in wanted}):  # an uncompressed fallback per class
            wanted += [(sop_class, ts) for ts in UNCOMPRESSED if (sop_class, ts) not in wanted]
        if len(wanted) > MAX_CONTEXTS:
            raise PermanentError(
                f"{len(wanted)} kinds of objects in one association (at most {MAX_CONTEXTS})"
            )
        for sop_class, ts in wanted:
            ae.add_requested_context(sop_class, ts)
        assoc = self._associate(ae)
        if not assoc.is_established:  # type: ignore[attr-defined]
            why = (
                "rejected"
                if assoc.is_rejected  # type: ignore[attr-defined]
                else "aborted"
                if assoc.is_aborted  # type: ignore[attr-defined]
                else "no connection"
            )
            raise RetryableError(f"destination {d.name} ({d.ae_title}@{d.host}:{d.port}): {why}")
        accepted = {
            (str(cx.abstract_syntax), str(cx.transfer_syntax[0]))
            for cx in assoc.accepted_contexts  # type: ignore[attr-defined]
        }
        sent = 0
        converted = False
        try:
            for item_id, path in items:
                what: Path | pydicom.Dataset = path
                if kinds[path] not in accepted:
                    what = self._converted(path, kinds[path][0], accepted)
                    if not converted:
                        logger.warning(
                            "destination %s refused transfer syntax %s for %s; sending decoded",
                            d.name,
                            kinds[path][1],
                            kinds[path][0],
                        )
                        converted = True
                rsp = assoc.send_c_store(what)  # type: ignore[attr-defined]
                if not rsp or "Status" not in rsp:
                    raise RetryableError(
                        f"destination {d.name}: no response to C-STORE (time-out or abort)"
                    )
                code = int(rsp.Status)
                kind = category(code)
                if kind == "Warning":
                    logger.warning(
                        "destination %s accepted %s with warning 0x%04X (%s)",
                        d.name,
                        path.name,
                        code,
                        describe(code),
                    )
                elif kind != "Success":
                    raise RetryableError(
                        f"destination {d.name} answered 0x{code:04X} ({kind}: {describe(code)})"
                    )
                delivered(item_id, code)
                sent += 1
        finally:
            if assoc.is_established:  # type: ignore[attr-defined]
                assoc.release()  # type: ignore[attr-defined]
        return sent

    @staticmethod
    def _converted(path: Path, sop_class: str, accepted: set[tuple[str, str]]) -> pydicom.Dataset:
        """The file decoded into an uncompressed syntax the destination accepted."""
        target = next((ts for ts in UNCOMPRESSED if (sop_class, ts) in accepted), None)
        if target is None:
            raise RetryableError(f"the destination accepted no context for SOP class {sop_class}")
        ds = pydicom.dcmread(path)
        if ds.file_meta.TransferSyntaxUID.is_compressed:
            ds.decompress()
        ds.file_meta.TransferSyntaxUID = target
        return ds
