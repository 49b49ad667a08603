"""The job table's database: engine set-up (SQLite WAL or PostgreSQL), migrations, transactions.

SQLite runs in WAL mode with a busy timeout; every write transaction is ``BEGIN IMMEDIATE``.
PostgreSQL claims with ``FOR UPDATE SKIP LOCKED``. The schema is made by Alembic migrations.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine


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


class Database:
    """An engine on ``database_url``; the base of the job store's parts."""

    def __init__(self, database_url: str) -> None:
        self.url = database_url
        self.engine = make_engine(database_url)
        self.is_postgres = self.engine.dialect.name == "postgresql"

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

    def dispose(self) -> None:
        self.engine.dispose()
