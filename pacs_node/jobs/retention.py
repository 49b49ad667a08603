"""Removing the files of delivered series: at once, or ``storage.keep_days`` later."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pacs_node.jobs import queries, report_queries
from pacs_node.jobs.db import Database
from pacs_node.jobs.leases import Claim
from pacs_node.jobs.schema import InstanceState
from pacs_node.storage import Storage

logger = logging.getLogger(__name__)

Files = list[tuple[int, str, str | None]]  # (instance id, received path, derived path)


class Retention(Database):
    def expired_files(self, older_than: float, limit: int = 1000) -> Files:
        """Delivered instances of done jobs finished before ``older_than`` whose files have not
        been removed yet."""
        with self.engine.connect() as conn:
            rows = conn.execute(report_queries.expired(older_than, limit)).all()
        return [(int(r.id), r.path, r.derived_path) for r in rows]

    def forget_files(self, ids: list[int]) -> None:
        """Record that the files of these instances were removed."""
        if ids:
            with self.transaction() as conn:
                conn.execute(report_queries.forget_files(ids))

    def remove_files(self, storage: Storage, items: Files) -> None:
        for _, path, derived in items:
            if path:
                storage.remove(Path(path))
            if derived:
                storage.remove(Path(derived))
        self.forget_files([iid for iid, _, _ in items])

    def remove_delivered(self, storage: Storage, claim: Claim) -> None:
        """The files of a job just delivered (``storage.keep_days = 0``)."""
        with self.engine.connect() as conn:
            rows = conn.execute(queries.instances_in(claim.job_id, InstanceState.DELIVERED)).all()
        self.remove_files(storage, [(int(r.id), r.path, r.derived_path) for r in rows])

    def sweep(self, storage: Storage, keep_days: float) -> int:
        """Remove the files of jobs delivered more than ``keep_days`` ago."""
        if keep_days <= 0:
            return 0
        expired = self.expired_files(time.time() - keep_days * 86400)
        self.remove_files(storage, expired)
        if expired:
            logger.info("retention: removed the files of %d delivered instances", len(expired))
        return len(expired)
