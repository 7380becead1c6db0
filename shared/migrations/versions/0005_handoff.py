"""sessions: who answers (the Agent or a person), which operator, since when, why; events: who and why

Handoff to a person: `mode` is agent (every session before this revision), waiting (a person was asked for) or
human (an operator has it). `mode_at` orders the waiting queue and times an operator's silence; `notice_sent`
makes the user's notice one per handoff. Lifecycle events gain who made them and why.

Revision ID: 0005
Revises: 0004
"""
import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("sessions", sa.Column("mode", sa.String(length=10), server_default="agent", nullable=False))
    op.add_column("sessions", sa.Column("operator", sa.String(length=100), nullable=True))
    op.add_column("sessions", sa.Column("mode_at", sa.DateTime(timezone=True), nullable=True))
    op.add_column("sessions", sa.Column("handoff_reason", sa.Text(), nullable=True))
    op.add_column("sessions", sa.Column("notice_sent", sa.Boolean(), server_default=sa.text("false"),
                                        nullable=False))
    op.create_index("ix_sessions_handoff", "sessions", ["mode", "mode_at"],
                    postgresql_where=sa.text("mode <> 'agent'"), sqlite_where=sa.text("mode <> 'agent'"))
    op.add_column("session_events", sa.Column("actor", sa.String(length=100), nullable=True))
    op.add_column("session_events", sa.Column("detail", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("session_events") as batch:
        batch.drop_column("detail")
        batch.drop_column("actor")
    op.drop_index("ix_sessions_handoff", table_name="sessions")
    with op.batch_alter_table("sessions") as batch:
        batch.drop_column("notice_sent")
        batch.drop_column("handoff_reason")
        batch.drop_column("mode_at")
        batch.drop_column("operator")
        batch.drop_column("mode")
