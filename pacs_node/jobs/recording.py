"""Recording received instances: the intake's one transaction per C-STORE."""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

from sqlalchemy.exc import IntegrityError

from pacs_node.jobs import queries, report_queries
from pacs_node.jobs.db import Database


class _SqliteResult:
    def __init__(self, cursor: Any) -> None:
        self.cursor = cursor

    def scalar(self) -> Any:
        row = self.cursor.fetchone()
        return None if row is None else row[0]


class Recording(Database):
    """Rules: an instance for a series with an open job joins it (a ready one goes back to
    receiving); one whose last job is done or failed opens the next round, a new job holding
    only the new instances; the same SOPInstanceUID again replaces the earlier row."""

    def record_instance(
        self,
        *,
        sop_uid: str,
        series_uid: str,
        study_uid: str,
        path: str,
        now: float | None = None,
        action: str = "denoise",
        rule: str | None = None,
        destinations: tuple[str, ...] = ("default",),
        send_original: bool = False,
        calling_ae: str | None = None,
        series_description: str | None = None,
    ) -> int:
        """Record a stored instance and its series' job in one transaction; return the job id.

        The routing (``action`` ... ``send_original``) and the header figures are kept when the
        instance opens a job: a series is routed by its first instance."""
        params = {
            "p_sop": sop_uid,
            "p_series": series_uid,
            "p_study": study_uid,
            "p_path": path,
            "p_now": time.time() if now is None else now,
            "p_action": action,
            "p_rule": rule,
            "p_destinations": json.dumps(list(destinations)),
            "p_send_original": send_original,
            "p_calling_ae": calling_ae,
            "p_description": series_description,
        }
        for attempt in range(5):
            try:
                if self.is_postgres:
                    with self.transaction() as conn:
                        return self._record(
                            lambda name: conn.execute(queries.PG_RECORD[name], params), params
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
                    lambda name: _SqliteResult(queries.compiled_sqlite(name).run(cur, params)),
                    params,
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
            return {r[0] for r in conn.execute(report_queries.known_paths())}
