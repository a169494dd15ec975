"""Fine-tuning jobs on a worker started with --train: run the trainer process, relay its progress, and
serve what it made.

The training itself runs in `python -m workerbee.trainer` (a failed GGML_ASSERT aborts a process, and
cancelling is a kill). Its `message` and `metrics` lines go to the queen as `Chunk` frames of the job;
when it is done the fine-tuned GGUF, named by its SHA-256, is loaded and served as the job's
`output_model`, and the job's `Result` carries a `TrainingReport`. Each fine-tuned GGUF in --train-dir has
a `<sha256>.json` beside it saying what it is served as, so a restarted worker serves it again.

Full fine-tuning takes about `BYTES_PER_PARAMETER` bytes of memory a parameter (F32 weights, their
gradients and AdamW's two moments, with the activations of a short context): a model that does not fit
in the memory this worker has free, or is bigger than `--train-max-parameters`, is refused by name.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import shutil
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import gguf
import psutil
from pydantic import BaseModel, ConfigDict

from protocol import ErrorCode, LoadModelJob, TrainingCapability, TrainJob, Usage
from protocol.training import TrainingEvent, TrainingReport
from workerbee.engine import ChunkSink
from workerbee.errors import Cancelled, EngineError
from workerbee.file_hash import model_sha256
from workerbee.prompts import ModelConfig
from workerbee.trainer import TrainingSpec

log = logging.getLogger("workerbee.training")

BYTES_PER_PARAMETER: Final = 18.5
"""Memory full fine-tuning needs per parameter, bytes (measured on SmolLM2-135M with 256-token windows)."""

SILENCE_TIMEOUT: Final = 900.0
"""Seconds the trainer may go without a line (one step, or the conversions) before it counts as hung."""


class TrainedModel(BaseModel):
    """What a fine-tuned GGUF in --train-dir is served as, kept beside it (`<sha256>.json`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: str
    base: str
    n_ctx: int
    sha256: str


def trained_model(gguf_path: Path) -> Path:
    """Where the description of a fine-tuned GGUF is kept."""
    return gguf_path.with_suffix(".json")


def trained_models(output_dir: Path) -> list[ModelConfig]:
    """The fine-tuned models in `output_dir`, to serve again after a restart (unreadable ones skipped)."""
    configs: list[ModelConfig] = []
    for description in sorted(output_dir.glob("*.json")):
        path = description.with_suffix(".gguf")
        try:
            model = TrainedModel.model_validate_json(description.read_text())
        except (OSError, ValueError) as exc:
            log.warning("skipping %s: %s", description, exc)
            continue
        if not path.is_file():
            continue
        size = path.stat().st_size
        configs.append(
            ModelConfig(id=model.id, path=path, n_ctx=model.n_ctx, size_bytes=size, sha256=model.sha256)
        )
    return configs


def upload_url(queen_url: str, sha256: str) -> str:
    """Where the queen takes a fine-tuned model: its /worker/models/{sha256}, over HTTP(S)."""
    parts = urlsplit(queen_url)
    scheme = "https" if parts.scheme == "wss" else "http"
    path = parts.path.rstrip("/").removesuffix("/worker")
    return urlunsplit((scheme, parts.netloc, f"{path}/worker/models/{sha256}", "", ""))


def uploader(queen_url: str, auth_key: str) -> Callable[[Path, str], Awaitable[None]]:
    """Uploads a file to the queen with the worker token; raises on any failure (httpx, a refusal)."""
    import httpx

    from workerbee.transport import ssl_context

    async def upload(path: Path, sha256: str) -> None:
        async def chunks() -> AsyncIterator[bytes]:
            with path.open("rb") as file:
                while chunk := await asyncio.to_thread(file.read, 2**20):
                    yield chunk

        headers = {"Authorization": f"Bearer {auth_key}"} if auth_key else {}
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        headers["Content-Length"] = str(size)
        verify: Any = ssl_context(queen_url) or True
        timeout = httpx.Timeout(60.0, connect=10.0)
        async with httpx.AsyncClient(verify=verify, timeout=timeout) as client:
            response = await client.put(upload_url(queen_url, sha256), content=chunks(), headers=headers)
        if response.status_code != 200:
            raise RuntimeError(f"the queen answered {response.status_code}: {response.text[:200]}")

    return upload


def downloader(queen_url: str, auth_key: str) -> Callable[[str, Path], Awaitable[None]]:
    """Fetches a model from the queen into a file, kept only if its content has the SHA-256 asked for."""
    import httpx

    from workerbee.transport import ssl_context

    async def download(sha256: str, destination: Path) -> None:
        headers = {"Authorization": f"Bearer {auth_key}"} if auth_key else {}
        verify: Any = ssl_context(queen_url) or True
        partial = destination.with_name(destination.name + ".part")
        hasher = hashlib.sha256()
        try:
            with await asyncio.to_thread(partial.open, "wb") as file:

                def keep(chunk: bytes) -> None:
                    hasher.update(chunk)
                    file.write(chunk)

                timeout = httpx.Timeout(60.0, connect=10.0)
                async with (
                    httpx.AsyncClient(verify=verify, timeout=timeout) as client,
                    client.stream("GET", upload_url(queen_url, sha256), headers=headers) as response,
                ):
                    if response.status_code != 200:
                        raise EngineError(
                            ErrorCode.MODEL_NOT_FOUND, f"the queen answered {response.status_code}", "model"
                        )
                    async for chunk in response.aiter_bytes(2**20):
                        await asyncio.to_thread(keep, chunk)
            if hasher.hexdigest() != sha256:
                raise EngineError(ErrorCode.INTERNAL_ERROR, "the model from the queen has another SHA-256")
            await asyncio.to_thread(partial.replace, destination)
        finally:
            await asyncio.to_thread(partial.unlink, True)

    return download


def parameter_count(path: Path) -> int:
    """Weights in a GGUF file, read from its tensor shapes (the header only)."""
    reader = gguf.GGUFReader(path)
    return sum(int(tensor.n_elements) for tensor in reader.tensors)


def capability(max_parameters: int) -> TrainingCapability:
    """What this worker can train now: full fine-tuning, up to what its free memory holds."""
    free = int(psutil.virtual_memory().available // 2**20)
    fits = int(free * 2**20 / BYTES_PER_PARAMETER)
    return TrainingCapability(methods=["full"], max_parameters=min(max_parameters, fits), memory_free=free)


def check_fits(parameters: int, max_parameters: int, memory_free: int) -> None:
    """Refuse a model too big to fine-tune here, naming the limit (EngineError, the job's fault)."""
    needed = int(parameters * BYTES_PER_PARAMETER / 2**20)
    if parameters > max_parameters:
        raise EngineError(
            ErrorCode.INVALID_REQUEST,
            f"the model has {parameters / 1e9:.2f} billion parameters; this worker fine-tunes at most "
            f"{max_parameters / 1e9:.2f} billion (--train-max-parameters)",
            "model",
        )
    if needed > memory_free:
        raise EngineError(
            ErrorCode.INVALID_REQUEST,
            f"full fine-tuning of {parameters / 1e9:.2f} billion parameters needs about {needed} MiB "
            f"({BYTES_PER_PARAMETER} bytes a parameter); this worker has {memory_free} MiB free",
            "model",
        )


class Trainer:
    """Runs `train` jobs for a worker: one at a time, each in a process of its own."""

    def __init__(
        self,
        models: Callable[[], dict[str, ModelConfig]],
        serve: Callable[[ModelConfig], Awaitable[None]],
        output_dir: Path,
        *,
        threads: int,
        max_parameters: int,
        upload: Callable[[Path, str], Awaitable[None]] | None = None,
        download: Callable[[str, Path], Awaitable[None]] | None = None,
    ) -> None:
        self._upload = upload
        self._download = download
        """Fetches a fine-tuned file (SHA-256, destination) from the queen, checking its hash."""
        """Sends a fine-tuned file (path, SHA-256) to the queen before the job is reported done."""
        self._models = models
        """The configs of the models the worker serves, by id (the bases a job may name)."""
        self._serve = serve
        """Loads a fine-tuned model and serves it (the worker re-registers with it)."""
        self.output_dir = output_dir
        self.threads = threads
        self.max_parameters = max_parameters
        self._lock = asyncio.Lock()

    async def load(self, job: LoadModelJob) -> tuple[Usage, dict[str, Any]]:
        """Serve a fine-tuned model another worker trained, fetched from the queen unless it is here."""
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        if job.model in self._models():
            return usage, {"model": job.model}
        base = self._models().get(job.base)
        if base is None:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"this worker does not serve '{job.base}'", "base")
        path = self.output_dir / f"{job.sha256}.gguf"
        if not await asyncio.to_thread(path.is_file):
            if self._download is None:
                raise EngineError(ErrorCode.INVALID_REQUEST, "this worker cannot fetch models", "model")
            await asyncio.to_thread(self.output_dir.mkdir, parents=True, exist_ok=True)
            await self._download(job.sha256, path)
        size = await asyncio.to_thread(lambda: path.stat().st_size)
        description = TrainedModel(id=job.model, base=job.base, n_ctx=base.n_ctx, sha256=job.sha256)
        await asyncio.to_thread(trained_model(path).write_text, description.model_dump_json())
        await self._serve(
            ModelConfig(id=job.model, path=path, n_ctx=base.n_ctx, size_bytes=size, sha256=job.sha256)
        )
        return usage, {"model": job.model}

    async def run(
        self, job: TrainJob, cancel: threading.Event, on_chunk: ChunkSink
    ) -> tuple[Usage, dict[str, Any]]:
        """Train as `job` says, relaying progress to `on_chunk`; raises EngineError when it cannot."""
        base = self._models().get(job.model)
        if base is None:
            raise EngineError(ErrorCode.MODEL_NOT_FOUND, f"this worker does not serve '{job.model}'", "model")
        if base.sha256 != job.model_sha256:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"this worker's file for '{job.model}' is not the one the job names (by its SHA-256)",
                "model",
            )
        if self._lock.locked():
            raise EngineError(ErrorCode.OVERLOADED, "this worker is already training")
        async with self._lock:
            parameters = await asyncio.to_thread(parameter_count, base.path)
            now = capability(self.max_parameters)
            check_fits(parameters, self.max_parameters, now.memory_free)
            self.output_dir.mkdir(parents=True, exist_ok=True)
            work_dir = Path(tempfile.mkdtemp(prefix="train-", dir=self.output_dir))
            try:
                return await self._train(job, base, work_dir, cancel, on_chunk)
            finally:
                await asyncio.to_thread(shutil.rmtree, work_dir, True)

    async def _train(
        self,
        job: TrainJob,
        base: ModelConfig,
        work_dir: Path,
        cancel: threading.Event,
        on_chunk: ChunkSink,
    ) -> tuple[Usage, dict[str, Any]]:
        output = work_dir / "fine-tuned.gguf"
        spec = TrainingSpec(
            base=base.path,
            work_dir=work_dir,
            output=output,
            training=job.training,
            validation=job.validation,
            n_epochs=job.n_epochs,
            learning_rate=job.learning_rate,
            seed=job.seed,
            n_ctx=job.n_ctx,
            threads=self.threads,
        )
        spec_file = work_dir / "spec.json"
        spec_file.write_text(spec.model_dump_json())
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "workerbee.trainer",
            str(spec_file),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        log.info("training %s on %d chats (process %d)", job.output_model, len(job.training), process.pid)
        stderr_tail = asyncio.create_task(_tail(process))
        done: dict[str, Any] | None = None
        error: str | None = None
        try:
            assert process.stdout is not None
            async with asyncio.timeout(None) as deadline:
                loop = asyncio.get_running_loop()
                while True:
                    deadline.reschedule(loop.time() + SILENCE_TIMEOUT)
                    line = await _next_line(process.stdout, cancel)
                    if line is None:
                        break
                    event = json.loads(line)
                    if event.get("type") == "done":
                        done = event
                    elif event.get("type") == "error":
                        error = str(event.get("message", "training failed"))
                    else:
                        progress = TrainingEvent.model_validate(event)
                        await on_chunk(progress.model_dump(mode="json", exclude_none=True), 0)
            if cancel.is_set():
                process.kill()  # no grace: the process holds nothing worth keeping
            await process.wait()
        except TimeoutError:
            error = f"the training process said nothing for {SILENCE_TIMEOUT:g} s"
        finally:
            if process.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                await process.wait()
            tail = await stderr_tail
        if cancel.is_set():
            raise Cancelled()
        if done is None or process.returncode != 0:
            why = error or f"the training process ended with status {process.returncode}: {tail}"
            raise EngineError(ErrorCode.INTERNAL_ERROR, f"training failed: {why}"[:4000])
        digest = await asyncio.to_thread(model_sha256, [output])
        final = self.output_dir / f"{digest}.gguf"
        output.replace(final)
        size = final.stat().st_size
        config = ModelConfig(
            id=job.output_model, path=final, n_ctx=base.n_ctx, size_bytes=size, sha256=digest
        )
        trained_model(final).write_text(
            TrainedModel(
                id=job.output_model, base=job.model, n_ctx=base.n_ctx, sha256=digest
            ).model_dump_json()
        )
        if self._upload is not None:
            await on_chunk({"type": "message", "message": "Uploading the fine-tuned model to the queen."}, 0)
            try:
                await self._upload(final, digest)
            except Exception as exc:  # the worker still has it and serves it: say so, do not fail the job
                log.warning("could not upload %s to the queen: %s", final, exc)
                message = f"Could not upload the model to the queen ({exc.__class__.__name__})."
                await on_chunk({"type": "message", "message": message[:1000]}, 0)
        await self._serve(config)
        trained = int(done["trained_tokens"])
        report = TrainingReport(trained_tokens=trained, sha256=digest, size_bytes=size)
        usage = Usage(prompt_tokens=trained, completion_tokens=0, total_tokens=trained)
        return usage, report.model_dump(mode="json")


async def _next_line(stream: asyncio.StreamReader, cancel: threading.Event) -> str | None:
    """The trainer's next line; None at its end or once the job is cancelled."""
    while not cancel.is_set():
        try:
            async with asyncio.timeout(0.25):
                line = await stream.readline()
        except TimeoutError:
            continue
        if not line:
            return None
        text = line.decode(errors="replace").strip()
        if text.startswith("{"):
            return text
    return None


async def _tail(process: asyncio.subprocess.Process, keep: int = 2000) -> str:
    """The last `keep` characters the trainer wrote to stderr (llama.cpp's assert message, if any)."""
    assert process.stderr is not None
    tail = b""
    while chunk := await process.stderr.read(65536):
        tail = (tail + chunk)[-keep:]
    return tail.decode(errors="replace").strip()
