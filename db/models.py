"""ORM models (SQLAlchemy 2). The schema itself is created by Alembic migrations only.

Column types (``db.base``): ``Id`` for row ids; ``Str(n)`` for text that comes from data or the machine
(intents, stages, worker names) and is cut to its column; plain ``String(n)`` for names, owners and
enumerations, which are validated before they are stored and looked up by equality (cutting the value
looked up could find another row); ``Txt`` for unbounded text.
"""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Boolean, Float, ForeignKey, Index, Integer, LargeBinary, String
from sqlalchemy.orm import Mapped, mapped_column, relationship

from db.base import Base, Id, Str, Txt, utcnow


class Job(Base):
    __tablename__ = "jobs"
    __table_args__ = (Index("ix_jobs_status_kind", "status", "kind"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), index=True)  # db.jobs.JobKind
    queue: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(16), default="queued")  # db.jobs.JobStatus
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    progress: Mapped[float] = mapped_column(Float, default=0.0)
    stage: Mapped[str] = mapped_column(Str(200), default="queued")
    eta_seconds: Mapped[float | None] = mapped_column(Float, nullable=True)
    result: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    error: Mapped[str | None] = mapped_column(Txt, nullable=True)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    worker: Mapped[str | None] = mapped_column(Str(200), nullable=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    enqueued_at: Mapped[datetime | None] = mapped_column(nullable=True)
    started_at: Mapped[datetime | None] = mapped_column(nullable=True)
    heartbeat_at: Mapped[datetime | None] = mapped_column(nullable=True)
    finished_at: Mapped[datetime | None] = mapped_column(nullable=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True, index=True
    )


class JobEvent(Base):
    """Progress, log lines and metric points (the loss curve) of a job, in order."""

    __tablename__ = "job_events"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id", ondelete="CASCADE"), index=True)
    ts: Mapped[datetime] = mapped_column(default=utcnow)
    kind: Mapped[str] = mapped_column(String(16))  # log | metric | status
    message: Mapped[str] = mapped_column(Txt, default="")
    data: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)


class DatasetStatus(enum.StrEnum):
    IMPORTING = "importing"
    READY = "ready"
    FAILED = "failed"


class Dataset(Base):
    __tablename__ = "datasets"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(Str(200))  # any text (NUL included), validated to 200
    source: Mapped[str] = mapped_column(Txt)
    status: Mapped[str] = mapped_column(String(16), default=DatasetStatus.IMPORTING.value)
    error: Mapped[str | None] = mapped_column(Txt, nullable=True)
    options: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    stats: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    row_count: Mapped[int] = mapped_column(Integer, default=0)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    examples: Mapped[list[DatasetExample]] = relationship(
        back_populates="dataset", cascade="all, delete-orphan", passive_deletes=True
    )


class DatasetExample(Base):
    __tablename__ = "dataset_examples"
    __table_args__ = (Index("ix_examples_dataset_split", "dataset_id", "split", "id"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    dataset_id: Mapped[int] = mapped_column(ForeignKey("datasets.id", ondelete="CASCADE"))
    split: Mapped[str] = mapped_column(String(16))
    instruction: Mapped[str] = mapped_column(Txt)
    input: Mapped[str] = mapped_column(Txt)
    output: Mapped[str] = mapped_column(Txt)
    intent: Mapped[str] = mapped_column(Str(100), default="")
    category: Mapped[str] = mapped_column(Str(100), default="")
    flags: Mapped[str] = mapped_column(Str(50), default="")
    # counted at import with the default base model's tokenizer, before truncation (training estimates)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    reply_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)

    dataset: Mapped[Dataset] = relationship(back_populates="examples")


class Model(Base):
    __tablename__ = "models"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    kind: Mapped[str] = mapped_column(String(16))  # base | fine-tuned
    base_model: Mapped[str | None] = mapped_column(Str(300), nullable=True)
    architecture: Mapped[str | None] = mapped_column(Str(100), nullable=True)
    model_type: Mapped[str | None] = mapped_column(Str(16), nullable=True)  # causal | seq2seq
    parameter_count: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    size_bytes: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    content_hash: Mapped[str | None] = mapped_column(Str(80), nullable=True)
    path: Mapped[str] = mapped_column(Txt)
    train_job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True
    )
    training_config: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # a grounded model's reply settings set after training, over training_config's grounding (csra.specs.ReplySettings)
    reply_settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the key name that trained it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Evaluation(Base):
    __tablename__ = "evaluations"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    dataset_id: Mapped[int | None] = mapped_column(
        ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True
    )
    split: Mapped[str] = mapped_column(String(16), default="test")
    params: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    # the evaluated sample's make-up: examples, intents covered and per-intent counts
    sample: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="running")
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True)  # the key name that asked for it
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class EvaluationExample(Base):
    __tablename__ = "evaluation_examples"
    __table_args__ = (Index("ix_eval_examples_eval_model", "evaluation_id", "model_name"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    evaluation_id: Mapped[int] = mapped_column(ForeignKey("evaluations.id", ondelete="CASCADE"))
    model_id: Mapped[int | None] = mapped_column(ForeignKey("models.id", ondelete="SET NULL"), nullable=True)
    model_name: Mapped[str] = mapped_column(String(64))
    example_id: Mapped[int | None] = mapped_column(Id, nullable=True)
    intent: Mapped[str] = mapped_column(Str(100), default="")
    category: Mapped[str] = mapped_column(Str(100), default="")
    prompt: Mapped[str] = mapped_column(Txt)
    reference: Mapped[str] = mapped_column(Txt)
    prediction: Mapped[str] = mapped_column(Txt)
    scores: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)


class ChatSession(Base):
    __tablename__ = "chat_sessions"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    title: Mapped[str] = mapped_column(Str(200), default="New chat")
    owner: Mapped[str | None] = mapped_column(String(64), nullable=True, index=True)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)

    messages: Mapped[list[ChatMessage]] = relationship(
        back_populates="chat", cascade="all, delete-orphan", passive_deletes=True, order_by="ChatMessage.id"
    )


class ChatMessage(Base):
    __tablename__ = "chat_messages"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    chat_id: Mapped[int] = mapped_column(ForeignKey("chat_sessions.id", ondelete="CASCADE"), index=True)
    role: Mapped[str] = mapped_column(String(16))  # user | assistant
    content: Mapped[str] = mapped_column(Txt)
    raw_content: Mapped[str | None] = mapped_column(Txt, nullable=True)
    model_name: Mapped[str | None] = mapped_column(String(64), nullable=True)
    settings: Mapped[dict[str, Any] | None] = mapped_column(JSON, nullable=True)
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    status: Mapped[str] = mapped_column(String(16), default="done")  # pending | done | failed
    error: Mapped[str | None] = mapped_column(Txt, nullable=True)
    latency_ms: Mapped[float | None] = mapped_column(Float, nullable=True)
    prompt_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    completion_tokens: Mapped[int | None] = mapped_column(Integer, nullable=True)
    feedback: Mapped[str | None] = mapped_column(String(8), nullable=True)  # up | down
    corrected_reply: Mapped[str | None] = mapped_column(Txt, nullable=True)
    # from the answer memory: the customer message's predicted intent, the approved answers to the most
    # similar messages, the reply's placeholders outside the contract, the entry an approval made
    intent: Mapped[str | None] = mapped_column(Str(100), nullable=True)
    intent_confidence: Mapped[float | None] = mapped_column(Float, nullable=True)
    similar: Mapped[list[dict[str, Any]] | None] = mapped_column(JSON, nullable=True)
    slot_warnings: Mapped[list[str] | None] = mapped_column(JSON, nullable=True)
    memory_entry_id: Mapped[int | None] = mapped_column(Id, nullable=True)
    # a grounded reply: held to its approved answers (True), or the model's own words because no approved
    # answer's message is close to the customer's (False); None: not grounded
    follows_approved: Mapped[bool | None] = mapped_column(Boolean, nullable=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)

    chat: Mapped[ChatSession] = relationship(back_populates="messages")


# ``removed_at`` of an entry a rebuild has stored but not yet swapped in: hidden like a removed one
# (every query asks for ``removed_at IS NULL``), and never mistaken for a recent removal
MEMORY_PENDING = datetime(1970, 1, 1)


class MemoryEntry(Base):
    """One approved answer of the answer memory, with its message and reply embeddings.

    The vectors live here (any host rebuilds its index from the database); a removed entry keeps its
    row with ``removed_at`` set, so every process's index learns to drop it.
    """

    __tablename__ = "memory_entries"
    __table_args__ = (Index("ix_memory_dataset", "dataset_id"), Index("ix_memory_removed", "removed_at"))

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    message: Mapped[str] = mapped_column(Txt)
    reply: Mapped[str] = mapped_column(Txt)
    intent: Mapped[str] = mapped_column(Str(100), default="")
    category: Mapped[str] = mapped_column(Str(100), default="")
    source: Mapped[str] = mapped_column(String(16))  # dataset | chat
    dataset_id: Mapped[int | None] = mapped_column(ForeignKey("datasets.id", ondelete="SET NULL"), nullable=True)
    example_id: Mapped[int | None] = mapped_column(Id, nullable=True)
    chat_message_id: Mapped[int | None] = mapped_column(
        ForeignKey("chat_messages.id", ondelete="SET NULL"), nullable=True
    )
    group_key: Mapped[str] = mapped_column(Txt, default="")  # the normalised customer message (leakage group)
    message_vec: Mapped[bytes] = mapped_column(LargeBinary)
    reply_vec: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    removed_at: Mapped[datetime | None] = mapped_column(nullable=True)


class ThroughputMeasurement(Base):
    """Training tokens per second a train worker measured: by a finished run, or a short calibration.

    Training estimates (``dry_run``) divide a run's tokens by the latest measurement for its base model
    and method; the device and precision travel with it so an estimate says what it assumed.
    """

    __tablename__ = "throughput_measurements"
    __table_args__ = (Index("ix_throughput_lookup", "method", "measured_at"),)

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    base_model: Mapped[str] = mapped_column(Txt)  # the registered name (or HF id / folder) trained from
    method: Mapped[str] = mapped_column(String(16))  # full | lora
    precision: Mapped[str] = mapped_column(String(16))  # the resolved one: fp32 | bf16 | fp16
    device: Mapped[str] = mapped_column(Str(32))  # cpu | cuda | ...
    tokens_per_second: Mapped[float] = mapped_column(Float)
    # a calibration's optimizer update per step (a run's own tokens/s already includes it: 0 there)
    step_seconds: Mapped[float] = mapped_column(Float, default=0.0)
    source: Mapped[str] = mapped_column(String(16))  # job | calibration
    job_id: Mapped[int | None] = mapped_column(ForeignKey("jobs.id", ondelete="SET NULL"), nullable=True)
    worker: Mapped[str | None] = mapped_column(Str(200), nullable=True)
    measured_at: Mapped[datetime] = mapped_column(default=utcnow)


class Setting(Base):
    """Small key/value documents (the company profile)."""

    __tablename__ = "app_settings"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class ApiKey(Base):
    """A named API key with a role (``db.keys.Role``). Only the key's SHA-256 is stored, with its first
    characters to tell keys apart in ``csra keys list``; a revoked key keeps its row (names stay unique,
    and the rows it owns keep a name that means something)."""

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Id, primary_key=True)
    name: Mapped[str] = mapped_column(String(64), unique=True)
    role: Mapped[str] = mapped_column(String(16))
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used_at: Mapped[datetime | None] = mapped_column(nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(nullable=True)
