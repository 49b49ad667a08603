"""The job table's read-only statements for ``status``, ``/metrics`` and the status page, and
the retention sweep's (the state-changing ones are in :mod:`pacs_node.jobs.queries`)."""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

from pacs_node.jobs.schema import (
    DeliveryState,
    InstanceState,
    JobState,
    deliveries,
    instances,
    job_destinations,
    jobs,
)

j, i = jobs.c, instances.c


# -- reporting -------------------------------------------------------------------------------------
def job_list(job_id: int | None, limit: int) -> Any:
    def count(*states: InstanceState) -> Any:
        return sa.func.sum(sa.case((i.state.in_([s.value for s in states]), 1), else_=0))

    counts = (
        sa.select(
            i.job_id,
            sa.func.count().label("received"),
            count(InstanceState.DENOISED, InstanceState.DELIVERED).label("denoised"),
            count(InstanceState.DELIVERED).label("delivered"),
            count(InstanceState.FAILED).label("failed"),
        )
        .group_by(i.job_id)
        .subquery()
    )
    q = (
        sa.select(jobs, counts.c.received, counts.c.denoised, counts.c.delivered, counts.c.failed)
        .select_from(jobs.outerjoin(counts, counts.c.job_id == j.id))
        .order_by(j.id.desc())
        .limit(limit)
    )
    return q if job_id is None else q.where(j.id == job_id)


def job_destinations_of(ids: list[int]) -> Any:
    jd = job_destinations.c
    return sa.select(jd.job_id, jd.destination, jd.state, jd.attempts, jd.last_error).where(
        jd.job_id.in_(ids)
    )


def _delivery_state() -> Any:
    """A delivery's state for reports: pending at a destination that gave up counts failed."""
    d, jd = deliveries.c, job_destinations.c
    gave_up = sa.exists().where(
        jd.job_id == i.job_id,
        jd.destination == d.destination,
        jd.state == DeliveryState.FAILED.value,
    )
    return sa.case(
        (sa.and_(d.state == DeliveryState.PENDING.value, gave_up), DeliveryState.FAILED.value),
        else_=d.state,
    ).label("state")


def delivery_counts(ids: list[int]) -> Any:
    d = deliveries.c
    state = _delivery_state()
    return (
        sa.select(i.job_id, d.destination, state, sa.func.count().label("n"))
        .select_from(deliveries.join(instances, i.id == d.instance_id))
        .where(i.job_id.in_(ids))
        .group_by(i.job_id, d.destination, state)
    )


def delivery_totals() -> Any:
    d = deliveries.c
    state = _delivery_state()
    return (
        sa.select(d.destination, state, sa.func.count().label("n"))
        .select_from(deliveries.join(instances, i.id == d.instance_id))
        .group_by(d.destination, state)
    )


def last_destination_errors() -> Any:
    jd = job_destinations.c
    newest = (
        sa.select(jd.destination, sa.func.max(jd.updated_at).label("at"))
        .where(jd.last_error.is_not(None))
        .group_by(jd.destination)
        .subquery()
    )
    return sa.select(jd.destination, jd.last_error).join(
        newest, sa.and_(newest.c.destination == jd.destination, newest.c.at == jd.updated_at)
    )


def jobs_by_state() -> Any:
    return sa.select(j.state, sa.func.count()).group_by(j.state)


def known_paths() -> Any:
    return sa.select(i.path)


# -- retention -------------------------------------------------------------------------------------
def expired(older_than: float, limit: int) -> Any:
    """Delivered instances of done jobs finished before ``older_than`` that still have files."""
    return (
        sa.select(i.id, i.path, i.derived_path)
        .join(jobs, j.id == i.job_id)
        .where(
            j.state == JobState.DONE.value,
            j.updated_at < older_than,
            i.state == InstanceState.DELIVERED.value,
            i.path != "",
        )
        .limit(limit)
    )


def forget_files(ids: list[int]) -> Any:
    return instances.update().where(i.id.in_(ids)).values(path="", derived_path=None)
