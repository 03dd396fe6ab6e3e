"""Persistent storage: SQLAlchemy models, the async engine, and Alembic-owned schema."""
