"""Nodes and leases: several processes on one state.

Every serving process registers as a node with a heartbeat. A worker holds a job, and a sender
an outbox row, under a lease it renews while it works; a lease that runs out (its node died)
lets another node take the row.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "nodes",
        sa.Column("id", sa.Text, primary_key=True),
        sa.Column("role", sa.Text, nullable=False),
        sa.Column("host", sa.Text, nullable=False),
        sa.Column("pid", sa.Integer, nullable=False),
        sa.Column("started_at", sa.Double, nullable=False),
        sa.Column("heartbeat_at", sa.Double, nullable=False),
        sa.Column("stopped_at", sa.Double),
    )
    for table in ("jobs", "outbox"):
        op.add_column(table, sa.Column("claimed_by", sa.Text))
        op.add_column(table, sa.Column("lease_until", sa.Double))


def downgrade() -> None:
    for table in ("jobs", "outbox"):
        with op.batch_alter_table(table) as batch:
            batch.drop_column("lease_until")
            batch.drop_column("claimed_by")
    op.drop_table("nodes")
