"""Fine-tuning jobs through the openai SDK against a real queen, with scripted workers over real websockets:
validation, the queue's choices, a lost worker, cancellation, success and who may see the result."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import httpx
import openai
import pytest
from fake_worker import FakeWorker, answer
from pydantic import SecretStr
from servers import QueenServer, eventually

from protocol import Chunk, Job, LoadModelJob, Register, Result, TrainingCapability, TrainJob, Usage
from protocol.training import TrainingEvent, TrainingReport
from queenbee.auth import key_id
from queenbee.settings import QueenSettings
from workerbee.training import upload_url

KEY = "sk-tuning-owner"
OTHER_KEY = "sk-tuning-other"
SHA = "ab" * 32
CHATS = "".join(
    json.dumps(
        {"messages": [{"role": "user", "content": f"Q{n}"}, {"role": "assistant", "content": f"A{n}"}]}
    )
    + "\n"
    for n in range(3)
)


class TrainingWorker(FakeWorker):
    """A scripted worker that registers as one started with --train."""

    def registration(self) -> Register:
        """The fake's registration, with a training capability."""
        capability = TrainingCapability(methods=["full"], max_parameters=10**9, memory_free=4096)
        return super().registration().model_copy(update={"training": capability})


@pytest.fixture
def queen_settings(tmp_path: Path) -> QueenSettings:
    """Two keys, two attempts per job, a queen database of the test's own."""
    return QueenSettings(
        db=tmp_path / "queen.db", api_key=[KEY, OTHER_KEY], queue_timeout=2.0, fine_tuning_attempts=2
    )


@pytest.fixture
async def sdk(queen: QueenServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The real openai SDK with the owner's key."""
    async with openai.AsyncOpenAI(base_url=queen.openai_url, api_key=KEY, max_retries=0) as client:
        yield client


@pytest.fixture
async def other(queen: QueenServer) -> AsyncIterator[openai.AsyncOpenAI]:
    """The real openai SDK with another key."""
    async with openai.AsyncOpenAI(base_url=queen.openai_url, api_key=OTHER_KEY, max_retries=0) as client:
        yield client


async def _upload(sdk: openai.AsyncOpenAI) -> str:
    return (await sdk.files.create(file=("chats.jsonl", CHATS.encode()), purpose="fine-tune")).id


async def _until(check: Callable[[], object], sdk: openai.AsyncOpenAI, job_id: str, status: str) -> None:
    async def reached() -> bool:
        return (await sdk.fine_tuning.jobs.retrieve(job_id)).status == status

    for _ in range(200):
        if await reached():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"job {job_id} never reached {status}; {check()}")


async def _messages(sdk: openai.AsyncOpenAI, job_id: str) -> list[str]:
    """The job's event messages, oldest first."""
    events = await sdk.fine_tuning.jobs.list_events(job_id, limit=100)
    return [event.message for event in reversed(events.data)]


async def test_a_bad_job_is_a_400_naming_the_parameter(
    queen: QueenServer, sdk: openai.AsyncOpenAI, other: openai.AsyncOpenAI
) -> None:
    """Unknown or fine-tuned bases, missing or foreign files and out-of-range hyperparameters are refused."""
    worker = await FakeWorker(queen.worker_url, sha256=SHA).connect()
    mine = await _upload(sdk)
    theirs = await _upload(other)
    cases: list[tuple[dict[str, object], str, str | None]] = [
        ({"model": "no-such-model", "training_file": mine}, "model", "model_not_available"),
        ({"model": "ft:fake-model:x::1234", "training_file": mine}, "model", "model_not_available"),
        ({"model": "fake-model", "training_file": "file-nope"}, "training_file", "invalid_file"),
        ({"model": "fake-model", "training_file": theirs}, "training_file", "invalid_file"),
        ({"model": "fake-model", "training_file": mine, "validation_file": theirs}, "validation_file", None),
        (
            {"model": "fake-model", "training_file": mine, "hyperparameters": {"batch_size": 8}},
            "hyperparameters.batch_size",
            None,
        ),
        (
            {"model": "fake-model", "training_file": mine, "hyperparameters": {"n_epochs": 0}},
            "hyperparameters.n_epochs",
            None,
        ),
        (
            {
                "model": "fake-model",
                "training_file": mine,
                "method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 2}}},
                "hyperparameters": {"n_epochs": 2},
            },
            "hyperparameters",
            None,
        ),
        ({"model": "fake-model", "training_file": mine, "suffix": "has:colon"}, "suffix", None),
        ({"model": "fake-model", "training_file": mine, "epochs": 3}, "epochs", None),
    ]
    for body, param, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            await sdk.post("/fine_tuning/jobs", body=body, cast_to=object)
        error = caught.value.body
        assert isinstance(error, dict)
        assert error["param"] == param, body
        if code is not None:
            assert error["code"] == code, body
    assert (await sdk.fine_tuning.jobs.list()).data == []
    await worker.close()


async def test_no_capable_worker_keeps_the_job_queued_with_an_event(
    queen: QueenServer, sdk: openai.AsyncOpenAI, other: openai.AsyncOpenAI
) -> None:
    """A worker without --train never gets the job: it stays queued and an event says why, once."""
    worker = await FakeWorker(queen.worker_url, sha256=SHA).connect()
    job = await sdk.fine_tuning.jobs.create(model="fake-model", training_file=await _upload(sdk), seed=3)
    assert (job.status, job.seed, job.hyperparameters.n_epochs) == ("validating_files", 3, 3)
    await _until(lambda: None, sdk, job.id, "queued")

    async def warned() -> list[str]:
        return [text for text in await _messages(sdk, job.id) if "No worker that can train" in text]

    for _ in range(100):
        if await warned():
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(1.5)  # more than one round of the queue: the reason is told once, not every round
    assert len(await warned()) == 1
    assert worker.jobs == []
    assert (await sdk.fine_tuning.jobs.retrieve(job.id)).status == "queued"
    for call in (
        other.fine_tuning.jobs.retrieve,
        other.fine_tuning.jobs.list_events,
        other.fine_tuning.jobs.cancel,
    ):
        with pytest.raises(openai.NotFoundError):
            await call(job.id)
    cancelled = await sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    assert (await sdk.fine_tuning.jobs.checkpoints.list(job.id)).data == []
    await worker.close()


async def _lose(worker: FakeWorker, job: Job) -> None:
    """Say one thing about the training, then crash."""
    await worker.send(Chunk(request_id=job.request_id, chunk={"type": "message", "message": "Dequantizing."}))
    await worker.abort()


async def test_a_lost_worker_requeues_the_job_until_the_attempts_run_out(
    queen: QueenServer, sdk: openai.AsyncOpenAI
) -> None:
    """A worker lost mid-job puts it back in the queue; after --fine-tuning-attempts losses it fails."""
    first = await TrainingWorker(queen.worker_url, sha256=SHA, parallel=2, behaviour=_lose).connect()
    job = await sdk.fine_tuning.jobs.create(
        model="fake-model",
        training_file=await _upload(sdk),
        suffix="mine",
        seed=5,
        hyperparameters={"n_epochs": 2, "learning_rate_multiplier": 2},
    )
    await eventually(lambda: bool(first.jobs))
    train = first.jobs[0].request
    assert isinstance(train, TrainJob)
    assert (train.model, train.model_sha256, train.n_epochs, train.seed, train.n_ctx) == (
        "fake-model",
        SHA,
        2,
        5,
        256,
    )
    assert train.learning_rate == pytest.approx(2e-4)
    assert train.output_model == f"ft:fake-model:{key_id(KEY)}:mine:{job.id[6:14]}"
    assert train.training[0] == [{"role": "user", "content": "Q0"}, {"role": "assistant", "content": "A0"}]
    await _until(lambda: first.jobs, sdk, job.id, "queued")
    second = await TrainingWorker(queen.worker_url, sha256=SHA, behaviour=_lose).connect()
    await _until(lambda: second.jobs, sdk, job.id, "failed")
    failed = await sdk.fine_tuning.jobs.retrieve(job.id)
    assert failed.error is not None
    assert failed.error.code == "worker_lost"
    assert "2 times" in failed.error.message
    messages = await _messages(sdk, job.id)
    assert sum("Fine-tuning job started" in text for text in messages) == 2
    assert sum("queued again" in text for text in messages) == 1
    assert "Dequantizing." in messages
    assert failed.fine_tuned_model is None


TRAINED = b"GGUF" + bytes(range(256)) * 40
"""What the fake training worker made: its upload's content."""


async def _train(worker: FakeWorker, job: Job) -> None:
    """Report two steps, upload the result to the queen, and succeed."""
    for step, loss in ((1, 2.0), (2, 1.0)):
        event = TrainingEvent(
            type="metrics", step=step, total_steps=2, epoch=1, train_loss=loss, valid_loss=1.5
        )
        await worker.send(Chunk(request_id=job.request_id, chunk=event.model_dump(exclude_none=True)))
    digest = hashlib.sha256(TRAINED).hexdigest()
    async with httpx.AsyncClient() as client:
        uploaded = await client.put(upload_url(worker.url, digest), content=TRAINED)
    assert uploaded.status_code == 200, uploaded.text
    report = TrainingReport(trained_tokens=512, sha256=digest, size_bytes=len(TRAINED))
    usage = Usage(prompt_tokens=512, completion_tokens=0, total_tokens=512)
    await worker.send(Result(request_id=job.request_id, usage=usage, response=report.model_dump()))


async def test_a_finished_job_serves_its_model_to_its_owner_only(
    queen: QueenServer, sdk: openai.AsyncOpenAI, other: openai.AsyncOpenAI, queen_settings: QueenSettings
) -> None:
    """Success: metrics events, the ft: model for its key alone (listed, routed), the work in the ledger;
    the training worker took no inference while it trained (all its slots held)."""
    trainer = await TrainingWorker(
        queen.worker_url, sha256=SHA, parallel=2, behaviour=_train, ln_url="bee@example.com"
    ).connect()
    job = await sdk.fine_tuning.jobs.create(model="fake-model", training_file=await _upload(sdk))
    await _until(lambda: trainer.jobs, sdk, job.id, "succeeded")
    done = await sdk.fine_tuning.jobs.retrieve(job.id)
    model = done.fine_tuned_model
    assert model == f"ft:fake-model:{key_id(KEY)}::{job.id[6:14]}"
    assert done.trained_tokens == 512
    events = list(reversed((await sdk.fine_tuning.jobs.list_events(job.id, limit=100)).data))
    metrics = [event.data for event in events if event.type == "metrics"]
    assert metrics == [
        {
            "step": 1,
            "total_steps": 2,
            "train_loss": 2.0,
            "valid_loss": 1.5,
            "train_mean_token_accuracy": None,
        },
        {
            "step": 2,
            "total_steps": 2,
            "train_loss": 1.0,
            "valid_loss": 1.5,
            "train_mean_token_accuracy": None,
        },
    ]
    page = await sdk.fine_tuning.jobs.list_events(job.id, limit=2)
    assert page.has_more
    older = await sdk.fine_tuning.jobs.list_events(job.id, limit=100, after=page.data[-1].id)
    assert [event.id for event in older.data] == [event.id for event in reversed(events[:-2])]

    # The worker registers again, now serving the fine-tuned model too.
    await trainer.close()
    serving = await FakeWorker(
        queen.worker_url, sha256=SHA, models=("fake-model", model), behaviour=answer
    ).connect()
    assert model in [item.id for item in (await sdk.models.list()).data]
    assert model not in [item.id for item in (await other.models.list()).data]
    reply = await sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Hello there"
    with pytest.raises(openai.NotFoundError) as hidden:
        await other.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert hidden.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        await other.models.retrieve(model)
    await serving.close()
    async with httpx.AsyncClient() as client:
        kept = await client.get(upload_url(queen.worker_url, hashlib.sha256(TRAINED).hexdigest()))
    assert kept.content == TRAINED  # the queen has its own copy, by SHA-256
    with sqlite3.connect(queen_settings.db) as ledger:
        row = ledger.execute(
            "SELECT path, model, api_key_id, ln_url, prompt_tokens FROM usage WHERE request_id = ?", (job.id,)
        ).fetchone()
    assert row == ("/v1/fine_tuning/jobs", model, key_id(KEY), "bee@example.com", 512)


async def test_the_training_worker_takes_no_inference_while_it_trains(
    queen: QueenServer, sdk: openai.AsyncOpenAI
) -> None:
    """Every slot of the training worker is held: a chat request waits, then goes elsewhere or times out."""
    started = asyncio.Event()

    async def hang(worker: FakeWorker, job: Job) -> None:
        if isinstance(job.request, TrainJob):
            started.set()
            return
        await answer(worker, job)

    trainer = await TrainingWorker(queen.worker_url, sha256=SHA, parallel=4, behaviour=hang).connect()
    job = await sdk.fine_tuning.jobs.create(model="fake-model", training_file=await _upload(sdk))
    await asyncio.wait_for(started.wait(), 10)
    assert queen.hive.workers[trainer.worker_id].free_slots == 0
    with pytest.raises(openai.APIStatusError) as busy:
        await sdk.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": "Hi"}])
    assert busy.value.status_code == 503
    await sdk.fine_tuning.jobs.cancel(job.id)
    await eventually(lambda: bool(trainer.cancels))
    assert trainer.cancels == [f"{job.id}/1"]
    await trainer.close()


async def test_a_queen_restart_queues_running_jobs_again(queen_settings: QueenSettings) -> None:
    """Jobs that were running when the queen stopped are queued again when it starts, with an event."""
    started = asyncio.Event()

    async def hang(worker: FakeWorker, job: Job) -> None:
        started.set()

    # The queen's drain on shutdown waits for what holds a worker's slots, a training job too.
    queen_settings = queen_settings.model_copy(update={"shutdown_grace": 0.5})
    first = QueenServer(queen_settings).start()
    try:
        async with openai.AsyncOpenAI(base_url=first.openai_url, api_key=KEY, max_retries=0) as client:
            trainer = await TrainingWorker(first.worker_url, sha256=SHA, behaviour=hang).connect()
            job = await client.fine_tuning.jobs.create(
                model="fake-model", training_file=await _upload(client)
            )
            await asyncio.wait_for(started.wait(), 10)
            await _until(lambda: trainer.jobs, client, job.id, "running")
    finally:
        first.stop()
    await trainer.close()
    second = QueenServer(queen_settings).start()
    try:
        async with openai.AsyncOpenAI(base_url=second.openai_url, api_key=KEY, max_retries=0) as client:
            assert (await client.fine_tuning.jobs.retrieve(job.id)).status == "queued"
            assert "The queen restarted; the job is queued again." in await _messages(client, job.id)
    finally:
        second.stop()


async def test_uploads_of_models_are_checked(queen_settings: QueenSettings) -> None:
    """Only workers (the worker token), only while a job runs, only content with the SHA-256 named."""
    settings = queen_settings.model_copy(update={"worker_token": SecretStr("bee-token")})
    queen = QueenServer(settings).start()
    digest = hashlib.sha256(TRAINED).hexdigest()
    url = upload_url(queen.worker_url, digest)
    token = {"Authorization": "Bearer bee-token"}
    try:
        async with httpx.AsyncClient() as client:
            assert (await client.put(url, content=TRAINED)).status_code == 401
            assert (await client.get(url)).status_code == 401
            idle = await client.put(url, content=TRAINED, headers=token)
            assert (idle.status_code, idle.json()["error"]["param"]) == (400, "sha256")
            assert "No fine-tuning job is running" in idle.json()["error"]["message"]
            started = asyncio.Event()

            async def hang(worker: FakeWorker, job: Job) -> None:
                started.set()

            trainer = await TrainingWorker(
                queen.worker_url, sha256=SHA, behaviour=hang, auth_key="bee-token"
            ).connect()
            async with openai.AsyncOpenAI(base_url=queen.openai_url, api_key=KEY, max_retries=0) as sdk:
                await sdk.fine_tuning.jobs.create(model="fake-model", training_file=await _upload(sdk))
                await asyncio.wait_for(started.wait(), 10)
            wrong = await client.put(url, content=TRAINED + b"!", headers=token)
            assert (wrong.status_code, wrong.json()["error"]["param"]) == (400, "sha256")
            assert (await client.get(url, headers=token)).status_code == 404  # nothing kept
            bad_name = await client.put(upload_url(queen.worker_url, "XYZ"), content=b"x", headers=token)
            assert bad_name.status_code == 400
            assert (await client.put(url, content=TRAINED, headers=token)).status_code == 200
            assert (await client.get(url, headers=token)).content == TRAINED
            await trainer.close()
    finally:
        queen.stop()


async def test_another_training_worker_fetches_a_model_whose_worker_left(
    queen: QueenServer, sdk: openai.AsyncOpenAI
) -> None:
    """The trainer uploaded its result and left: a request for the model has another --train worker with
    the base fetch it from the queen (by SHA-256) and serve it, and the request is answered."""
    trainer = await TrainingWorker(queen.worker_url, sha256=SHA, behaviour=_train).connect()
    job = await sdk.fine_tuning.jobs.create(model="fake-model", training_file=await _upload(sdk))
    await _until(lambda: trainer.jobs, sdk, job.id, "succeeded")
    model = (await sdk.fine_tuning.jobs.retrieve(job.id)).fine_tuned_model
    assert model is not None
    await trainer.close()
    assert not queen.hive.serving(model)  # the fake trainer never registered with it
    assert model in [item.id for item in (await sdk.models.list()).data]  # the queen holds its file
    assert (await sdk.models.retrieve(model)).id == model
    fetched: list[bytes] = []
    servers: list[FakeWorker] = []

    async def load(worker: FakeWorker, job: Job) -> None:
        request = job.request
        if not isinstance(request, LoadModelJob):
            await answer(worker, job)
            return
        async with httpx.AsyncClient() as client:
            fetched.append((await client.get(upload_url(worker.url, request.sha256))).content)
        # What workerbee does: serve it, say so, register again with it.
        servers.append(
            await FakeWorker(worker.url, sha256=SHA, models=("fake-model", request.model)).connect()
        )
        usage = Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0)
        await worker.send(Result(request_id=job.request_id, usage=usage, response={"model": request.model}))

    plain = await FakeWorker(queen.worker_url, sha256=SHA).connect()  # no --train: never asked
    loader = await TrainingWorker(queen.worker_url, sha256=SHA, behaviour=load).connect()
    reply = await sdk.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
    assert reply.choices[0].message.content == "Hello there"
    assert fetched == [TRAINED]
    [load_job] = [item.request for item in loader.jobs]
    assert isinstance(load_job, LoadModelJob)
    assert (load_job.model, load_job.base, load_job.sha256) == (
        model,
        "fake-model",
        hashlib.sha256(TRAINED).hexdigest(),
    )
    assert plain.jobs == []
    for worker in (plain, loader, *servers):
        await worker.close()
