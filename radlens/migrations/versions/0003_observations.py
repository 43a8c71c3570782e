"""Observations: what a task remembers of a patient's study for the patient's later studies.

A skin lesion's ABC(D) and melanoma probability, keyed by a salted hash of the patient and the
lesion's site and number, so that a follow-up visit states the change (radlens.history); and
the installation's own values, the salt among them.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "observations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("subject", sa.Text, nullable=False),
        sa.Column("task", sa.Text, nullable=False),
        sa.Column("item", sa.Text, nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("study_date", sa.Text),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("observed", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("observations_by_subject", "observations", ["subject", "task", "item"])
    op.create_index("observations_by_study", "observations", ["study_instance_uid"])
    op.create_index("observations_by_age", "observations", ["created_at"])
    op.create_table(
        "installation",
        sa.Column("name", sa.Text, primary_key=True),
        sa.Column("value", sa.Text, nullable=False),
    )


def downgrade() -> None:
    op.drop_table("installation")
    op.drop_index("observations_by_age", "observations")
    op.drop_index("observations_by_study", "observations")
    op.drop_index("observations_by_subject", "observations")
    op.drop_table("observations")
