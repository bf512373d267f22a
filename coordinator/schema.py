"""The coordinator's SQL schema (SQLAlchemy 2). Alembic migrations in ``migrations/`` mirror it.

One row in ``samples`` is one work item (a prompt in one epoch) and the sample it becomes, so a
capture commit is a single-row transition. Times are UNIX seconds (floats) from the
coordinator's clock, which tests replace.
"""

from __future__ import annotations

from sqlalchemy import (
    BigInteger,
    Boolean,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column


class Base(DeclarativeBase):
    pass


class PromptState:
    PENDING = "PENDING"
    LEASED = "LEASED"
    CAPTURED = "CAPTURED"
    DEAD = "DEAD"
    ALL = (PENDING, LEASED, CAPTURED, DEAD)


class SampleState:
    READY = "READY"
    ASSIGNED = "ASSIGNED"
    TRAINED = "TRAINED"
    RETIRED = "RETIRED"
    LOST = "LOST"
    DEAD = "DEAD"
    DROPPED = "DROPPED"
    ALL = (READY, ASSIGNED, TRAINED, RETIRED, LOST, DEAD, DROPPED)


class RunRow(Base):
    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    config: Mapped[bytes] = mapped_column(LargeBinary)
    """Serialized ``RunConfig``."""
    vocab_map: Mapped[bytes] = mapped_column(LargeBinary)
    fingerprint: Mapped[str] = mapped_column(String(64))
    dataset_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(16))
    state_reason: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[float] = mapped_column(Float)
    num_prompts: Mapped[int] = mapped_column(Integer)
    num_bad_rows: Mapped[int] = mapped_column(Integer)
    throttled: Mapped[bool] = mapped_column(Boolean, default=False)
    last_committed_step: Mapped[int] = mapped_column(Integer, default=0)
    last_checkpoint_step: Mapped[int] = mapped_column(Integer, default=0)
    last_checkpoint_uri: Mapped[str] = mapped_column(Text, default="")
    last_step_loss: Mapped[float] = mapped_column(Float, default=0.0)
    final_step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    """Set when the data ran out: the last step that will ever be assigned."""
    dropped_tail: Mapped[int] = mapped_column(Integer, default=0)
    trainer_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """The trainer group that trains this run now; sessions of older groups are superseded."""


class BadRowRow(Base):
    __tablename__ = "bad_rows"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), index=True)
    line: Mapped[int] = mapped_column(Integer)
    reason: Mapped[str] = mapped_column(Text)


class PromptRow(Base):
    __tablename__ = "prompts"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    prompt_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    position: Mapped[int] = mapped_column(Integer)
    conversation: Mapped[bytes] = mapped_column(LargeBinary)


class SampleRow(Base):
    __tablename__ = "samples"
    __table_args__ = (
        UniqueConstraint("run_id", "sample_id", name="uq_samples_run_sample"),
        Index("ix_samples_lease_order", "run_id", "prompt_state", "priority", "epoch",
              "position"),
        Index("ix_samples_ready_order", "run_id", "sample_state", "committed_at"),
        Index("ix_samples_step", "run_id", "step", "slot"),
        Index("ix_samples_session", "lease_session"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    sample_id: Mapped[str] = mapped_column(String(96))
    prompt_id: Mapped[str] = mapped_column(String(64))
    epoch: Mapped[int] = mapped_column(Integer)
    position: Mapped[int] = mapped_column(Integer)
    prompt_state: Mapped[str] = mapped_column(String(16))
    priority: Mapped[int] = mapped_column(Integer, default=1)
    """Lease order: 0 for recaptures that an assigned step waits for, 1 otherwise."""
    sample_state: Mapped[str | None] = mapped_column(String(16), nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    losses: Mapped[int] = mapped_column(Integer, default=0)
    generation: Mapped[int] = mapped_column(Integer, default=0)
    lease_token: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_session: Mapped[str | None] = mapped_column(String(64), nullable=True)
    lease_deadline: Mapped[float | None] = mapped_column(Float, nullable=True)
    reason: Mapped[str] = mapped_column(Text, default="")
    """Why the prompt or sample is DEAD or DROPPED, or why it was last lost."""
    ref: Mapped[bytes | None] = mapped_column(LargeBinary, nullable=True)
    """Serialized ``SampleRef`` of the current generation."""
    nbytes: Mapped[int] = mapped_column(BigInteger, default=0)
    num_tokens: Mapped[int] = mapped_column(Integer, default=0)
    committed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    step: Mapped[int | None] = mapped_column(Integer, nullable=True)
    slot: Mapped[int | None] = mapped_column(Integer, nullable=True)


class SessionRow(Base):
    __tablename__ = "sessions"

    session_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))
    identity: Mapped[str] = mapped_column(Text, default="")
    state: Mapped[str] = mapped_column(String(16))
    """ACTIVE, EXPIRED, CLOSED, or SUPERSEDED (a trainer whose group a newer one replaced)."""
    created_at: Mapped[float] = mapped_column(Float)
    last_heartbeat: Mapped[float] = mapped_column(Float)
    expires_at: Mapped[float] = mapped_column(Float)
    trainer_group: Mapped[str | None] = mapped_column(String(64), nullable=True)
    """Trainers: the group (one launch of all ranks) this session belongs to."""


class StepRow(Base):
    __tablename__ = "steps"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    size: Mapped[int] = mapped_column(Integer)
    assigned_at: Mapped[float] = mapped_column(Float)
    committed_at: Mapped[float | None] = mapped_column(Float, nullable=True)
    loss: Mapped[float | None] = mapped_column(Float, nullable=True)


class CheckpointRow(Base):
    __tablename__ = "checkpoints"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    uri: Mapped[str] = mapped_column(Text)
    created_at: Mapped[float] = mapped_column(Float)


class StepMetricsRow(Base):
    """The run's history: the metrics of one committed step (see ``history`` for thinning).

    A step committed again after a rollback replaces its row, so each step appears once.
    """

    __tablename__ = "step_metrics"

    run_id: Mapped[str] = mapped_column(
        ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True
    )
    step: Mapped[int] = mapped_column(Integer, primary_key=True)
    committed_at: Mapped[float] = mapped_column(Float)
    metrics: Mapped[bytes] = mapped_column(LargeBinary)
    """Serialized ``StepRecord`` holding only ``metrics`` (a double keeps NaN and infinities)."""
