"""What a worker records on the job it holds, and ``pacs-node retry``."""

from __future__ import annotations

import time

from pacs_node.jobs import queries
from pacs_node.jobs.leases import Claim, Leases
from pacs_node.jobs.schema import InstanceState, JobState


class StateChanges(Leases):
    def pending_instances(
        self, claim: Claim, state: InstanceState
    ) -> list[tuple[int, str, str | None]]:
        """(id, path, derived_path) of the job's instances in ``state``."""
        with self.engine.connect() as conn:
            rows = conn.execute(queries.instances_in(claim.job_id, state)).all()
        return [(int(r.id), r.path, r.derived_path) for r in rows]

    def mark_denoised(
        self,
        claim: Claim,
        done: list[tuple[int, str, str]],
        model_version: str,
        tally: str | None = None,
    ) -> None:
        """[(instance id, derived uid, derived path)] -> denoised, in one transaction, with the
        gate's figures so far (``tally``, JSON) when given."""
        now = time.time()
        extra: dict[str, object] = {} if tally is None else {"tally": tally}
        with self.transaction() as conn:
            self._held(conn, claim, None, heartbeat_at=now, model_version=model_version, **extra)
            for iid, uid, path in done:
                conn.execute(queries.denoise_instance(iid, uid, path, now))

    def mark_instance_failed(self, claim: Claim, iid: int, error: str) -> None:
        with self.transaction() as conn:
            self._held(conn, claim)
            conn.execute(
                queries.set_instances(
                    [iid], InstanceState.FAILED, time.time(), last_error=error[:2000]
                )
            )

    def record_quality(self, claim: Claim, quality: str, flagged: bool) -> None:
        """The gate's figures (JSON) and whether they failed it but the series goes on."""
        with self.transaction() as conn:
            self._held(conn, claim, quality=quality, flagged=flagged)

    def defer(self, claim: Claim, error: str, delay: float, max_attempts: int) -> JobState:
        """After a retryable error: back to ready after ``delay``, or failed at max_attempts."""
        state = JobState.FAILED if claim.attempts >= max_attempts else JobState.READY
        with self.transaction() as conn:
            self._held(
                conn,
                claim,
                state,
                worker=None,
                last_error=error[:2000],
                next_attempt_at=time.time() + delay,
            )
        return state

    def fail(self, claim: Claim, error: str, **values: object) -> None:
        with self.transaction() as conn:
            self._held(conn, claim, JobState.FAILED, worker=None, last_error=error[:2000], **values)

    def retry(self, job_id: int, destination: str | None = None) -> str | None:
        """A failed job back to ready with its attempts reset (``pacs-node retry``): every
        destination that gave up, or only ``destination``, is tried again; what was delivered
        is not sent again.

        Returns None on success, else why not (not failed, unknown, the destination is not the
        job's, or the series has a newer open round: retry once that one is finished).
        """
        with self.transaction() as conn:
            row = conn.execute(queries.job_state(job_id)).first()
            if row is None:
                return f"job {job_id} does not exist"
            if row.state != JobState.FAILED.value:
                return f"job {job_id} is {row.state}, not failed"
            open_job = conn.execute(queries.open_job_of(row.series_uid)).scalar()
            if open_job is not None:
                return (
                    f"job {job_id}: its series has an open job {open_job}; "
                    "retry when that one is done"
                )
            if destination is not None:
                names = conn.execute(queries.destinations_of(job_id)).scalars().all()
                if destination not in names:
                    known = ", ".join(names) or "none yet"
                    return f"job {job_id} has no destination {destination!r} (it has: {known})"
            conn.execute(queries.requeue_failed(job_id, time.time()))
            conn.execute(queries.undo_failed_instances(job_id))
            conn.execute(queries.retry_destinations(job_id, destination, time.time()))
        return None
