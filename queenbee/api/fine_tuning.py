"""OpenAI's fine-tuning jobs API: create, list, retrieve, cancel, events and checkpoints.

A job is validated here (the base model, the files, the hyperparameters) and stored as
`validating_files`; the training queue (queenbee/training_queue.py) takes it from there. Jobs, like
files, belong to the API key that created them: to every other key they do not exist (404).

The hyperparameters are OpenAI's, given at the top level or under `method.supervised`: `n_epochs`
(1 to 50, `auto` is 3), `learning_rate_multiplier` (of the queen's --fine-tuning-learning-rate, `auto`
is 1) and `batch_size` (1 or `auto`: one training window a step, the only size llama.cpp's training
takes). Checkpoints are not kept: the list is always empty.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from queenbee.api.files import PURPOSE
from queenbee.errors import InvalidRequest, NotFound
from queenbee.hive import Hive
from queenbee.openai_api import read_json
from queenbee.settings import QueenSettings
from queenbee.training_queue import INTERNAL, TrainingQueue, fine_tuned_name, new_event, owner_tag, public
from queenbee.tuning_store import TuningStore

DEFAULT_EPOCHS = 3
ENDED = frozenset({"succeeded", "failed", "cancelled"})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Hyperparameters(_Strict):
    """OpenAI's supervised hyperparameters; `auto` lets the queen choose."""

    n_epochs: Literal["auto"] | int = Field(default="auto")
    batch_size: Literal["auto"] | int = Field(default="auto")
    learning_rate_multiplier: Literal["auto"] | float = Field(default="auto")


class Supervised(_Strict):
    hyperparameters: Hyperparameters | None = None


class Method(_Strict):
    type: Literal["supervised"]
    supervised: Supervised | None = None


class CreateJob(_Strict):
    """The body of POST /v1/fine_tuning/jobs."""

    model: str = Field(min_length=1, max_length=256)
    training_file: str = Field(min_length=1, max_length=128)
    validation_file: str | None = Field(default=None, min_length=1, max_length=128)
    suffix: str | None = Field(default=None, max_length=64, pattern=r"^[A-Za-z0-9_.-]*$")
    seed: int | None = Field(default=None, ge=0, lt=2**31)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = Field(default=None, max_length=16)
    integrations: list[dict[str, Any]] | None = None


def _owner(request: Request) -> str | None:
    owner: str | None = getattr(request.state, "api_key_id", None)
    return owner


def _parse(body: dict[str, Any]) -> CreateJob:
    try:
        return CreateJob.model_validate(body)
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        param = ".".join(str(part) for part in error["loc"] if not str(part)[:1].isupper()) or None
        if error["type"] == "extra_forbidden":
            raise InvalidRequest(f"Unrecognized request argument supplied: {param}", param=param) from None
        raise InvalidRequest(f"Invalid value for '{param}': {error['msg']}", param=param) from None


def _hyperparameters(body: CreateJob) -> dict[str, Any]:
    """The job's hyperparameters with `auto` resolved; a 400 naming the one out of range."""
    nested = body.method.supervised.hyperparameters if body.method and body.method.supervised else None
    if nested is not None and body.hyperparameters is not None:
        raise InvalidRequest(
            "Give the hyperparameters either at the top level or under 'method.supervised', not both.",
            param="hyperparameters",
        )
    given = nested or body.hyperparameters or Hyperparameters()
    prefix = "method.supervised.hyperparameters" if nested is not None else "hyperparameters"
    epochs = DEFAULT_EPOCHS if given.n_epochs == "auto" else given.n_epochs
    if not 1 <= epochs <= 50:
        raise InvalidRequest("'n_epochs' must be between 1 and 50.", param=f"{prefix}.n_epochs")
    multiplier = 1.0 if given.learning_rate_multiplier == "auto" else given.learning_rate_multiplier
    if not 0 < multiplier <= 10:
        raise InvalidRequest(
            "'learning_rate_multiplier' must be above 0 and at most 10.",
            param=f"{prefix}.learning_rate_multiplier",
        )
    if given.batch_size not in ("auto", 1):
        raise InvalidRequest(
            "'batch_size' must be 1 or 'auto': a training step on this hive is one window of tokens.",
            param=f"{prefix}.batch_size",
        )
    return {"n_epochs": epochs, "batch_size": 1, "learning_rate_multiplier": multiplier}


async def _check_file(store: TuningStore, owner: str | None, file_id: str, param: str) -> None:
    stored = await store.get_file(owner, file_id)
    if stored is None:
        raise InvalidRequest(f"The file '{file_id}' does not exist.", param=param, code="invalid_file")
    if stored.purpose != PURPOSE:
        raise InvalidRequest(
            f"The file '{file_id}' was not uploaded for '{PURPOSE}'.", param=param, code="invalid_file"
        )


async def create_job(request: Request) -> Response:
    """POST /v1/fine_tuning/jobs."""
    settings: QueenSettings = request.state.settings
    store: TuningStore = request.state.tuning
    queue: TrainingQueue = request.state.training
    hive: Hive = request.state.hive
    owner = _owner(request)
    body = _parse(await read_json(request, settings))
    if body.integrations:
        raise InvalidRequest("Integrations are not supported on this hive.", param="integrations")
    if body.model.startswith("ft:"):
        raise InvalidRequest(
            "Fine-tuning a fine-tuned model again is not supported on this hive.",
            param="model",
            code="model_not_available",
        )
    if not hive.serving(body.model):
        raise InvalidRequest(
            f"The model '{body.model}' is not available for fine-tuning: no worker serves it.",
            param="model",
            code="model_not_available",
        )
    hyperparameters = _hyperparameters(body)
    await _check_file(store, owner, body.training_file, "training_file")
    if body.validation_file is not None:
        await _check_file(store, owner, body.validation_file, "validation_file")
    job_id = "ftjob-" + uuid.uuid4().hex[:24]
    seed = body.seed if body.seed is not None else uuid.uuid4().int % 2**31
    job: dict[str, Any] = {
        "id": job_id,
        "object": "fine_tuning.job",
        "created_at": int(time.time()),
        "error": None,
        "fine_tuned_model": None,
        "finished_at": None,
        "hyperparameters": hyperparameters,
        "model": body.model,
        "organization_id": owner_tag(owner),
        "result_files": [],
        "seed": seed,
        "status": "validating_files",
        "trained_tokens": None,
        "training_file": body.training_file,
        "validation_file": body.validation_file,
        "estimated_finish": None,
        "integrations": None,
        "metadata": body.metadata,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters}},
        "user_provided_suffix": body.suffix,
        INTERNAL: {"output_model": fine_tuned_name(body.model, owner, body.suffix, job_id), "attempts": 0},
    }
    await store.put_job(owner, job)
    await store.add_event(job_id, new_event(f"Created fine-tuning job: {job_id}"))
    await store.add_event(job_id, new_event(f"Validating training file: {body.training_file}"))
    queue.wake()
    return JSONResponse(public(job))


def _limit(request: Request, default: int = 20, high: int = 100) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not raw.isdigit() or not 1 <= int(raw) <= high:
        raise InvalidRequest(f"'limit' must be an integer from 1 to {high}.", param="limit")
    return int(raw)


def _list(data: list[dict[str, Any]], has_more: bool) -> Response:
    return JSONResponse({"object": "list", "data": data, "has_more": has_more})


async def list_jobs(request: Request) -> Response:
    """GET /v1/fine_tuning/jobs: the caller's jobs, newest first."""
    store: TuningStore = request.state.tuning
    page = await store.list_jobs(
        _owner(request), limit=_limit(request), after=request.query_params.get("after")
    )
    return _list([public(job) for job in page.data], page.has_more)


async def _job(request: Request) -> dict[str, Any]:
    store: TuningStore = request.state.tuning
    job_id: str = request.path_params["job_id"]
    job = await store.get_job(_owner(request), job_id)
    if job is None:
        raise NotFound(f"No fine-tuning job with the id '{job_id}'.", param="fine_tuning_job_id")
    return job


async def retrieve_job(request: Request) -> Response:
    """GET /v1/fine_tuning/jobs/{job_id}."""
    return JSONResponse(public(await _job(request)))


async def cancel_job(request: Request) -> Response:
    """POST /v1/fine_tuning/jobs/{job_id}/cancel: stops the training process if it runs."""
    queue: TrainingQueue = request.state.training
    job = await _job(request)
    if job["status"] in ENDED:
        raise InvalidRequest(
            f"The job has already ended ({job['status']}); it cannot be cancelled.",
            param="fine_tuning_job_id",
            code="job_ended",
        )
    return JSONResponse(public(await queue.cancel(_owner(request), job)))


async def list_events(request: Request) -> Response:
    """GET /v1/fine_tuning/jobs/{job_id}/events: newest first, messages and per-step metrics."""
    store: TuningStore = request.state.tuning
    job = await _job(request)
    page = await store.list_events(job["id"], limit=_limit(request), after=request.query_params.get("after"))
    return _list(page.data, page.has_more)


async def list_checkpoints(request: Request) -> Response:
    """GET /v1/fine_tuning/jobs/{job_id}/checkpoints: none are kept, so always an empty list."""
    await _job(request)
    return JSONResponse({"object": "list", "data": [], "has_more": False, "first_id": None, "last_id": None})
