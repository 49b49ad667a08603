"""Claims and leases: a worker takes a job atomically, keeps it alive with heartbeats, and a
job whose worker went silent is requeued by the reaper (any worker runs it)."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pacs_node.jobs import queries
from pacs_node.jobs.db import Database
from pacs_node.jobs.schema import JobState, jobs

logger = logging.getLogger(__name__)


class LostClaim(Exception):
    """The job was requeued (the reaper judged this worker dead) or changed under us."""


@dataclass(frozen=True)
class Claim:
    job_id: int
    series_uid: str
    study_uid: str
    attempts: int
    worker: str
    action: str = "denoise"  # denoise | pass
    destinations: tuple[str, ...] = ("default",)
    send_original: bool = False
    tally: str | None = None  # the gate's figures of the chunks denoised before this claim
    judged: bool = False  # the gate has judged the series before (e.g. a retried job)


class Leases(Database):
    def claim(
        self,
        worker: str,
        completion: float | queries.Completion,
        now: float | None = None,
        early_chunk: int = 0,
    ) -> Claim | None:
        """Atomically take the oldest ready job, or a receiving one that is complete (a number:
        quiet for that many seconds) or has ``early_chunk`` instances waiting to be denoised
        (any, while none of it has been), whose retry time has come; None when there is none."""
        now = time.time() if now is None else now
        if not isinstance(completion, queries.Completion):
            completion = queries.Completion(completion)
        stmt = queries.claim(worker, completion, now, self.is_postgres, early_chunk)
        with self.transaction() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        return Claim(
            int(row.id),
            row.series_uid,
            row.study_uid,
            int(row.attempts),
            worker,
            row.action,
            tuple(json.loads(row.destinations)),
            bool(row.send_original),
            row.tally,
            row.quality is not None,
        )

    def _held(
        self, conn: Connection, claim: Claim, to: JobState | None = None, **values: Any
    ) -> None:
        """Update the job ``claim`` holds (moving it ``to`` a state, if given); LostClaim if it
        is no longer held by this worker."""
        n = conn.execute(
            queries.held(claim.job_id, claim.worker, to, updated_at=time.time(), **values)
        ).rowcount
        if not n:
            raise LostClaim(f"job {claim.job_id} is no longer held by {claim.worker}")

    def heartbeat(self, claim: Claim) -> None:
        with self.transaction() as conn:
            self._held(conn, claim, heartbeat_at=time.time())

    def reap(self, stale_after: float, now: float | None = None) -> int:
        """Requeue running/forwarding jobs whose worker has not beaten for ``stale_after``."""
        now = time.time() if now is None else now
        with self.transaction() as conn:
            n = int(conn.execute(queries.reap(now - stale_after, now)).rowcount)
        if n:
            logger.warning("requeued %d job(s) whose worker went silent", n)
        return n

    def release(self, claim: Claim) -> None:
        """Give a job back as it is (worker shutting down, or an incomplete series denoised as
        far as it has arrived): receiving again, claimed once complete or once more waits;
        the attempt is not counted."""
        less_one = jobs.c.attempts - 1
        attempts = sa.func.greatest(less_one, 0) if self.is_postgres else sa.func.max(less_one, 0)
        with self.transaction() as conn:
            self._held(conn, claim, JobState.RECEIVING, worker=None, attempts=attempts)

    def is_complete(
        self, claim: Claim, completion: queries.Completion, now: float | None = None
    ) -> bool:
        """Whether the claimed series has all arrived, by ``completion``'s rule."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            return bool(conn.execute(queries.is_complete(claim.job_id, completion, now)).scalar())

    def mark_released(self, series: list[str], now: float | None = None) -> None:
        """An association that stored instances of these series was released normally."""
        if series:
            with self.transaction() as conn:
                conn.execute(queries.mark_released(series, time.time() if now is None else now))
