"""The C-STORE handler side of the SCP: each request becomes an :class:`Incoming`; the intake
answers its status and keeps the per-association counts for the audit line.

No pixel decoding, inference or network calls happen on the association's thread.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from io import BytesIO
from typing import Any, cast

from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE

from pacs_node.config import RuleConfig, default_rules
from pacs_node.jobs import JobStore
from pacs_node.metrics import Metrics
from pacs_node.receive.incoming import Incoming
from pacs_node.receive.rules import Refused
from pacs_node.route.rules import Decision
from pacs_node.status import Status, describe
from pacs_node.storage import Storage, valid_uid

logger = logging.getLogger(__name__)


class Intake:
    """Handles C-STORE requests for one node; counts per association for the audit line."""

    def __init__(
        self,
        storage: Storage,
        jobs: JobStore,
        metrics: Metrics | None = None,
        rules: tuple[RuleConfig, ...] | None = None,
        destinations: tuple[str, ...] = ("default",),
    ) -> None:
        self.storage = storage
        self.jobs = jobs
        self.metrics = metrics
        self.rules = default_rules() if rules is None else rules
        self.destinations = destinations
        self._lock = threading.Lock()
        self._per_assoc: dict[int, Counter[str]] = {}
        self._series: dict[int, set[str]] = {}  # per association: the series it stored
        self.arrived = threading.Event()  # wakes this process's workers

    def _count(self, assoc_key: int, key: str) -> None:
        with self._lock:
            self._per_assoc.setdefault(assoc_key, Counter())[key] += 1

    def incoming(
        self, assoc: Any, sop_class: str, transfer_syntax: str, affected_uid: str
    ) -> Incoming:
        caller = str(assoc.requestor.ae_title).strip()
        peer = str(assoc.requestor.address)
        return Incoming(self, id(assoc), caller, peer, sop_class, transfer_syntax, affected_uid)

    def stored(self, incoming: Incoming) -> int:
        self._count(incoming.assoc_key, "stored")
        if incoming.accepted is not None:
            with self._lock:
                self._series.setdefault(incoming.assoc_key, set()).add(incoming.accepted.series)
        if self.metrics:
            self.metrics.received.inc()
        self.arrived.set()
        return int(Status.SUCCESS)

    def ignored(self, incoming: Incoming, route: Decision) -> int:
        self._count(incoming.assoc_key, "ignored")
        if self.metrics:
            self.metrics.ignored.inc()
        logger.info(
            "C-STORE from %s: SOP instance %s ignored by rule %r (answered Success, kept nothing)",
            incoming.caller,
            incoming.affected,
            route.rule,
        )
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
            describe(r.status),
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
            series = self._series.pop(id(event.assoc), set())
        rq = event.assoc.requestor
        outcome = "released" if event.event is evt.EVT_RELEASED else "aborted"
        if outcome == "released" and series:  # an aborted one never completes a series early
            try:
                self.jobs.mark_released(sorted(series))
            except Exception:  # the series still completes when quiet
                logger.warning(
                    "recording the release of %d series failed", len(series), exc_info=True
                )
        if self.metrics:
            self.metrics.associations.labels(outcome).inc()
        refused = sum(v for k, v in counts.items() if k.startswith("refused"))
        logger.info(
            "association from %s (%s:%s) %s: %d stored, %d ignored, %d refused",
            str(rq.ae_title).strip(),
            rq.address,
            rq.port,
            outcome,
            counts["stored"],
            counts["ignored"],
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
