"""The job table's statements that record and change (the read-only ones for reports and the
retention sweep are in :mod:`pacs_node.jobs.report_queries`), built once from the table
definitions. The job store's classes only run these; each state change takes its allowed
previous states from :data:`pacs_node.jobs.schema.TRANSITIONS`.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert

from pacs_node.jobs.schema import (
    FINISHED,
    HELD,
    OPEN_SQL,
    DeliveryState,
    InstanceState,
    JobState,
    instances,
    job_destinations,
    jobs,
    sources,
)

j, i = jobs.c, instances.c


def move(to: JobState, among: tuple[JobState, ...] | None = None) -> Any:
    """``state IN (the states that may become `to`)``, optionally only those ``among``; the
    states are the schema's own constants, written into the SQL (so statements compiled once
    for the hot path need no list parameter)."""
    return j.state.in_([sa.literal_column(f"'{s}'") for s in sources(to, among)])


# -- recording a received instance (the receive hot path) ------------------------------------------
def _record_statements(insert: Any) -> dict[str, Any]:
    """The intake transaction's statements, with bind parameters ``p_*``."""
    now: Any = sa.bindparam("p_now")
    bump = (  # the series' open job: a ready one goes back to receiving
        jobs.update()
        .where(j.series_uid == sa.bindparam("p_series"), sa.text(OPEN_SQL))
        .values(
            last_instance_at=now,
            updated_at=now,
            # a ready job is receiving again; a running one stays with its worker
            state=sa.case(
                (move(JobState.RECEIVING, (JobState.READY,)), JobState.RECEIVING.value),
                else_=j.state,
            ),
        )
        .returning(j.id)
    )
    last_round = (
        sa.select(sa.func.coalesce(sa.func.max(j.round), 0))
        .where(j.series_uid == sa.bindparam("p_series"))
        .scalar_subquery()
    )
    open_job = (
        jobs.insert()
        .values(
            series_uid=sa.bindparam("p_series"),
            study_uid=sa.bindparam("p_study"),
            round=last_round + 1,
            state=JobState.RECEIVING.value,
            created_at=now,
            updated_at=now,
            last_instance_at=now,
            attempts=0,
            next_attempt_at=0,
            action=sa.bindparam("p_action"),
            rule=sa.bindparam("p_rule"),
            destinations=sa.bindparam("p_destinations"),
            send_original=sa.bindparam("p_send_original"),
            calling_ae=sa.bindparam("p_calling_ae"),
            series_description=sa.bindparam("p_description"),
        )
        .returning(j.id)
    )
    values = {
        "job_id": sa.bindparam("p_job"),
        "series_uid": sa.bindparam("p_series"),
        "path": sa.bindparam("p_path"),
        "state": InstanceState.RECEIVED.value,
        "received_at": now,
        "updated_at": now,
        "derived_uid": None,
        "derived_path": None,
        "last_error": None,
    }
    upsert = insert(instances).values(sop_instance_uid=sa.bindparam("p_sop"), **values)
    upsert = upsert.on_conflict_do_update(
        index_elements=["sop_instance_uid"],
        set_={k: getattr(upsert.excluded, k) for k in values},
    )
    return {"bump": bump, "open": open_job, "upsert": upsert}


SQLITE_RECORD = _record_statements(sqlite_insert)
PG_RECORD = _record_statements(pg_insert)


@dataclass(frozen=True)
class Compiled:
    """A statement compiled once for sqlite3, run on a raw cursor."""

    sql: str
    order: tuple[str, ...]
    defaults: dict[str, Any]

    def run(self, cur: Any, params: dict[str, Any]) -> Any:
        merged = {**self.defaults, **params}
        return cur.execute(self.sql, [merged[k] for k in self.order])


@functools.cache
def compiled_sqlite(name: str) -> Compiled:
    from sqlalchemy.dialects import sqlite

    c = SQLITE_RECORD[name].compile(dialect=sqlite.dialect())
    return Compiled(c.string, tuple(c.positiontup or ()), dict(c.params))


# -- leases ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Completion:
    """When a receiving series counts as complete: quiet for ``quiet_seconds``, or (with
    ``on_release``) its sender's association was released normally after its last instance and
    ``grace_seconds`` have passed since that instance."""

    quiet_seconds: float
    on_release: bool = False
    grace_seconds: float = 1.0

    def sql(self, now: float) -> Any:
        quiet = j.last_instance_at <= now - self.quiet_seconds
        if not self.on_release:
            return quiet
        released = sa.and_(
            j.released_at.is_not(None),
            j.released_at >= j.last_instance_at,
            j.last_instance_at <= now - self.grace_seconds,
        )
        return sa.or_(quiet, released)


def _waiting(chunk: int) -> Any:
    """At least ``chunk`` received instances not yet denoised, or any at all while none of the
    series has been (no figures yet: its first slice starts the network at once); a denoise
    job only."""
    count = (
        sa.select(sa.func.count())
        .select_from(instances)
        .where(i.job_id == j.id, i.state == InstanceState.RECEIVED.value)
        .scalar_subquery()
    )
    return sa.and_(
        j.action == "denoise", sa.or_(count >= chunk, sa.and_(j.tally.is_(None), count >= 1))
    )


def claim(
    worker: str, completion: Completion, now: float, skip_locked: bool, early_chunk: int = 0
) -> Any:
    """Take the oldest ready job, or a receiving one that is complete (or, with
    ``early_chunk``, has that many instances waiting to be denoised, or its first), whose retry
    time has come."""
    receiving = completion.sql(now)
    if early_chunk:
        receiving = sa.or_(receiving, _waiting(early_chunk))
    eligible = sa.or_(
        j.state == JobState.READY.value,
        sa.and_(j.state == JobState.RECEIVING.value, receiving),
    )
    pick = sa.select(j.id).where(eligible, j.next_attempt_at <= now).order_by(j.id).limit(1)
    if skip_locked:
        pick = pick.with_for_update(skip_locked=True)
    return (
        jobs.update()
        .where(j.id == pick.scalar_subquery(), eligible, move(JobState.RUNNING))
        .values(
            state=JobState.RUNNING.value,
            worker=worker,
            heartbeat_at=now,
            attempts=j.attempts + 1,
            updated_at=now,
        )
        .returning(
            j.id,
            j.series_uid,
            j.study_uid,
            j.attempts,
            j.action,
            j.destinations,
            j.send_original,
            j.tally,
            # the figures themselves, not "quality IS NOT NULL": SQLite 3.40's RETURNING answers
            # that expression with 1 for a NULL column
            j.quality,
        )
    )


def is_complete(job_id: int, completion: Completion, now: float) -> Any:
    return sa.select(sa.case((completion.sql(now), 1), else_=0)).where(j.id == job_id)


def mark_released(series: list[str], now: float) -> Any:
    return jobs.update().where(j.series_uid.in_(series), sa.text(OPEN_SQL)).values(released_at=now)


def held(job_id: int, holder: str, to: JobState | None, **values: Any) -> Any:
    """Update a job the worker ``holder`` holds; with ``to``, move it there if the map allows."""
    where = [j.id == job_id, j.worker == holder, j.state.in_([s.value for s in HELD])]
    if to is not None:
        where.append(move(to, HELD))
        values["state"] = to.value
    return jobs.update().where(*where).values(**values)


def reap(stale_before: float, now: float) -> Any:
    """Requeue held jobs whose worker went silent: one that was forwarding is complete and
    ready; one that was running may still be arriving, so it goes back to receiving (and is
    claimed again once complete)."""
    to = sa.case(
        (j.state == JobState.FORWARDING.value, JobState.READY.value),
        else_=JobState.RECEIVING.value,
    )
    return (
        jobs.update()
        .where(
            sa.or_(
                sa.and_(j.state == JobState.FORWARDING.value, move(JobState.READY, HELD)),
                sa.and_(j.state == JobState.RUNNING.value, move(JobState.RECEIVING, HELD)),
            ),
            j.heartbeat_at < stale_before,
        )
        .values(
            state=to,
            worker=None,
            updated_at=now,
            last_error="worker stopped beating; requeued",
        )
    )


# -- instances of a held job -----------------------------------------------------------------------
def instances_in(job_id: int, state: InstanceState) -> Any:
    return (
        sa.select(i.id, i.path, i.derived_path)
        .where(i.job_id == job_id, i.state == state.value)
        .order_by(i.id)
    )


def set_instances(ids: list[int], state: InstanceState, now: float, **values: Any) -> Any:
    return (
        instances.update().where(i.id.in_(ids)).values(state=state.value, updated_at=now, **values)
    )


def denoise_instance(iid: int, uid: str, path: str, now: float) -> Any:
    return (
        instances.update()
        .where(i.id == iid, i.state == InstanceState.RECEIVED.value)
        .values(
            state=InstanceState.DENOISED.value, derived_uid=uid, derived_path=path, updated_at=now
        )
    )


# -- pacs-node retry -------------------------------------------------------------------------------
def job_state(job_id: int) -> Any:
    return sa.select(j.state, j.series_uid).where(j.id == job_id)


def open_job_of(series_uid: str) -> Any:
    return sa.select(j.id).where(
        j.series_uid == series_uid, j.state.not_in([s.value for s in FINISHED])
    )


def requeue_failed(job_id: int, now: float) -> Any:
    return (
        jobs.update()
        .where(j.id == job_id, move(JobState.READY, (JobState.FAILED,)))
        .values(state=JobState.READY.value, attempts=0, next_attempt_at=0, updated_at=now)
    )


def destinations_of(job_id: int) -> Any:
    return sa.select(job_destinations.c.destination).where(job_destinations.c.job_id == job_id)


def retry_destinations(job_id: int, destination: str | None, now: float) -> Any:
    """A job's destinations that gave up (or only ``destination``) are tried again."""
    jd = job_destinations.c
    where = [jd.job_id == job_id, jd.state == DeliveryState.FAILED.value]
    if destination is not None:
        where.append(jd.destination == destination)
    return (
        job_destinations.update()
        .where(*where)
        .values(state=DeliveryState.PENDING.value, attempts=0, next_attempt_at=0, updated_at=now)
    )


def undo_failed_instances(job_id: int) -> Any:
    """Failed instances that were never denoised go back to received."""
    return (
        instances.update()
        .where(
            i.job_id == job_id,
            i.state == InstanceState.FAILED.value,
            i.derived_path.is_(None),
        )
        .values(state=InstanceState.RECEIVED.value, last_error=None)
    )
