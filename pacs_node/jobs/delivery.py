"""Delivery per destination: which objects of a job each destination still needs, its attempts
and back-off, and what a job becomes once every destination has been tried.

When a job starts forwarding, each of its destinations gets a ``job_destinations`` row and each
object to send there (the derived instance, the original with ``send_original`` or for a
``pass`` job) a ``deliveries`` row. Destinations are then served independently: one that fails
backs off on its own schedule and gives up after its own ``max_attempts``, while the others
finish. A job is done when every destination has everything, failed when a destination gave up
(``pacs-node retry JOB [--destination NAME]`` requeues), and otherwise waits, ready, for the next
due retry.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from pacs_node.jobs.leases import Claim, Leases
from pacs_node.jobs.schema import (
    Action,
    DeliveryState,
    InstanceState,
    JobState,
    deliveries,
    instances,
    job_destinations,
)

d, i, jd = deliveries.c, instances.c, job_destinations.c
PENDING, DELIVERED, FAILED = (s.value for s in DeliveryState)


class Deliveries(Leases):
    def _insert(self) -> Any:
        return pg_insert if self.is_postgres else sqlite_insert

    def start_forwarding(self, claim: Claim) -> None:
        """Move the job to forwarding and lay out what each destination needs."""
        now = time.time()
        kinds = ["derived"] if claim.action == Action.DENOISE else ["original"]
        if claim.action == Action.DENOISE and claim.send_original:
            kinds.append("original")
        ready = InstanceState.DENOISED if claim.action == Action.DENOISE else InstanceState.RECEIVED
        with self.transaction() as conn:
            self._held(conn, claim, JobState.FORWARDING)
            ids = [
                r.id
                for r in conn.execute(
                    sa.select(i.id).where(i.job_id == claim.job_id, i.state == ready.value)
                )
            ]
            for name in claim.destinations:
                conn.execute(
                    self._insert()(job_destinations)
                    .values(job_id=claim.job_id, destination=name, state=PENDING, updated_at=now)
                    .on_conflict_do_nothing()
                )
                if ids:
                    conn.execute(
                        self._insert()(deliveries)
                        .values(
                            [
                                {
                                    "instance_id": iid,
                                    "destination": name,
                                    "kind": kind,
                                    "state": PENDING,
                                    "updated_at": now,
                                }
                                for iid in ids
                                for kind in kinds
                            ]
                        )
                        .on_conflict_do_nothing()
                    )
            # an instance sent again since its delivery: deliver it again
            stale = sa.select(i.received_at).where(i.id == d.instance_id).scalar_subquery()
            conn.execute(
                deliveries.update()
                .where(d.instance_id.in_(ids), d.state == DELIVERED, d.updated_at < stale)
                .values(state=PENDING, updated_at=now)
            )
            # a destination with something (new) to send is pending again
            conn.execute(
                job_destinations.update()
                .where(
                    jd.job_id == claim.job_id,
                    jd.state == DELIVERED,
                    sa.exists().where(
                        d.instance_id.in_(ids), d.destination == jd.destination, d.state == PENDING
                    ),
                )
                .values(state=PENDING, updated_at=now)
            )

    def due_destinations(self, claim: Claim, now: float | None = None) -> list[tuple[str, int]]:
        """(destination, attempts so far) of the job's destinations whose turn has come."""
        now = time.time() if now is None else now
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(jd.destination, jd.attempts).where(
                    jd.job_id == claim.job_id, jd.state == PENDING, jd.next_attempt_at <= now
                )
            ).all()
        return [(r.destination, int(r.attempts)) for r in rows]

    def pending_deliveries(self, claim: Claim, destination: str) -> list[tuple[int, str]]:
        """(delivery id, file) of what ``destination`` still needs of the job, in instance
        order."""
        path = sa.case((d.kind == "derived", i.derived_path), else_=i.path)
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(d.id, path.label("file"))
                .join(instances, i.id == d.instance_id)
                .where(i.job_id == claim.job_id, d.destination == destination, d.state == PENDING)
                .order_by(i.id, d.kind)
            ).all()
        return [(int(r.id), r.file) for r in rows]

    def mark_sent(self, claim: Claim, ids: list[int]) -> None:
        if not ids:
            return
        now = time.time()
        with self.transaction() as conn:
            self._held(conn, claim, heartbeat_at=now)
            conn.execute(
                deliveries.update().where(d.id.in_(ids)).values(state=DELIVERED, updated_at=now)
            )

    def destination_done(self, claim: Claim, destination: str) -> None:
        with self.transaction() as conn:
            self._set_destination(conn, claim, destination, state=DELIVERED, last_error=None)

    def destination_failed(
        self, claim: Claim, destination: str, error: str, delay: float, max_attempts: int
    ) -> str:
        """Count a failed attempt at ``destination``; its state after it (pending or failed)."""
        now = time.time()
        with self.transaction() as conn:
            attempts = conn.execute(
                sa.select(jd.attempts).where(
                    jd.job_id == claim.job_id, jd.destination == destination
                )
            ).scalar_one()
            state = FAILED if attempts + 1 >= max_attempts else PENDING
            self._set_destination(
                conn,
                claim,
                destination,
                state=state,
                attempts=attempts + 1,
                next_attempt_at=now + delay,
                last_error=error[:2000],
            )
        return state

    def _set_destination(
        self, conn: Connection, claim: Claim, destination: str, **values: Any
    ) -> None:
        self._held(conn, claim)
        conn.execute(
            job_destinations.update()
            .where(jd.job_id == claim.job_id, jd.destination == destination)
            .values(updated_at=time.time(), **values)
        )

    def settle(self, claim: Claim) -> tuple[JobState, float]:
        """After the destinations were tried: instances delivered everywhere are delivered;
        the job is done (or ready for latecomers) when every destination is, failed when one
        gave up and none is left to try, else ready again at the next due retry. Returns the
        job's state and (for ready) when it is due."""
        now = time.time()
        with self.transaction() as conn:
            everywhere = sa.and_(
                sa.exists().where(d.instance_id == i.id),
                ~sa.exists().where(d.instance_id == i.id, d.state != DELIVERED),
            )
            conn.execute(
                instances.update()
                .where(
                    i.job_id == claim.job_id,
                    i.state.in_([InstanceState.DENOISED.value, InstanceState.RECEIVED.value]),
                    everywhere,
                )
                .values(state=InstanceState.DELIVERED.value, updated_at=now)
            )
            rows = conn.execute(
                sa.select(jd.destination, jd.state, jd.next_attempt_at, jd.last_error).where(
                    jd.job_id == claim.job_id
                )
            ).all()
            pending = [r for r in rows if r.state == PENDING]
            failed = [r for r in rows if r.state == FAILED]
            if pending:
                due = min(r.next_attempt_at for r in pending)
                self._held(
                    conn,
                    claim,
                    JobState.READY,
                    worker=None,
                    attempts=0,
                    next_attempt_at=due,
                    last_error=_summary(pending + failed),
                )
                return JobState.READY, due
            if failed:
                self._held(conn, claim, JobState.FAILED, worker=None, last_error=_summary(failed))
                return JobState.FAILED, 0.0
            # latecomers: instances that arrived after forwarding began have no deliveries yet
            left = conn.execute(
                sa.select(sa.func.count())
                .select_from(instances)
                .where(
                    i.job_id == claim.job_id,
                    i.state == InstanceState.RECEIVED.value,
                    ~sa.exists().where(d.instance_id == i.id),
                )
            ).scalar_one()
            state = JobState.READY if left else JobState.DONE
            self._held(
                conn, claim, state, worker=None, attempts=0, last_error=None, next_attempt_at=0
            )
        return state, 0.0


def _summary(rows: list[Any]) -> str | None:
    errors = [f"{r.destination}: {r.last_error}" for r in rows if r.last_error]
    return "; ".join(errors)[:2000] or None
