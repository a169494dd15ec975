"""The queen's settings: every option is a command-line flag and a QUEENBEE_* environment variable."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from queenbee.ledger_db import parse_target


def default_db_path() -> Path:
    """Where the usage ledger lives unless --db says otherwise: $XDG_DATA_HOME/queenbee/queenbee.db.

    A fixed per-user location rather than the working directory, so that the queen and `queenbee usage`
    find the same ledger wherever they are started from.
    """
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "queenbee" / "queenbee.db"


class QueenSettings(BaseSettings):
    """queenbee: an OpenAI-compatible router for workerbee workers.

    Every option can also be set with an environment variable: QUEENBEE_ followed by the option's name
    in upper case with underscores, e.g. QUEENBEE_PORT=8000.

    `queenbee usage --help` describes the usage report (tokens per worker payout address and per key).
    """

    model_config = SettingsConfigDict(
        env_prefix="QUEENBEE_",
        cli_kebab_case=True,
        cli_prog_name="queenbee",
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        frozen=True,
    )

    host: str = Field(default="127.0.0.1", description="Address to listen on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port to listen on (0 picks a free one).")
    log_level: str = Field(default="info", description="Log level: trace, debug, info, warning or error.")
    queue_size: int = Field(
        default=64, ge=0, description="Requests per model that may wait for a free worker before 503."
    )
    queue_timeout: float = Field(
        default=30.0, ge=0, description="Seconds a request may wait for a free worker before 503."
    )
    routing: Literal["cache-aware", "least-loaded"] = Field(
        default="cache-aware",
        description="How a worker is chosen: by predicted time to first token from the prefixes workers "
        "hold (cache-aware), or the least loaded worker with a free slot, the fastest among equals.",
    )
    cache_load_guard: float = Field(
        default=0.5,
        ge=0,
        description="Cache-aware routing sends a request to a worker holding its prefix only while that "
        "worker is at most this fraction of its slots busier than the least loaded one.",
    )
    cache_summary_ttl: float = Field(
        default=300.0,
        gt=0,
        description="Seconds a worker's cache summary counts for routing after it came (workers refresh "
        "theirs every minute).",
    )
    first_token_timeout: float = Field(
        default=120.0, gt=0, description="Seconds a worker may take to send the first token."
    )
    token_timeout: float = Field(
        default=60.0, gt=0, description="Seconds a worker may stay silent between tokens."
    )
    request_timeout: float = Field(default=600.0, gt=0, description="Seconds a whole request may take.")
    max_attempts: int = Field(
        default=3, ge=1, description="Workers tried for one request when a worker fails before answering."
    )
    max_resumes: int = Field(
        default=3,
        ge=0,
        description="Times an answer may move to another worker serving the same model file after its "
        "worker died, went silent or failed mid-answer (0: never; the stream then ends with an error).",
    )
    drain_handover: float = Field(
        default=5.0,
        ge=0,
        description="Seconds a draining worker (one shutting down) keeps its streams before they are "
        "resumed on other workers with the same model file, so that the volunteer need not wait for long "
        "answers; a stream that no other worker can take stays where it is.",
    )
    register_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a new worker connection has to send its registration."
    )
    cancel_grace: float = Field(
        default=5.0, gt=0, description="Seconds a worker has to confirm a cancel before its slot is freed."
    )
    heartbeat_interval: float = Field(default=15.0, gt=0, description="Seconds between pings to each worker.")
    heartbeat_timeout: float = Field(
        default=20.0, gt=0, description="Seconds a worker has to answer a ping before it is dropped."
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds in-flight requests may take to finish on shutdown."
    )
    max_frame_bytes: int = Field(
        default=8 * 2**20, ge=1024, description="Largest websocket frame accepted, bytes."
    )
    max_body_bytes: int = Field(
        default=8 * 2**20, ge=1024, description="Largest HTTP request body accepted, bytes."
    )
    api_key: list[SecretStr] = Field(
        default_factory=list,
        description="Client API key accepted as 'Authorization: Bearer KEY' (repeatable). "
        "With no key here or in --api-keys-file, the queen is open to anyone who can reach it.",
    )
    api_keys_file: Path | None = Field(
        default=None,
        description="File of client API keys, one per line: 'KEY' or 'NAME KEY [rpm=N] [tpm=N]'; "
        "blank lines and lines starting with # are ignored. NAME is what the usage ledger records.",
    )
    worker_token: SecretStr | None = Field(
        default=None, description="Token workers must present (workerbee --auth-key) to register."
    )
    worker_token_file: Path | None = Field(
        default=None, description="File whose first line is the worker token (instead of --worker-token)."
    )
    admin_key: SecretStr | None = Field(
        default=None, description="Bearer key for the /admin endpoints; without it they do not exist."
    )
    admin_key_file: Path | None = Field(
        default=None, description="File whose first line is the admin key (instead of --admin-key)."
    )
    stats_key: SecretStr | None = Field(
        default=None,
        description="Bearer key for /stats, /metrics, /v1/workers and the dashboard (open if unset; "
        "they show hardware, models and throughput).",
    )
    stats_key_file: Path | None = Field(
        default=None, description="File whose first line is the stats key (instead of --stats-key)."
    )
    allowed_host: list[str] = Field(
        default_factory=list,
        description="Host header the queen answers to (repeatable; '*.example.com' matches subdomains). "
        "Unset: any host. Set it on a public queen to defeat DNS rebinding.",
    )
    worker_origin: list[str] = Field(
        default_factory=list,
        description="Browser Origin allowed to open the /worker websocket (repeatable). Upgrades carrying "
        "any other Origin header are refused; workerbee sends none.",
    )
    max_connections: int = Field(
        default=2048, ge=1, description="Concurrent connections served; beyond it new ones get 503."
    )
    header_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a connection has to send a request's headers."
    )
    body_timeout: float = Field(
        default=30.0, gt=0, description="Seconds a client has to send a request's whole body."
    )
    max_concurrent_per_key: int | None = Field(
        default=None, ge=1, description="Requests one API key may have in flight at once (429 beyond it)."
    )
    max_request_buffer_bytes: int = Field(
        default=4 * 2**20,
        ge=64 * 2**10,
        description="Bytes of a worker's output the queen holds for one request whose client is not "
        "reading; beyond it the request is cancelled and the client's response ended.",
    )
    max_response_bytes: int = Field(
        default=64 * 2**20,
        ge=2**20,
        description="Largest whole response a worker may send for one request, bytes (in parts if needed).",
    )
    rate_limit_rpm: int | None = Field(
        default=None, ge=1, description="Requests per minute allowed to each API key (unlimited if unset)."
    )
    rate_limit_tpm: int | None = Field(
        default=None,
        ge=1,
        description="Prompt plus completion tokens per minute allowed to each API key (unlimited if unset).",
    )
    db: Path | str = Field(
        default_factory=default_db_path,
        description="The usage ledger: a SQLite file (created if missing), or a postgresql://USER@HOST/DB "
        "URL that queen replicas share (docs/scaling.md). "
        "Default: $XDG_DATA_HOME/queenbee/queenbee.db, i.e. ~/.local/share/queenbee/queenbee.db.",
    )
    ledger_spool: Path | None = Field(
        default=None,
        description="File where usage rows wait, fsynced, while the ledger's database refuses them. "
        "Default: <db>.spool beside a SQLite file; for PostgreSQL, one per database URL in "
        "$XDG_DATA_HOME/queenbee (give each replica on one host its own).",
    )
    responses_retention: float = Field(
        default=30 * 86400.0,
        gt=0,
        description="Seconds a response stored by the Responses API (store=true) is kept. Default: 30 days.",
    )
    fine_tuning_max_file_bytes: int = Field(
        default=4 * 2**20,
        ge=1024,
        description="Largest file /v1/files takes, bytes (a job's files travel to the worker in one frame).",
    )
    fine_tuning_max_model_bytes: int = Field(
        default=16 * 2**30,
        ge=2**20,
        description="Largest fine-tuned GGUF a training worker may upload to the queen, bytes (kept in "
        "models/ beside --db, by SHA-256).",
    )
    fine_tuning_attempts: int = Field(
        default=3, ge=1, description="Workers a fine-tuning job may be lost on before it fails."
    )
    fine_tuning_window: int = Field(
        default=256,
        ge=256,
        le=8192,
        multiple_of=256,
        description="Tokens per training window (context, batch and micro-batch of llama.cpp's training).",
    )
    fine_tuning_learning_rate: float = Field(
        default=1e-4,
        gt=0,
        le=1,
        description="AdamW's learning rate for a learning_rate_multiplier of 1.",
    )
    auditor_token: SecretStr | None = Field(
        default=None,
        description="Workers presenting this token (workerbee --auditor-token) are trusted auditors: they "
        "score other workers' answers. Without it nothing is audited. Prefer --auditor-token-file.",
    )
    auditor_token_file: Path | None = Field(
        default=None, description="A file whose first line is the auditor token (instead of --auditor-token)."
    )
    model_pin: list[str] = Field(
        default_factory=list,
        description="ID=SHA256: only a file with this SHA-256 may serve the model id; a worker whose file "
        "differs is refused that id. Repeatable.",
    )
    audit_rate: float = Field(default=0.05, ge=0, le=1, description="Share of delivered answers audited.")

    @field_validator("db", mode="before")
    @classmethod
    def _db_target(cls, value: object) -> object:
        """A postgresql:// URL stays a string; anything else is a file path."""
        return parse_target(value) if isinstance(value, str | Path) else value

    @field_validator("model_pin")
    @classmethod
    def _pins(cls, pins: list[str]) -> list[str]:
        for pin in pins:
            model, sep, digest = pin.rpartition("=")
            if not sep or not model or re.fullmatch(r"[0-9a-fA-F]{64}", digest.strip()) is None:
                raise ValueError(f"{pin!r} is not ID=SHA256 (a model id, '=', 64 hex digits)")
        return pins

    probation_rate: float = Field(
        default=0.5, ge=0, le=1, description="Share of a worker's answers audited while it is on probation."
    )
    probation_requests: int = Field(
        default=20, ge=0, description="Requests a flagged worker stays on probation for."
    )
    audit_gap_threshold: float = Field(
        default=0.5,
        gt=0,
        description="Nats below the model's best token above which a greedy answer's token is a miss "
        "(two misses flag the answer).",
    )
    audit_timeout: float = Field(
        default=60.0, gt=0, description="Seconds an audit may wait for an auditor's free slot, and run."
    )
    trusted_only_key: list[str] = Field(
        default_factory=list,
        description="An API key's name (or key-XXXXXXXX id) whose prompts go only to trusted workers (the "
        "auditors), never to other workers. Repeatable.",
    )
    possession_challenges: bool = Field(
        default=True,
        description="Ask each new worker the hash of a random byte range of its model files (needs an "
        "auditor holding the same file).",
    )
    escrow_audits: int = Field(
        default=3, ge=0, description="Audits a new worker must pass before its escrowed earnings are payable."
    )
    escrow_seconds: float = Field(
        default=3600.0,
        ge=0,
        description="Seconds a new worker must be connected before its escrowed earnings are payable.",
    )
    log_json: bool = Field(default=False, description="Log JSON lines instead of text.")
    gc_freeze: bool = Field(
        default=True,
        description="Keep the hive's long-lived objects out of Python's cyclic garbage collector "
        "(gc.freeze), so that full collections do not pause every request with thousands of workers "
        "connected, and collect the young generation every 10,000 allocations instead of 700 "
        "(queenbee/gc_guard.py).",
    )
    redis_url: str | None = Field(
        default=None,
        description="redis://HOST:PORT/DB of the Redis that joins queen replicas into one hive (workers, "
        "dispatch between replicas, global rate limits; docs/scaling.md). Unset: a hive of one queen.",
    )
    replica_id: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="This replica's name in the hive (metrics label, /v1/workers). Default: a random one.",
    )
    replica_lease: float = Field(
        default=3.0,
        ge=0.3,
        description="Seconds a replica's announcement in Redis lives unless renewed (it is renewed every "
        "third of it): a replica that dies leaves the hive this long after.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, url: str | None) -> str | None:
        if url is not None and not url.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"{url[:200]!r} is not a Redis URL (redis://HOST:PORT/DB, rediss://... or unix://...)"
            )
        return url
