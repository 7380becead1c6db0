"""messages: where a reply goes (the chat of the message it answers) and when that message was sent

A per-person session's messages come from several channels and chats, and a Telegram topic or Discord thread is
not the session row's chat: a reply carries its own route. NULL on rows written before this revision: the
session row's chat_id/chat_kind stand in (what the outbox used then). user_sent_at: when the user sent the
message a reply answers (WhatsApp's 24-hour customer-service window is counted from it).

Revision ID: 0004
Revises: 0003
"""
import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("chat_id", sa.String(length=100), nullable=True))
    op.add_column("messages", sa.Column("chat_kind", sa.String(length=10), nullable=True))
    op.add_column("messages", sa.Column("thread_id", sa.String(length=100), nullable=True))
    op.add_column("messages", sa.Column("user_sent_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("messages") as batch:
        batch.drop_column("user_sent_at")
        batch.drop_column("thread_id")
        batch.drop_column("chat_kind")
        batch.drop_column("chat_id")
