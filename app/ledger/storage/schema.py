"""Tables. Alembic's migrations in `migrations/` own the schema; these mirror them."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, DateTime, Index, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    """Declarative base of clawbot's tables."""


class ApiKey(Base):
    """An API key: only its hash and a short lookup prefix are stored, never the key."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    prefix: Mapped[str] = mapped_column(String(32), index=True)
    """The key's first characters, to find its row without scanning."""
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    """SHA-256 of the whole key (keys are random, so no salt or slow hash is needed)."""
    name: Mapped[str] = mapped_column(String(200))
    owner: Mapped[str | None] = mapped_column(String(200))
    meta: Mapped[dict[str, Any] | None] = mapped_column("metadata", JSON)
    models: Mapped[list[str] | None] = mapped_column(JSON)
    """Allowed model ids or aliases; null allows every model."""
    requests_per_minute: Mapped[int | None] = mapped_column(Integer)
    tokens_per_minute: Mapped[int | None] = mapped_column(Integer)
    max_parallel: Mapped[int | None] = mapped_column(Integer)
    budget_total_tokens: Mapped[int | None] = mapped_column(BigInteger)
    budget_period_tokens: Mapped[int | None] = mapped_column(BigInteger)
    budget_period: Mapped[str | None] = mapped_column(String(16))
    """"day" or "month" for `budget_period_tokens`."""
    spent_tokens: Mapped[int] = mapped_column(BigInteger, default=0)
    """Tokens used so far, added by the audit writer's batches (never per request)."""
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    rotated_to: Mapped[str | None] = mapped_column(String(40))
    """The key that replaced this one; it keeps working until `expires_at` (the grace)."""
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), index=True)
    """Bumped on every change: replicas poll it to invalidate their key caches."""
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class AuditRecord(Base):
    """One row per answered request, success or failure. Never a key or token."""

    __tablename__ = "audit_log"
    __table_args__ = (
        Index("ix_audit_log_ts", "ts"),
        Index("ix_audit_log_key_ts", "key_id", "ts"),
        Index("ix_audit_log_model_ts", "model", "ts"),
    )

    id: Mapped[int] = mapped_column(
        BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True
    )
    request_id: Mapped[str] = mapped_column(String(128))
    ts: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    key_id: Mapped[str | None] = mapped_column(String(40))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    route: Mapped[str] = mapped_column(String(200))
    model: Mapped[str | None] = mapped_column(String(200))
    backend: Mapped[str | None] = mapped_column(String(500))
    status: Mapped[int] = mapped_column(Integer)
    error_type: Mapped[str | None] = mapped_column(String(64))
    latency_ms: Mapped[float] = mapped_column()
    ttft_ms: Mapped[float | None] = mapped_column()
    prompt_tokens: Mapped[int | None] = mapped_column(Integer)
    completion_tokens: Mapped[int | None] = mapped_column(Integer)
    stream: Mapped[bool] = mapped_column(Boolean, default=False)
    request_body: Mapped[str | None] = mapped_column(Text)
    """Only when body logging is enabled in clawbot.json."""
    response_body: Mapped[str | None] = mapped_column(Text)
