"""Baseline: the spool index, study jobs, quarantine, the outbox and the analyses.

The same tables as schema version 2 of the numbered SQLite migrations radlens carried before
Alembic; such a file is stamped at this revision, not rebuilt (``radlens.db.migrate``).

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("started_at", sa.Double),
        sa.Column("finished_at", sa.Double),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("error", sa.Text),
        sa.CheckConstraint("state IN ('queued', 'running', 'done', 'failed')",
                           name="jobs_state"),
        sqlite_autoincrement=True,
    )
    op.create_index("jobs_by_state", "jobs", ["state", "id"])
    op.create_index("jobs_by_study", "jobs", ["study_instance_uid"])

    op.create_table(
        "instances",
        sa.Column("sop_instance_uid", sa.Text, primary_key=True),
        sa.Column("sop_class_uid", sa.Text, nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("series_instance_uid", sa.Text, nullable=False),
        sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
        sa.Column("calling_aet", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
    )
    op.create_index("instances_by_study", "instances", ["study_instance_uid"])
    op.create_index("instances_pending", "instances", ["study_instance_uid"],
                    sqlite_where=sa.text("job_id IS NULL"),
                    postgresql_where=sa.text("job_id IS NULL"))
    op.create_index("instances_by_job", "instances", ["job_id"])

    op.create_table(
        "quarantine",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("received_at", sa.Double, nullable=False),
        sa.Column("calling_aet", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("size_bytes", sa.BigInteger, nullable=False),
        sa.Column("reason", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("destination", sa.Text, nullable=False),
        sa.Column("path", sa.Text, nullable=False),
        sa.Column("sop_instance_uid", sa.Text, nullable=False),
        sa.Column("sop_class_uid", sa.Text, nullable=False),
        sa.Column("transfer_syntax_uid", sa.Text, nullable=False),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id")),
        sa.Column("state", sa.Text, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("sent_at", sa.Double),
        sa.Column("last_status", sa.Integer),
        sa.Column("last_error", sa.Text),
        sa.CheckConstraint("state IN ('pending', 'sent', 'failed')", name="outbox_state"),
        sqlite_autoincrement=True,
    )
    op.create_index("outbox_due", "outbox", ["state", "next_attempt_at"])

    op.create_table(
        "frame_analyses",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id"), nullable=False),
        sa.Column("study_instance_uid", sa.Text, nullable=False),
        sa.Column("sop_instance_uid", sa.Text, nullable=False),
        sa.Column("frame", sa.Integer, nullable=False),
        sa.Column("predicted_class", sa.Text, nullable=False),
        sa.Column("p_normal", sa.Double, nullable=False),
        sa.Column("p_benign", sa.Double, nullable=False),
        sa.Column("p_malignant", sa.Double, nullable=False),
        sa.Column("latent", sa.LargeBinary, nullable=False),
        sa.Column("created_at", sa.Double, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("frame_analyses_by_study", "frame_analyses", ["study_instance_uid", "job_id"])

    op.create_table(
        "lesion_analyses",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("frame_analysis_id", sa.Integer, sa.ForeignKey("frame_analyses.id"),
                  nullable=False),
        sa.Column("lesion_index", sa.Integer, nullable=False),
        sa.Column("lesion_class", sa.Text, nullable=False),
        sa.Column("probability", sa.Double, nullable=False),
        sa.Column("latent", sa.LargeBinary, nullable=False),
        sa.Column("measurements", sa.Text, nullable=False),
        sqlite_autoincrement=True,
    )
    op.create_index("lesion_analyses_by_frame", "lesion_analyses", ["frame_analysis_id"])


def downgrade() -> None:
    for table in ("lesion_analyses", "frame_analyses", "outbox", "quarantine", "instances",
                  "jobs"):
        op.drop_table(table)
