"""jobs and instances

Revision ID: 0001
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None


def upgrade() -> None:
    op.create_table(
        "jobs",
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
    )
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_series", "jobs", ["series_uid"])
    op.create_index(
        "ux_jobs_series_open",
        "jobs",
        ["series_uid"],
        unique=True,
        sqlite_where=sa.text("state NOT IN ('done', 'failed')"),
        postgresql_where=sa.text("state NOT IN ('done', 'failed')"),
    )
    op.create_table(
        "instances",
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
    )
    op.create_index("ix_instances_job_state", "instances", ["job_id", "state"])


def downgrade() -> None:
    op.drop_table("instances")
    op.drop_table("jobs")
