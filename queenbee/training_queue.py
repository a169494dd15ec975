"""Fine-tuning jobs from `validating_files` to `succeeded`, `failed` or `cancelled`, on the hive's workers.

One task of the queen's (`TrainingQueue.run`) works through the stored jobs, oldest first:
- `validating_files`: the files are read and checked again (one may have been deleted), then `queued`;
- `queued`: the job goes to a worker that registered `training` (workerbee --train), serves the base
  model with the same file (by SHA-256) and is idle; every slot of it is taken for the job, so no
  inference reaches it while it trains. A job no worker can take stays `queued`, with an event
  saying why (once for every new reason);
- `running`: the worker's progress becomes the job's events; its Result ends the job `succeeded`,
  with `fine_tuned_model` served by that worker from then on (it registers again with it) and the
  trained tokens in the usage ledger, credited to the worker and charged to the key. A worker lost
  mid-job puts the job back in the queue, up to `fine_tuning_attempts` workers, then `failed`.

A cancelled job is cancelled on its worker, which kills the training process. After a restart of the
queen, jobs that were running are queued again.

Which fine-tuned models exist and whose they are is `FineTunedModels`: a model belongs to the key that
trained it, and every other key is told it does not exist.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Final

from pydantic import ValidationError

from protocol import Chunk, ErrorCode, Job, JobError, LoadModelJob, Result, TrainJob, encode
from protocol.training import TRAINING_EVENT, TRAINING_REPORT
from queenbee.errors import QueenError
from queenbee.hive import Hive
from queenbee.model_files import model_path
from queenbee.observer import RequestObserver, RequestRecord
from queenbee.settings import QueenSettings
from queenbee.training_data import TrainingDataError, parse_chat_jsonl
from queenbee.tuning_store import TuningStore
from queenbee.worker_session import BufferOverflow, RequestStream, WorkerGone, WorkerSession

log = logging.getLogger("queenbee.training_queue")

SILENCE_TIMEOUT: Final = 1800.0
"""Seconds a training worker may send nothing (a step, a conversion) before it counts as lost."""

LOAD_TIMEOUT: Final = 120.0
"""Seconds a request for a fine-tuned model nobody serves waits for a worker to fetch and serve it."""

TICK_SECONDS: Final = 1.0
"""How often queued jobs look again for a worker when nothing else wakes them (workers come and go)."""

FINE_TUNING_PATH: Final = "/v1/fine_tuning/jobs"
"""The path training work is recorded under in the usage ledger."""

INTERNAL: Final = "_queen"
"""The key of a stored job object that holds the queen's own bookkeeping; never shown to clients."""


def owner_tag(owner: str | None) -> str:
    """The owner part of a fine-tuned model's name: the key id (no colons), or `hive` on an open queen."""
    return "hive" if owner is None else owner.replace(":", "-")


def fine_tuned_name(base: str, owner: str | None, suffix: str | None, job_id: str) -> str:
    """`ft:<base>:<owner>:<suffix>:<id>`, as OpenAI names fine-tuned models."""
    return f"ft:{base}:{owner_tag(owner)}:{suffix or ''}:{job_id.removeprefix('ftjob-')[:8]}"


def public(job: dict[str, Any]) -> dict[str, Any]:
    """A stored job as clients see it (without the queen's bookkeeping)."""
    return {key: value for key, value in job.items() if key != INTERNAL}


def new_event(
    message: str, *, level: str = "info", kind: str = "message", data: Any = None
) -> dict[str, Any]:
    """A `fine_tuning.job.event` object."""
    return {
        "id": "ftevent-" + uuid.uuid4().hex[:24],
        "object": "fine_tuning.job.event",
        "created_at": int(time.time()),
        "level": level,
        "message": message,
        "data": data,
        "type": kind,
    }


@dataclass(frozen=True)
class FineTuned:
    """A fine-tuned model: whose it is, what it was trained from, and its file's hash (if known)."""

    owner: str | None
    base: str | None = None
    sha256: str | None = None
    kept: bool = False
    """Whether the queen holds its file (a --train worker can fetch it when nobody serves it)."""


class FineTunedModels:
    """Every fine-tuned model that succeeded, and the key it belongs to."""

    def __init__(self) -> None:
        self._models: dict[str, FineTuned] = {}

    def add(
        self,
        model: str,
        owner: str | None,
        base: str | None = None,
        sha256: str | None = None,
        *,
        kept: bool = False,
    ) -> None:
        """Record a fine-tuned model as `owner`'s."""
        self._models[model] = FineTuned(owner, base, sha256, kept)

    def kept(self, owner: str | None) -> list[str]:
        """`owner`'s fine-tuned models whose file the queen holds: usable even when nobody serves them."""
        return [model for model, known in self._models.items() if known.owner == owner and known.kept]

    def get(self, model: str) -> FineTuned | None:
        """What is known of a fine-tuned model, or None."""
        return self._models.get(model)

    def visible(self, model: str, owner: str | None) -> bool:
        """Whether the key `owner` may see and use `model` (any model that is not a fine-tuned one)."""
        if not model.startswith("ft:"):
            return True
        known = self._models.get(model)
        return known is not None and known.owner == owner


@dataclass
class _Running:
    """A job on a worker, and the slots it holds there."""

    worker: WorkerSession
    request_id: str
    streams: list[RequestStream]
    task: asyncio.Task[None] | None = None
    cancelled: bool = False


@dataclass
class _Waiting:
    """Why a queued job waits, as last told in its events."""

    reasons: dict[str, str] = field(default_factory=dict)


class TrainingQueue:
    """Assigns fine-tuning jobs to training workers and follows them to their end."""

    def __init__(
        self,
        hive: Hive,
        store: TuningStore,
        models: FineTunedModels,
        observer: RequestObserver,
        settings: QueenSettings,
    ) -> None:
        self.hive = hive
        self.store = store
        self.models = models
        self.observer = observer
        self.settings = settings
        self._wake = asyncio.Event()
        self._running: dict[str, _Running] = {}
        self._waiting = _Waiting()
        self._tasks: set[asyncio.Task[None]] = set()
        self._loads: dict[str, asyncio.Task[None]] = {}

    async def load(self) -> None:
        """Learn the fine-tuned models that exist, and queue again the jobs a restart interrupted."""
        for owner, job in await self.store.jobs_with_status("succeeded"):
            if job.get("fine_tuned_model"):
                sha256 = job.get(INTERNAL, {}).get("result_sha256")
                kept = sha256 is not None and await asyncio.to_thread(
                    model_path(self.settings, sha256).is_file
                )
                self.models.add(job["fine_tuned_model"], owner, job["model"], sha256, kept=kept)
        for owner, job in await self.store.jobs_with_status("running"):
            started_by = job.get(INTERNAL, {}).get("replica")
            mine = self.settings.replica_id is not None and started_by == self.settings.replica_id
            if self.settings.redis_url is not None and not mine:
                # Another replica's job (or one started under a replica id that is not this one's): that
                # replica runs it, or requeues it when it restarts under its --replica-id.
                continue
            job["status"] = "queued"
            if await self.store.claim_job(owner, job, expected="running"):
                await self.store.add_event(
                    job["id"], new_event("The queen restarted; the job is queued again.")
                )

    def wake(self) -> None:
        """Look at the queue now (a job was created or cancelled, a worker left)."""
        self._wake.set()

    def running(self, job_id: str) -> bool:
        """Whether the job is on a worker now."""
        return job_id in self._running

    def running_jobs(self) -> int:
        """Jobs on workers now (uploads of results are taken only while there are some)."""
        return len(self._running)

    async def run(self) -> None:
        """Work through the queue until cancelled (the queen's lifespan owns this task)."""
        try:
            while True:
                self._wake.clear()
                try:
                    await self._tick()
                except Exception:
                    log.exception("the fine-tuning queue failed a round; trying again")
                try:
                    async with asyncio.timeout(TICK_SECONDS):
                        await self._wake.wait()
                except TimeoutError:
                    pass
        finally:
            for running in list(self._running.values()):
                if running.task is not None:
                    running.task.cancel()

    async def serve(self, model: str) -> None:
        """Have a --train worker serve a fine-tuned model no connected worker serves, from the queen's copy.

        Waits (up to LOAD_TIMEOUT) until some worker serves it; returns without one when none can (no
        copy, no training worker with the base model): the caller then finds nobody serving it.
        """
        if self.hive.serving(model):
            return
        task = self._loads.get(model)
        if task is None:
            task = asyncio.create_task(self._load(model))
            self._loads[model] = task
            task.add_done_callback(lambda _: self._loads.pop(model, None))
        try:
            async with asyncio.timeout(LOAD_TIMEOUT):
                await asyncio.shield(task)
        except TimeoutError:
            log.warning("no worker served %s within %g s of asking", model, LOAD_TIMEOUT)

    async def _load(self, model: str) -> None:
        known = self.models.get(model)
        if known is None or known.base is None or known.sha256 is None:
            return
        if not await asyncio.to_thread(model_path(self.settings, known.sha256).is_file):
            return
        untrained = frozenset(
            worker.id for worker in self.hive.serving(known.base) if worker.registration.training is None
        )
        if len(untrained) == len(self.hive.serving(known.base)):
            return
        request_id = f"load-{uuid.uuid4().hex[:16]}"
        try:
            worker, stream = await self.hive.acquire(known.base, request_id, exclude=untrained)
        except QueenError as exc:
            log.info("no worker could take %s: %s", model, exc.message)
            return
        job = Job(
            request_id=request_id, request=LoadModelJob(model=model, base=known.base, sha256=known.sha256)
        )
        await worker.send_job(job)
        try:
            event = await stream.next(LOAD_TIMEOUT)
        except TimeoutError:
            worker.cancel(request_id)
            return
        if not isinstance(event, Result):
            log.warning("worker %s did not load %s: %s", worker.id, model, event)
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + LOAD_TIMEOUT
        # The worker registers again with the model; the hive has no event for a model arriving.
        while not self.hive.serving(model) and loop.time() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)

    async def cancel(self, owner: str | None, job: dict[str, Any]) -> dict[str, Any]:
        """Cancel a job that has not ended: on its worker if it runs there. Returns the job as stored."""
        job["status"] = "cancelled"
        job["finished_at"] = int(time.time())
        await self.store.put_job(owner, job)
        await self.store.add_event(job["id"], new_event("The job was cancelled."))
        running = self._running.get(job["id"])
        if running is not None:
            running.cancelled = True
            running.worker.cancel(running.request_id)
        self.wake()
        return job

    async def _tick(self) -> None:
        for owner, job in await self.store.jobs_with_status("validating_files", "queued"):
            if job["id"] in self._running:
                continue
            if job["status"] == "validating_files":
                await self._validate(owner, job)
            else:
                await self._try_start(owner, job)

    async def _read_chats(self, owner: str | None, file_id: str | None) -> list[list[dict[str, Any]]]:
        if file_id is None:
            return []
        stored = await self.store.get_file(owner, file_id)
        if stored is None:
            raise TrainingDataError(f"the file {file_id} no longer exists")
        return await asyncio.to_thread(parse_chat_jsonl, stored.content)

    async def _validate(self, owner: str | None, job: dict[str, Any]) -> None:
        try:
            await self._read_chats(owner, job["training_file"])
            await self._read_chats(owner, job.get("validation_file"))
        except TrainingDataError as exc:
            await self._fail(owner, job, "invalid_file", f"A file of the job cannot be used: {exc}")
            return
        job["status"] = "queued"
        await self.store.put_job(owner, job)
        await self.store.add_event(job["id"], new_event("Files validated, moving job to queued state."))

    def _choose(self, job: dict[str, Any]) -> tuple[WorkerSession | None, str]:
        """The worker to train on, or None and why there is none."""
        model: str = job["model"]
        internal = job[INTERNAL]
        capable = [
            worker
            for worker in self.hive.serving(model)
            if worker.registration.training is not None and not worker.closed and not worker.draining
        ]
        if not capable:
            return None, f"No worker that can train (workerbee --train) serves '{model}' now."
        pinned = internal.get("base_sha256")
        same = [
            worker
            for worker in capable
            if worker.model_hashes.get(model) is not None
            and (pinned is None or worker.model_hashes.get(model) == pinned)
        ]
        if not same:
            return None, f"No training worker holds the file of '{model}' this job began on."
        idle = [worker for worker in same if worker.in_flight == 0]
        if not idle:
            return None, f"Every worker that can train '{model}' is busy; the job waits for one to be idle."
        return max(idle, key=lambda worker: worker.registration.training.memory_free), ""  # type: ignore[union-attr]

    async def _try_start(self, owner: str | None, job: dict[str, Any]) -> None:
        worker, why = self._choose(job)
        if worker is None:
            if self._waiting.reasons.get(job["id"]) != why:
                self._waiting.reasons[job["id"]] = why
                await self.store.add_event(job["id"], new_event(why, level="warn"))
            return
        self._waiting.reasons.pop(job["id"], None)
        internal = job[INTERNAL]
        try:
            training = await self._read_chats(owner, job["training_file"])
            validation = await self._read_chats(owner, job.get("validation_file"))
        except TrainingDataError as exc:
            await self._fail(owner, job, "invalid_file", f"A file of the job cannot be used: {exc}")
            return
        current = await self.store.get_job(owner, job["id"])
        if current is None or current["status"] != "queued" or worker.in_flight or worker.free_slots == 0:
            return  # cancelled, or the worker taken, while the files were read: the next round decides
        base_sha256 = str(internal.get("base_sha256") or worker.model_hashes[job["model"]])
        attempt = int(internal.get("attempts", 0)) + 1
        request_id = f"{job['id']}/{attempt}"
        hyper = job["hyperparameters"]
        frame = Job(
            request_id=request_id,
            request=TrainJob(
                model=job["model"],
                model_sha256=base_sha256,
                output_model=internal["output_model"],
                training=training,
                validation=validation,
                n_epochs=hyper["n_epochs"],
                learning_rate=self.settings.fine_tuning_learning_rate * hyper["learning_rate_multiplier"],
                seed=job["seed"],
                n_ctx=self.settings.fine_tuning_window,
            ),
        )
        text = encode(frame)
        if len(text.encode()) > worker.max_job_bytes:
            await self._fail(
                owner,
                job,
                "files_too_large",
                f"The job's files are {len(text.encode())} bytes as a job, more than the worker accepts "
                f"({worker.max_job_bytes} bytes).",
            )
            return
        internal.update(
            base_sha256=base_sha256, attempts=attempt, worker=worker.id, replica=self.hive.replica_id
        )
        job["status"] = "running"
        if not await self.store.claim_job(owner, job, expected="queued"):
            # Cancelled meanwhile, or started by another replica sharing the database.
            internal.update(attempts=attempt - 1)
            job["status"] = "queued"
            return
        if worker.in_flight or worker.free_slots == 0:  # taken while the claim was written
            job["status"] = "queued"
            internal.update(attempts=attempt - 1)
            await self.store.claim_job(owner, job, expected="running")
            return
        streams = self.hive.reserve_all(worker, request_id, job["model"])
        await self.store.add_event(job["id"], new_event(f"Fine-tuning job started on worker {worker.id}."))
        running = _Running(worker, request_id, streams)
        self._running[job["id"]] = running
        running.task = asyncio.create_task(self._follow(owner, job, running, text))

    async def _follow(self, owner: str | None, job: dict[str, Any], running: _Running, text: str) -> None:
        """Relay one run's progress and settle how it ended."""
        worker = running.worker
        stream = running.streams[0]
        started = time.time()
        try:
            await worker.send_job(text, running.request_id)
            while True:
                try:
                    event = await stream.next(SILENCE_TIMEOUT)
                except TimeoutError:
                    worker.cancel(running.request_id)
                    await self._lost(
                        owner, job, running, f"worker {worker.id} sent nothing for {SILENCE_TIMEOUT:g} s"
                    )
                    return
                if isinstance(event, Chunk):
                    await self._progress(job, event)
                elif isinstance(event, Result):
                    await self._succeeded(owner, job, running, event, started)
                    return
                elif isinstance(event, JobError):
                    if running.cancelled or event.code == ErrorCode.CANCELLED:
                        await self._cancelled(owner, job)
                    else:
                        await self._fail(owner, job, f"training_{event.code.value}", event.message)
                    return
                elif isinstance(event, WorkerGone | BufferOverflow):
                    if running.cancelled:
                        await self._cancelled(owner, job)
                    else:
                        await self._lost(owner, job, running, event.reason)
                    return
        except Exception:
            log.exception("fine-tuning job %s: following its worker failed", job["id"])
            await self._fail(owner, job, "internal_error", "The queen lost track of the job.")
        finally:
            for hold in running.streams[1:]:
                worker.release(hold.request_id)
            self._running.pop(job["id"], None)
            self.wake()

    async def _progress(self, job: dict[str, Any], chunk: Chunk) -> None:
        try:
            progress = TRAINING_EVENT.validate_python(chunk.chunk)
        except ValidationError:
            log.warning("fine-tuning job %s: the worker sent a progress event that is not one", job["id"])
            return
        if progress.type == "message":
            await self.store.add_event(job["id"], new_event(progress.message))
            return
        data = {
            "step": progress.step,
            "total_steps": progress.total_steps,
            "train_loss": progress.train_loss,
            "valid_loss": progress.valid_loss,
            "train_mean_token_accuracy": None,
        }
        loss = f"{progress.train_loss:.4f}" if progress.train_loss is not None else "?"
        message = f"Step {progress.step}/{progress.total_steps}: training loss={loss}"
        if progress.valid_loss is not None:
            message += f", validation loss={progress.valid_loss:.4f}"
        await self.store.add_event(job["id"], new_event(message, kind="metrics", data=data))

    async def _current(self, owner: str | None, job: dict[str, Any]) -> dict[str, Any]:
        """The job as stored now (a cancel may have changed it while it ran)."""
        return await self.store.get_job(owner, job["id"]) or job

    async def _succeeded(
        self, owner: str | None, job: dict[str, Any], running: _Running, result: Result, started: float
    ) -> None:
        try:
            report = TRAINING_REPORT.validate_python(result.response or {})
        except ValidationError:
            await self._fail(owner, job, "training_internal_error", "The worker's report is not one.")
            return
        model = job[INTERNAL]["output_model"]
        job = await self._current(owner, job)
        if job["status"] == "cancelled":
            return
        job.update(
            status="succeeded",
            fine_tuned_model=model,
            trained_tokens=report.trained_tokens,
            finished_at=int(time.time()),
        )
        job[INTERNAL]["result_sha256"] = report.sha256
        kept = await asyncio.to_thread(model_path(self.settings, report.sha256).is_file)
        self.models.add(model, owner, job["model"], report.sha256, kept=kept)
        await self.store.put_job(owner, job)
        await self.store.add_event(job["id"], new_event(f"New fine-tuned model created: {model}"))
        if not kept:
            await self.store.add_event(
                job["id"],
                new_event("The queen holds no copy of the model: only its worker has it.", level="warn"),
            )
        await self.store.add_event(job["id"], new_event("The job has successfully completed."))
        await self.observer.request_finished(
            RequestRecord(
                request_id=job["id"],
                path=FINE_TUNING_PATH,
                model=model,
                started_at=started,
                outcome="success",
                status=200,
                api_key_id=owner,
                worker_id=running.worker.id,
                ln_url=running.worker.registration.ln_url or None,
                prompt_tokens=report.trained_tokens,
                duration=time.time() - started,
                attempts=int(job[INTERNAL].get("attempts", 1)),
            )
        )
        log.info("fine-tuning job %s succeeded: %s on worker %s", job["id"], model, running.worker.id)

    async def _cancelled(self, owner: str | None, job: dict[str, Any]) -> None:
        job = await self._current(owner, job)
        if job["status"] != "cancelled":
            job.update(status="cancelled", finished_at=int(time.time()))
            await self.store.put_job(owner, job)

    async def _lost(self, owner: str | None, job: dict[str, Any], running: _Running, reason: str) -> None:
        job = await self._current(owner, job)
        if job["status"] == "cancelled":
            return
        if self.hive.draining:
            # The queen is shutting down and closed the worker: not the worker's fault. The job stays
            # `running` in the store and is queued again, attempts unchanged, when the queen starts.
            return
        attempts = int(job[INTERNAL].get("attempts", 1))
        if attempts >= self.settings.fine_tuning_attempts:
            await self._fail(
                owner,
                job,
                "worker_lost",
                f"The job's worker was lost {attempts} times (the last: {reason}); the job has failed.",
            )
            return
        job["status"] = "queued"
        await self.store.put_job(owner, job)
        await self.store.add_event(
            job["id"],
            new_event(f"The job's worker was lost ({reason}); the job is queued again.", level="warn"),
        )

    async def _fail(self, owner: str | None, job: dict[str, Any], code: str, message: str) -> None:
        job = await self._current(owner, job)
        if job["status"] == "cancelled":
            return
        job.update(
            status="failed",
            finished_at=int(time.time()),
            error={"code": code, "message": message, "param": None},
        )
        await self.store.put_job(owner, job)
        await self.store.add_event(job["id"], new_event(f"The job failed: {message}", level="error"))
