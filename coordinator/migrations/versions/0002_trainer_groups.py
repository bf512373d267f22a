"""Trainer groups: the group each trainer session belongs to, and the group a run trains with.

A trainer group that registers supersedes older groups of its run, whose sessions are then
refused (fencing), so two trainer groups never commit into one run.

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
    op.add_column("runs", sa.Column("trainer_group", sa.String(length=64), nullable=True))
    op.add_column("sessions", sa.Column("trainer_group", sa.String(length=64), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("trainer_group")
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("trainer_group")
