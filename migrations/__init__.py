"""Alembic migrations that own clawbot's database schema (shipped inside the package)."""
