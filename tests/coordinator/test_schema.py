"""Migrations equal the models, on both databases."""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext

from coordinator import db
from coordinator.schema import Base


def test_migrations_match_models(db_url: str) -> None:
    engine = db.make_engine(db_url)
    db.migrate(engine)
    db.migrate(engine)  # idempotent
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    engine.dispose()
    assert diff == []
