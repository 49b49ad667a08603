from __future__ import annotations

from pathlib import Path

import sqlalchemy as sa

from pacs_node.queue import JobState, Queue, metadata


def test_migrations_match_the_models(tmp_path: Path) -> None:
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    q = Queue(f"sqlite:///{tmp_path}/q.sqlite")
    q.migrate()
    q.migrate()  # idempotent
    with q.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == []


def test_sqlite_runs_in_wal_mode(tmp_path: Path) -> None:
    q = Queue(f"sqlite:///{tmp_path}/q.sqlite")
    q.migrate()
    with q.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
        assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() == 60000


def test_quiet_series_become_ready(tmp_path: Path) -> None:
    q = Queue(f"sqlite:///{tmp_path}/q.sqlite")
    q.migrate()
    job = q.record_instance(
        sop_uid="1.2.3.1", series_uid="1.2.3", study_uid="1.2", path="a", now=100
    )
    assert (
        q.record_instance(sop_uid="1.2.3.2", series_uid="1.2.3", study_uid="1.2", path="b", now=105)
        == job
    )
    assert q.promote_quiet(10, now=114) == 0
    assert q.promote_quiet(10, now=115) == 1
    assert q.list_jobs()[0].state == JobState.READY
    # a late instance sends it back to receiving, same job
    assert (
        q.record_instance(sop_uid="1.2.3.3", series_uid="1.2.3", study_uid="1.2", path="c", now=120)
        == job
    )
    row = q.list_jobs()[0]
    assert row.state == JobState.RECEIVING and row.received == 3
    with q.engine.begin() as conn:
        assert conn.execute(sa.text("SELECT count(*) FROM jobs")).scalar() == 1
