"""denoising while receiving: when a series' sender released, the gate's figures so far

Revision ID: 0003
Revises: 0002
"""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"


def upgrade() -> None:
    op.add_column("jobs", sa.Column("released_at", sa.Float))
    op.add_column("jobs", sa.Column("tally", sa.Text))


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("PRAGMA foreign_keys=OFF")  # batch mode copies and drops the jobs table
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("tally")
        batch.drop_column("released_at")
