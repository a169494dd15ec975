"""Fine-tuned GGUF files kept by the queen, named by their SHA-256: what training workers upload.

A training worker uploads its result (`PUT /worker/models/{sha256}`) before it reports the job done, so
the model outlives the worker that trained it; `GET /worker/models/{sha256}` hands it to a worker. Both
need the worker token when the queen has one. An upload is taken only while a fine-tuning job runs,
up to `--fine-tuning-max-model-bytes`, and kept only if its content has the SHA-256 its name says.

Files live in `models/` beside the queen's database; writing and hashing run off the event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from queenbee.auth import Secrets, bearer_token, worker_refusal
from queenbee.errors import AuthenticationError, InvalidRequest, NotFound, RequestTooLarge
from queenbee.ledger_db import data_dir
from queenbee.settings import QueenSettings

SHA256 = re.compile(r"[0-9a-f]{64}")


def models_dir(settings: QueenSettings) -> Path:
    """Where the queen keeps fine-tuned models: `models/` beside its database (or in its data directory)."""
    return data_dir(settings.db) / "models"


def model_path(settings: QueenSettings, sha256: str) -> Path:
    """The file of the model with this content hash (which may not exist)."""
    return models_dir(settings) / f"{sha256}.gguf"


def _check_worker(request: Request) -> str:
    secrets: Secrets = request.state.secrets
    refusal = worker_refusal(secrets, bearer_token(request.headers.get("authorization")) or "")
    if refusal is not None:
        raise AuthenticationError(f"This endpoint is for workers: {refusal}.")
    sha256: str = request.path_params["sha256"]
    if SHA256.fullmatch(sha256) is None:
        raise InvalidRequest("A model is named by its SHA-256: 64 lowercase hex digits.", param="sha256")
    return sha256


async def upload_model(request: Request) -> Response:
    """PUT /worker/models/{sha256}: keep a training worker's result, if its content has that hash."""
    sha256 = _check_worker(request)
    settings: QueenSettings = request.state.settings
    if not request.state.training.running_jobs():
        raise InvalidRequest("No fine-tuning job is running: there is nothing to upload.", param="sha256")
    limit = settings.fine_tuning_max_model_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestTooLarge(f"The model exceeds {limit} bytes.")
    final = model_path(settings, sha256)
    if final.is_file():
        return JSONResponse({"sha256": sha256, "size_bytes": final.stat().st_size})
    final.parent.mkdir(parents=True, exist_ok=True)
    partial = final.with_name(f"{final.name}.{id(request):x}.part")
    hasher = hashlib.sha256()
    size = 0
    try:
        with partial.open("wb") as file:

            def keep(chunk: bytes) -> None:
                hasher.update(chunk)
                file.write(chunk)

            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise RequestTooLarge(f"The model exceeds {limit} bytes.")
                await asyncio.to_thread(keep, chunk)
        if hasher.hexdigest() != sha256:
            raise InvalidRequest("The upload's SHA-256 is not the one its name says.", param="sha256")
        await asyncio.to_thread(partial.replace, final)
    finally:
        partial.unlink(missing_ok=True)
    return JSONResponse({"sha256": sha256, "size_bytes": size})


async def download_model(request: Request) -> Response:
    """GET /worker/models/{sha256}: a fine-tuned model the queen keeps."""
    sha256 = _check_worker(request)
    path = model_path(request.state.settings, sha256)
    if not path.is_file():
        raise NotFound(f"The queen keeps no model with the SHA-256 {sha256}.", param="sha256")
    return FileResponse(path, media_type="application/octet-stream")
