"""Alembic environment: run on a connection handed over by `app.ledger.storage.database`."""

from __future__ import annotations

from alembic import context
from sqlalchemy.engine import Connection

from app.ledger.storage.schema import Base

connection: Connection | None = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError("run migrations with `clawbot db upgrade`, which supplies the connection")
context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
    render_as_batch=connection.dialect.name == "sqlite",
)
with context.begin_transaction():
    context.run_migrations()
