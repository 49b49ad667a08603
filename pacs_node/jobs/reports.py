"""Reading the job table for ``pacs-node status``, the status page and ``/metrics``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from pacs_node.jobs import report_queries
from pacs_node.jobs.db import Database


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
    action: str = "denoise"
    rule: str | None = None
    calling_ae: str | None = None
    series_description: str | None = None
    # destination -> {"state", "delivered", "pending", "failed", "attempts", "last_error"}
    destinations: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Reports(Database):
    def list_jobs(self, job_id: int | None = None, limit: int = 200) -> list[JobRow]:
        """The newest jobs (or one), with their instances counted by state."""
        with self.engine.connect() as conn:
            rows = conn.execute(report_queries.job_list(job_id, limit)).mappings().all()
            per_destination = self._per_destination(conn, [r["id"] for r in rows])
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
                action=r["action"],
                rule=r["rule"],
                calling_ae=r["calling_ae"],
                series_description=r["series_description"],
                destinations=per_destination.get(r["id"], {})
                or {n: {"state": "not yet"} for n in json.loads(r["destinations"])},
            )
            for r in rows
        ]

    @staticmethod
    def _per_destination(conn: Any, ids: list[int]) -> dict[int, dict[str, dict[str, Any]]]:
        out: dict[int, dict[str, dict[str, Any]]] = {}
        if not ids:
            return out
        for r in conn.execute(report_queries.job_destinations_of(ids)):
            out.setdefault(r.job_id, {})[r.destination] = {
                "state": r.state,
                "attempts": int(r.attempts),
                "last_error": r.last_error,
                "delivered": 0,
                "pending": 0,
                "failed": 0,
            }
        for r in conn.execute(report_queries.delivery_counts(ids)):
            entry = out.get(r.job_id, {}).get(r.destination)
            if entry is not None:
                entry[r.state] = int(r.n)
        return out

    def destination_report(self) -> dict[str, dict[str, Any]]:
        """Per destination over every job: objects delivered, pending and failed (pending at a
        destination that gave up), and the newest error."""
        out: dict[str, dict[str, Any]] = {}
        with self.engine.connect() as conn:
            for r in conn.execute(report_queries.delivery_totals()):
                entry = out.setdefault(
                    r.destination, {"delivered": 0, "pending": 0, "failed": 0, "last_error": None}
                )
                entry[r.state] += int(r.n)
            for r in conn.execute(report_queries.last_destination_errors()):
                out.setdefault(
                    r.destination, {"delivered": 0, "pending": 0, "failed": 0, "last_error": None}
                )["last_error"] = r.last_error
        return out

    def count_by_state(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(report_queries.jobs_by_state())}
