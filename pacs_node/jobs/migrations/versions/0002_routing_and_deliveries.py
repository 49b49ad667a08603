"""routing: each job's action and destinations; delivery state per destination and instance

Revision ID: 0002
Revises: 0001

Existing jobs carry over as what they were: denoised, for the one destination of the configuration
before routing (named "default"); what they delivered counts as delivered there, what they had
denoised but not delivered is pending there.
"""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"


def upgrade() -> None:
    # plain ADD COLUMN (with constant defaults): SQLite's batch mode would copy and drop the jobs
    # table, which the instances' foreign key forbids
    op.add_column(
        "jobs", sa.Column("action", sa.String(16), nullable=False, server_default="denoise")
    )
    op.add_column("jobs", sa.Column("rule", sa.String(64)))
    op.add_column(
        "jobs", sa.Column("destinations", sa.Text, nullable=False, server_default='["default"]')
    )
    op.add_column(
        "jobs", sa.Column("send_original", sa.Boolean, nullable=False, server_default=sa.false())
    )
    op.add_column("jobs", sa.Column("calling_ae", sa.String(16)))
    op.add_column("jobs", sa.Column("series_description", sa.String(64)))
    op.create_table(
        "job_destinations",
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
    op.create_table(
        "deliveries",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("instance_id", sa.Integer, sa.ForeignKey("instances.id"), nullable=False),
        sa.Column("destination", sa.String(32), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
        sa.UniqueConstraint("instance_id", "destination", "kind", name="uq_deliveries"),
        sa.Index("ix_deliveries_destination_state", "destination", "state"),
    )
    # carry over: every job that got as far as forwarding had the one destination
    op.execute(
        "INSERT INTO job_destinations (job_id, destination, state, attempts, next_attempt_at, "
        "last_error, updated_at) "
        "SELECT id, 'default', CASE state WHEN 'done' THEN 'delivered' WHEN 'failed' THEN "
        "'failed' ELSE 'pending' END, 0, 0, "
        "CASE state WHEN 'failed' THEN last_error END, updated_at FROM jobs "
        "WHERE state IN ('forwarding', 'done', 'failed') "
        "OR id IN (SELECT job_id FROM instances WHERE state IN ('denoised', 'delivered'))"
    )
    op.execute(
        "INSERT INTO deliveries (instance_id, destination, kind, state, updated_at) "
        "SELECT id, 'default', 'derived', CASE state WHEN 'delivered' THEN 'delivered' "
        "ELSE 'pending' END, updated_at FROM instances WHERE state IN ('denoised', 'delivered')"
    )


def downgrade() -> None:
    op.drop_table("deliveries")
    op.drop_table("job_destinations")
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA foreign_keys=OFF")  # batch mode copies and drops the jobs table
    with op.batch_alter_table("jobs") as batch:
        for column in (
            "series_description",
            "calling_ae",
            "send_original",
            "destinations",
            "rule",
            "action",
        ):
            batch.drop_column(column)
