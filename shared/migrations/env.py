"""Alembic environment: the URL comes from DATABASE_URL (or the embedded default)."""

from alembic import context

from shared.config import get_settings
from shared.db import engine_for
from shared.models import Base

config = context.config


def run_migrations() -> None:
    url = config.get_main_option("sqlalchemy.url") or get_settings().database_url
    with engine_for(url).connect() as connection:
        context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=url.startswith("sqlite"))
        with context.begin_transaction():
            context.run_migrations()
        connection.commit()


run_migrations()
