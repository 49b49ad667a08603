"""The job table's tables, its states, and the one map of the state changes allowed.

A job is one round of one received series::

        new instance                     claim                         settle
    ready ─────────▶ receiving ─────────────────────▶ running ─▶ forwarding ──▶ done
      ▲  ◀─ claim ─┐     ▲   (complete: quiet, or released    │      │   │
      │            │     │    + grace; or a chunk waiting)    │      │   └──▶ failed ─┐
      │            │     └── parked: denoised as far as it ───┘      │                 │
      │            │         arrived; shut down; worker silent       │                 │
      │            └─────────────── running: complete, requeued      │                 │
      └──── a destination retries; latecomers; worker silent ────────┘                 │
      └──── pacs-node retry ◀──────────────────────────────────────────────────────────┘

``ready`` is claimed at once; ``receiving`` once complete (quiet, or released and past its
grace) or, to denoise while the series still arrives, once a chunk of it is waiting; a worker
that has denoised what there is of an incomplete series parks it back in ``receiving``. Every
UPDATE that changes a job's state takes its allowed previous states from :data:`TRANSITIONS`
(:func:`sources`), so a change the map does not allow matches no row.

Instances have states of their own: received -> denoised -> delivered (at every destination), or
failed. Delivery is tracked per destination: ``job_destinations`` (a job at a destination: its
attempts, back-off and last error) and ``deliveries`` (an instance's derived or original object
at a destination), so one destination down never holds back the others.
"""

from __future__ import annotations

import enum

import sqlalchemy as sa


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
    DELIVERED = "delivered"  # at every destination
    FAILED = "failed"


class DeliveryState(enum.StrEnum):
    """Of one instance at one destination, and of a job at one destination."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"  # the destination's max_attempts ran out (pacs-node retry requeues it)


class Action(enum.StrEnum):
    DENOISE = "denoise"  # derived series to the destinations (the original too: send_original)
    PASS = "pass"  # the original series, unchanged


S = JobState
TRANSITIONS: dict[JobState, frozenset[JobState]] = {
    S.RECEIVING: frozenset({S.RUNNING}),  # claimed once quiet
    S.READY: frozenset({S.RECEIVING, S.RUNNING}),  # a new instance arrived; claimed
    # gate passed; requeued (complete); parked or reaped (perhaps not complete yet); failed
    S.RUNNING: frozenset({S.FORWARDING, S.READY, S.RECEIVING, S.FAILED}),
    S.FORWARDING: frozenset({S.DONE, S.READY, S.FAILED}),  # delivered; requeued; failed
    S.DONE: frozenset(),  # final: a new instance of its series opens a new round (a new job)
    S.FAILED: frozenset({S.READY}),  # pacs-node retry
}
HELD = (S.RUNNING, S.FORWARDING)  # a worker holds the job (and heartbeats)
FINISHED = (S.DONE, S.FAILED)


class InvalidTransition(ValueError):
    pass


def sources(to: JobState, among: tuple[JobState, ...] | None = None) -> list[str]:
    """The states a job may move to ``to`` from (limited to ``among``), as values for SQL."""
    allowed = [s for s, targets in TRANSITIONS.items() if to in targets]
    if among is not None:
        allowed = [s for s in allowed if s in among]
    if not allowed:
        raise InvalidTransition(f"no state {'of ' + str(among) if among else ''} may become {to}")
    return [s.value for s in allowed]


# A job that is not finished, as SQL: the predicate of the one-open-job-per-series index.
OPEN_SQL = "state NOT IN ({})".format(", ".join(f"'{s.value}'" for s in FINISHED))

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
    sa.Column("action", sa.String(16), nullable=False, server_default="denoise"),
    sa.Column("rule", sa.String(64)),
    sa.Column("destinations", sa.Text, nullable=False, server_default='["default"]'),
    sa.Column("send_original", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("calling_ae", sa.String(16)),
    sa.Column("series_description", sa.String(64)),
    sa.Column("released_at", sa.Float),  # the last normal release of an association that sent it
    sa.Column("tally", sa.Text),  # the gate's figures so far (JSON), kept with each chunk
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

job_destinations = sa.Table(
    "job_destinations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("next_attempt_at", sa.Float, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("job_id", "destination", name="uq_job_destinations"),
)

deliveries = sa.Table(
    "deliveries",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
    sa.Column("destination", sa.String(32), nullable=False),
    sa.Column("kind", sa.String(8), nullable=False),  # derived | original
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("updated_at", sa.Float, nullable=False),
    sa.UniqueConstraint("instance_id", "destination", "kind", name="uq_deliveries"),
    sa.Index("ix_deliveries_destination_state", "destination", "state"),
)
