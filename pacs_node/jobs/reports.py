"""Reading the job table for ``pacs-node status``, the status page and ``/metrics``."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pacs_node.jobs import queries
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

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Reports(Database):
    def list_jobs(self, job_id: int | None = None, limit: int = 200) -> list[JobRow]:
        """The newest jobs (or one), with their instances counted by state."""
        with self.engine.connect() as conn:
            rows = conn.execute(queries.job_list(job_id, limit)).mappings().all()
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

    def count_by_state(self) -> dict[str, int]:
        with self.engine.connect() as conn:
            return {r[0]: int(r[1]) for r in conn.execute(queries.jobs_by_state())}
