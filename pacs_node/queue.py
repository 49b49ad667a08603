"""The job table: the only state of the node. Every state change goes through this module.

A job is one round of one received series::

    receiving --(series_quiet_seconds without a new instance)--> ready --claim--> running
        --> forwarding --> done
                       \\-> failed (after destination.max_attempts, or a permanent error)

Rules for instances (each has its own state: received -> denoised -> delivered | failed):

* An instance for a series with an unfinished job (receiving, ready, running, forwarding) joins
  that job. A worker finishing a job sends it back to ``ready`` when instances arrived meanwhile.
* An instance for a series whose last job is done or failed starts a new round: a new job that
  holds only the new instances.
* The same SOPInstanceUID again replaces the earlier copy: the file is overwritten and the
  instance row moves to the series' unfinished job (or the new round) as ``received``.

SQLite runs in WAL mode with a busy timeout; every write transaction is ``BEGIN IMMEDIATE``.
PostgreSQL claims with ``FOR UPDATE SKIP LOCKED``. The schema is made by Alembic migrations.
"""

from __future__ import annotations

import enum
import functools
import json
import logging
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as _pg_insert
from sqlalchemy.dialects.sqlite import insert as _sqlite_insert
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError, OperationalError

logger = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    RECEIVING = "receiving"
    READY = "ready"
    RUNNING = "running"
    FORWARDING = "forwarding"
    DONE = "done"
    FAILED = "failed"


class InstanceState(enum.StrEnum):
    RECEIVED = "received"
    DENOISED = "denoised"
    DELIVERED = "delivered"
    FAILED = "failed"


FINISHED = (JobState.DONE.value, JobState.FAILED.value)
# A job that is not finished, as SQL: the predicate of the one-open-job-per-series index.
OPEN_SQL = "state NOT IN ({})".format(", ".join(f"'{s}'" for s in FINISHED))

metadata = sa.MetaData()

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("study_uid", sa.String(64), nullable=False),
    sa.Column("round", sa.Integer, nullable=False, server_default="1"),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("created_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("last_instance_at", sa.Float, nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"),
    sa.Column("worker", sa.String(128)),
    sa.Column("heartbeat_at", sa.Float),
    sa.Column("last_error", sa.Text),
    sa.Column("model_version", sa.String(32)),
    sa.Column("quality", sa.Text),
    sa.Column("flagged", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Index("ix_jobs_state", "state"),
    sa.Index("ix_jobs_series", "series_uid"),
    sa.Index(
        "ux_jobs_series_open",
        "series_uid",
        unique=True,
        sqlite_where=sa.text(OPEN_SQL),
        postgresql_where=sa.text(OPEN_SQL),
    ),
)

instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("sop_instance_uid", sa.String(64), nullable=False, unique=True),
    sa.Column("series_uid", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("received_at", sa.Float, nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.Column("derived_uid", sa.String(64)),
    sa.Column("derived_path", sa.Text),
    sa.Column("last_error", sa.Text),
    sa.Index("ix_instances_job_state", "job_id", "state"),
)


# The bump uses the partial index's own predicate, so SQLite can use that index.
_OPEN = sa.text(OPEN_SQL)


def _record_statements(insert: Any) -> dict[str, Any]:
    """The intake transaction's statements, with bind parameters ``p_*``."""
    j = jobs.c
    now: Any = sa.bindparam("p_now")
    bump = (
        jobs.update()
        .where(j.series_uid == sa.bindparam("p_series"), _OPEN)
        .values(
            last_instance_at=now,
            updated_at=now,
            state=sa.case(
                (j.state == JobState.READY.value, JobState.RECEIVING.value), else_=j.state
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


_SQLITE_RECORD = _record_statements(_sqlite_insert)
_PG_RECORD = _record_statements(_pg_insert)


@dataclass(frozen=True)
class _Compiled:
    sql: str
    order: tuple[str, ...]
    defaults: dict[str, Any]

    def run(self, cur: Any, params: dict[str, Any]) -> Any:
        merged = {**self.defaults, **params}
        return cur.execute(self.sql, [merged[k] for k in self.order])


@functools.cache
def _compiled(name: str) -> _Compiled:
    from sqlalchemy.dialects import sqlite

    c = _SQLITE_RECORD[name].compile(dialect=sqlite.dialect())
    return _Compiled(c.string, tuple(c.positiontup or ()), dict(c.params))


class _SqliteResult:
    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def scalar(self) -> Any:
        row = self.cursor.fetchone()
        return None if row is None else row[0]


class LostClaim(Exception):
    """The job was requeued (the reaper judged this worker dead) or changed under us."""


@dataclass(frozen=True)
class Claim:
    job_id: int
    series_uid: str
    study_uid: str
    attempts: int
    worker: str


@dataclass(frozen=True)
class JobRow:
    id: int
    series_uid: str
    study_uid: str
    round: int
    state: str
    attempts: int
    last_error: str | None
    model_version: str | None
    received: int
    denoised: int
    delivered: int
    failed: int
    quality: dict[str, Any] | None
    flagged: bool
    created_at: float
    updated_at: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def make_engine(url: str) -> Engine:
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = sa.create_engine(
            url,
            connect_args={"timeout": 60, "check_same_thread": False},
            pool_size=20,
            max_overflow=20,
        )

        @sa.event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            dbapi_conn.isolation_level = None  # let us issue BEGIN ourselves
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA busy_timeout=60000")
            # NORMAL: a commit survives a crash of the process, not always a power cut. That is
            # enough because the received files are the durable record (fsynced before Success)
            # and node start-up re-records any file the table lost (pacs_node.node.recover).
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.close()

        @sa.event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            conn.exec_driver_sql("BEGIN IMMEDIATE")

        return engine
    return sa.create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20)


class Queue:
    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.engine = make_engine(database_url)
        self.is_postgres = self.engine.dialect.name == "postgresql"

    # -- schema -----------------------------------------------------------------------------
    def migrate(self) -> None:
        """Bring the schema to the newest Alembic revision (safe to run from many processes)."""
        from alembic import command
        from alembic.config import Config as AlembicConfig

        cfg = AlembicConfig()
        cfg.set_main_option("script_location", str(Path(__file__).parent / "migrations"))
        with self.engine.begin() as conn:
            if self.is_postgres:
                conn.exec_driver_sql("SELECT pg_advisory_xact_lock(7214002)")
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")

    def ping(self) -> None:
        with self.engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        """A write transaction, retried by the caller on IntegrityError races."""
        with self.engine.begin() as conn:
            yield conn

    # -- intake -----------------------------------------------------------------------------
    def record_instance(
        self, *, sop_uid: str, series_uid: str, study_uid: str, path: str, now: float | None = None
    ) -> int:
        """Record a stored instance and its series' job in one transaction; return the job id."""
        params = {
            "p_sop": sop_uid,
            "p_series": series_uid,
            "p_study": study_uid,
            "p_path": path,
            "p_now": time.time() if now is None else now,
        }
        for attempt in range(5):
            try:
                if self.is_postgres:
                    with self.transaction() as conn:
                        return self._record(
                            lambda name: conn.execute(_PG_RECORD[name], params), params
                        )
                return self._record_sqlite(params)
            except (IntegrityError, sqlite3.IntegrityError):
                # another node opened the series' job first: join it
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    @staticmethod
    def _record(run: Any, params: dict[str, Any]) -> int:
        # Bump the series' open job (or open the next round), then upsert the instance.
        job_id = run("bump").scalar()
        if job_id is None:
            job_id = run("open").scalar()
        params["p_job"] = int(job_id)
        run("upsert")
        return int(job_id)

    def _record_sqlite(self, params: dict[str, Any]) -> int:
        # The receive hot path, once per C-STORE: the same statements, compiled once, run on the
        # pooled sqlite3 connection (SQLAlchemy's per-statement overhead was most of its cost).
        raw = self.engine.raw_connection()
        try:
            cur = raw.driver_connection.cursor()  # type: ignore[union-attr]
            cur.execute("BEGIN IMMEDIATE")
            try:
                job_id = self._record(
                    lambda name: _SqliteResult(_compiled(name).run(cur, params)), params
                )
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
            return job_id
        finally:
            raw.close()

    def known_paths(self) -> set[str]:
        with self.engine.connect() as conn:
            return {r[0] for r in conn.execute(sa.select(instances.c.path))}

    def promote_quiet(self, quiet_seconds: float, now: float | None = None) -> int:
        """receiving -> ready for series with no new instance for ``quiet_seconds``."""
        now = time.time() if now is None else now
        j = jobs.c
        with self.transaction() as conn:
            return int(
                conn.execute(
                    jobs.update()
                    .where(
                        j.state == JobState.RECEIVING.value,
                        j.last_instance_at <= now - quiet_seconds,
                    )
                    .values(state=JobState.READY.value, updated_at=now)
                ).rowcount
            )

    # -- workers ----------------------------------------------------------------------------
    def claim(self, worker: str, quiet_seconds: float, now: float | None = None) -> Claim | None:
        """Atomically take the oldest ready job (or a quiet receiving one) whose retry time has
        come; None when there is none."""
        now = time.time() if now is None else now
        j = jobs.c
        eligible = sa.or_(
            j.state == JobState.READY.value,
            sa.and_(j.state == JobState.RECEIVING.value, j.last_instance_at <= now - quiet_seconds),
        )
        pick = sa.select(j.id).where(eligible, j.next_attempt_at <= now).order_by(j.id).limit(1)
        if self.is_postgres:
            pick = pick.with_for_update(skip_locked=True)
        stmt = (
            jobs.update()
            .where(j.id == pick.scalar_subquery(), eligible)
            .values(
                state=JobState.RUNNING.value,
                worker=worker,
                heartbeat_at=now,
                attempts=j.attempts + 1,
                updated_at=now,
            )
            .returning(j.id, j.series_uid, j.study_uid, j.attempts)
        )
        with self.transaction() as conn:
            row = conn.execute(stmt).first()
        if row is None:
            return None
        return Claim(int(row.id), row.series_uid, row.study_uid, int(row.attempts), worker)

    def _guarded(self, conn: Connection, claim: Claim, **values: Any) -> None:
        j = jobs.c
        n = conn.execute(
            jobs.update()
            .where(
                j.id == claim.job_id,
                j.worker == claim.worker,
                j.state.in_([JobState.RUNNING.value, JobState.FORWARDING.value]),
            )
            .values(updated_at=time.time(), **values)
        ).rowcount
        if not n:
            raise LostClaim(f"job {claim.job_id} is no longer held by {claim.worker}")

    def heartbeat(self, claim: Claim) -> None:
        with self.transaction() as conn:
            self._guarded(conn, claim, heartbeat_at=time.time())

    def reap(self, stale_after: float, now: float | None = None) -> int:
        """Requeue running/forwarding jobs whose worker has not beaten for ``stale_after``."""
        now = time.time() if now is None else now
        j = jobs.c
        with self.transaction() as conn:
            n = conn.execute(
                jobs.update()
                .where(
                    j.state.in_([JobState.RUNNING.value, JobState.FORWARDING.value]),
                    j.heartbeat_at < now - stale_after,
                )
                .values(
                    state=JobState.READY.value,
                    worker=None,
                    updated_at=now,
                    last_error="worker stopped beating; requeued",
                )
            ).rowcount
        if n:
            logger.warning("requeued %d job(s) whose worker went silent", n)
        return int(n)

    def pending_instances(
        self, claim: Claim, state: InstanceState
    ) -> list[tuple[int, str, str | None]]:
        """(id, path, derived_path) of the job's instances in ``state``."""
        i = instances.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(i.id, i.path, i.derived_path)
                .where(i.job_id == claim.job_id, i.state == state.value)
                .order_by(i.id)
            ).all()
        return [(int(r.id), r.path, r.derived_path) for r in rows]

    def mark_denoised(
        self, claim: Claim, done: list[tuple[int, str, str]], model_version: str
    ) -> None:
        """[(instance id, derived uid, derived path)] -> denoised, in one transaction."""
        now = time.time()
        i = instances.c
        with self.transaction() as conn:
            self._guarded(conn, claim, heartbeat_at=now, model_version=model_version)
            for iid, uid, path in done:
                conn.execute(
                    instances.update()
                    .where(i.id == iid, i.state == InstanceState.RECEIVED.value)
                    .values(
                        state=InstanceState.DENOISED.value,
                        derived_uid=uid,
                        derived_path=path,
                        updated_at=now,
                    )
                )

    def mark_instance_failed(self, claim: Claim, iid: int, error: str) -> None:
        i = instances.c
        with self.transaction() as conn:
            self._guarded(conn, claim)
            conn.execute(
                instances.update()
                .where(i.id == iid)
                .values(
                    state=InstanceState.FAILED.value,
                    last_error=error[:2000],
                    updated_at=time.time(),
                )
            )

    def mark_delivered(self, claim: Claim, ids: list[int]) -> None:
        if not ids:
            return
        now = time.time()
        i = instances.c
        with self.transaction() as conn:
            self._guarded(conn, claim, heartbeat_at=now)
            conn.execute(
                instances.update()
                .where(i.id.in_(ids))
                .values(state=InstanceState.DELIVERED.value, updated_at=now)
            )

    def set_state(self, claim: Claim, state: JobState, **values: Any) -> None:
        with self.transaction() as conn:
            self._guarded(conn, claim, state=state.value, **values)

    def finish(self, claim: Claim) -> JobState:
        """forwarding -> done, or -> ready when instances arrived meanwhile."""
        i = instances.c
        with self.transaction() as conn:
            left = conn.execute(
                sa.select(sa.func.count())
                .select_from(instances)
                .where(i.job_id == claim.job_id, i.state == InstanceState.RECEIVED.value)
            ).scalar_one()
            state = JobState.READY if left else JobState.DONE
            self._guarded(
                conn,
                claim,
                state=state.value,
                worker=None,
                attempts=0,
                last_error=None,
                next_attempt_at=0,
            )
        return state

    def defer(self, claim: Claim, error: str, delay: float, max_attempts: int) -> JobState:
        """After a retryable error: back to ready after ``delay``, or failed at max_attempts."""
        state = JobState.FAILED if claim.attempts >= max_attempts else JobState.READY
        with self.transaction() as conn:
            self._guarded(
                conn,
                claim,
                state=state.value,
                worker=None,
                last_error=error[:2000],
                next_attempt_at=time.time() + delay,
            )
        return state

    def release(self, claim: Claim) -> None:
        """Give a job back untouched (worker shutting down); its attempt is not counted."""
        j = jobs.c
        with self.transaction() as conn:
            self._guarded(
                conn,
                claim,
                state=JobState.READY.value,
                worker=None,
                attempts=sa.func.max(j.attempts - 1, 0)
                if not self.is_postgres
                else sa.func.greatest(j.attempts - 1, 0),
            )

    def fail(self, claim: Claim, error: str, **values: Any) -> None:
        with self.transaction() as conn:
            self._guarded(
                conn,
                claim,
                state=JobState.FAILED.value,
                worker=None,
                last_error=error[:2000],
                **values,
            )

    def retry(self, job_id: int) -> str | None:
        """A failed job back to ready with its attempts reset (``pacs-node retry``).

        Returns None on success, else why not (not failed, unknown, or the series has a newer
        open round: retry once that one is finished).
        """
        j, i = jobs.c, instances.c
        with self.transaction() as conn:
            row = conn.execute(sa.select(j.state, j.series_uid).where(j.id == job_id)).first()
            if row is None:
                return f"job {job_id} does not exist"
            if row.state != JobState.FAILED.value:
                return f"job {job_id} is {row.state}, not failed"
            open_job = conn.execute(
                sa.select(j.id).where(j.series_uid == row.series_uid, j.state.not_in(FINISHED))
            ).scalar()
            if open_job is not None:
                return (
                    f"job {job_id}: its series has an open job {open_job}; "
                    "retry when that one is done"
                )
            conn.execute(
                jobs.update()
                .where(j.id == job_id)
                .values(
                    state=JobState.READY.value,
                    attempts=0,
                    next_attempt_at=0,
                    updated_at=time.time(),
                )
            )
            conn.execute(
                instances.update()
                .where(
                    i.job_id == job_id,
                    i.state == InstanceState.FAILED.value,
                    i.derived_path.is_(None),
                )
                .values(state=InstanceState.RECEIVED.value, last_error=None)
            )
        return None

    # -- reporting --------------------------------------------------------------------------
    def list_jobs(self, job_id: int | None = None, limit: int = 200) -> list[JobRow]:
        j, i = jobs.c, instances.c

        def count(state: str) -> Any:
            return sa.func.sum(sa.case((i.state == state, 1), else_=0))

        counts = (
            sa.select(
                i.job_id,
                sa.func.count().label("received"),
                (count(InstanceState.DENOISED.value) + count(InstanceState.DELIVERED.value)).label(
                    "denoised"
                ),
                count(InstanceState.DELIVERED.value).label("delivered"),
                count(InstanceState.FAILED.value).label("failed"),
            )
            .group_by(i.job_id)
            .subquery()
        )
        q = (
            sa.select(
                jobs, counts.c.received, counts.c.denoised, counts.c.delivered, counts.c.failed
            )
            .select_from(jobs.outerjoin(counts, counts.c.job_id == j.id))
            .order_by(j.id.desc())
            .limit(limit)
        )
        if job_id is not None:
            q = q.where(j.id == job_id)
        with self.engine.connect() as conn:
            rows = conn.execute(q).mappings().all()
        return [
            JobRow(
                id=r["id"],
                series_uid=r["series_uid"],
                study_uid=r["study_uid"],
                round=r["round"],
                state=r["state"],
                attempts=r["attempts"],
                last_error=r["last_error"],
                model_version=r["model_version"],
                received=int(r["received"] or 0),
                denoised=int(r["denoised"] or 0),
                delivered=int(r["delivered"] or 0),
                failed=int(r["failed"] or 0),
                quality=json.loads(r["quality"]) if r["quality"] else None,
                flagged=bool(r["flagged"]),
                created_at=r["created_at"],
                updated_at=r["updated_at"],
            )
            for r in rows
        ]

    def expired_files(
        self, older_than: float, limit: int = 1000
    ) -> list[tuple[int, str, str | None]]:
        """(instance id, path, derived path) of delivered instances of done jobs finished before
        ``older_than`` whose files have not been removed yet (retention)."""
        j, i = jobs.c, instances.c
        with self.engine.connect() as conn:
            rows = conn.execute(
                sa.select(i.id, i.path, i.derived_path)
                .join(jobs, j.id == i.job_id)
                .where(
                    j.state == JobState.DONE.value,
                    j.updated_at < older_than,
                    i.state == InstanceState.DELIVERED.value,
                    i.path != "",
                )
                .limit(limit)
            ).all()
        return [(int(r.id), r.path, r.derived_path) for r in rows]

    def forget_files(self, ids: list[int]) -> None:
        """Record that the files of these instances were removed."""
        if ids:
            with self.transaction() as conn:
                conn.execute(
                    instances.update()
                    .where(instances.c.id.in_(ids))
                    .values(path="", derived_path=None)
                )

    def count_by_state(self) -> dict[str, int]:
        j = jobs.c
        with self.engine.connect() as conn:
            return {
                r[0]: int(r[1])
                for r in conn.execute(sa.select(j.state, sa.func.count()).group_by(j.state))
            }

    def count_instances(self) -> int:
        with self.engine.connect() as conn:
            return int(conn.execute(sa.select(sa.func.count()).select_from(instances)).scalar_one())

    def dispose(self) -> None:
        self.engine.dispose()


__all__ = [
    "Claim",
    "InstanceState",
    "IntegrityError",
    "JobRow",
    "JobState",
    "LostClaim",
    "OperationalError",
    "Queue",
    "instances",
    "jobs",
    "metadata",
]
