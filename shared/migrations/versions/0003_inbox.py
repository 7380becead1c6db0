"""inbox: accepted messages waiting for their session's turn

Revision ID: 0003
Revises: 0002
"""
import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "inbox",
        sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False),
        sa.Column("session_id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), nullable=False),
        sa.Column("channel_id", sa.String(length=100), nullable=False),
        sa.Column("platform_message_id", sa.String(length=200), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["session_id"], ["sessions.id"], ondelete="CASCADE"),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("channel_id", "platform_message_id", name="uq_inbox_platform_id"),
    )
    op.create_index("ix_inbox_session_seq", "inbox", ["session_id", "seq"])
    op.create_index("ix_inbox_created", "inbox", ["created_at"])


def downgrade() -> None:
    op.drop_index("ix_inbox_created", table_name="inbox")
    op.drop_index("ix_inbox_session_seq", table_name="inbox")
    op.drop_table("inbox")
