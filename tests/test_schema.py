"""The migrations build exactly the schema the models declare, on both backends (a column added to a model without
its migration, or the other way round, fails here rather than in production)."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext

from shared.db import engine_for
from shared.models import Base


def test_the_migrations_build_the_models_schema(database_url):
    with engine_for(database_url).connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_server_default": False}),
                                Base.metadata)
    assert diff == []
