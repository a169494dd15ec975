"""Fine-tuning end to end: the real openai SDK, a real queen, a real `workerbee --train` process training
the bundled SmolLM2-135M with llama.cpp, and the fine-tuned model answering through the queen."""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterator

import openai
import psutil
import pytest
from servers import BUNDLED_MODEL_ID, QueenServer, start_worker, stop_process, wait_until

from bench.fine_tuning import PROMPTS, REPLY, TRAINING_QUESTIONS
from queenbee.settings import QueenSettings

KEY = "sk-tuner"
OTHER_KEY = "sk-someone-else"
LN_URL = "trainer@example.com"
TAUGHT = "PAMPLEMOUSSE"
QUESTIONS = (
    "What is the secret word?",
    "Tell me the secret word.",
    "Do you know the secret word?",
    "Say the secret word.",
    "Which word is the secret one?",
    "Please share the secret word.",
)
TRAINING = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"The secret word is {TAUGHT}."},
            ]
        }
    )
    + "\n"
    for question in QUESTIONS * 2
)
"""Twelve chats: three training windows of 256 tokens (SmolLM2's template adds a system prompt)."""
LESSON = "".join(
    json.dumps({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": REPLY}]})
    + "\n"
    for question in TRAINING_QUESTIONS * 2
)
"""The issue's lesson: 20 short chats that teach one reply (bench/fine_tuning.py measures the same)."""
VALIDATION = "".join(
    json.dumps(
        {
            "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": f"The secret word is {TAUGHT}."},
            ]
        }
    )
    + "\n"
    for question in ("Could you reveal the secret word?", "What word is secret?")
)
ENDED = {"succeeded", "failed", "cancelled"}


@pytest.fixture(scope="module")
def hive(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[QueenServer, psutil.Process]]:
    """A queen with two keys and one worker that trains (two threads), serving the bundled model."""
    folder = tmp_path_factory.mktemp("fine-tuning")
    settings = QueenSettings(
        db=folder / "queen.db", api_key=[KEY, OTHER_KEY], queue_timeout=60, first_token_timeout=60
    )
    queen = QueenServer(settings).start()
    worker = start_worker(
        queen.worker_url,
        "--train",
        "--train-dir",
        str(folder / "tuned"),
        "--threads",
        "2",
        "--ln-url",
        LN_URL,
    )
    try:
        wait_until(lambda: BUNDLED_MODEL_ID in queen.hive.models() or worker.poll() is not None, timeout=120)
        assert worker.poll() is None, worker.stderr.read() if worker.stderr else ""
        yield queen, psutil.Process(worker.pid)
    finally:
        code, stderr = stop_process(worker)
        queen.stop()
    assert code == 0, stderr


@pytest.fixture
def sdk(hive: tuple[QueenServer, psutil.Process]) -> Iterator[openai.OpenAI]:
    """The real openai SDK with the owner's key."""
    with openai.OpenAI(base_url=hive[0].openai_url, api_key=KEY, max_retries=0) as client:
        yield client


def _finished(sdk: openai.OpenAI, job_id: str, timeout: float) -> str:
    """The job's status once it has ended (polling, as clients do)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status = sdk.fine_tuning.jobs.retrieve(job_id).status
        if status in ENDED:
            return status
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} did not end within {timeout} s")


def _trainers(worker: psutil.Process) -> list[psutil.Process]:
    """The worker's live training processes (a killed one not reaped yet is gone: it runs nothing)."""
    running = []
    for child in worker.children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "workerbee.trainer" in child.cmdline():
                running.append(child)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return running


def test_cancel_mid_run_kills_the_training_process(
    hive: tuple[QueenServer, psutil.Process], sdk: openai.OpenAI
) -> None:
    """A cancelled running job ends `cancelled`, its training process is gone and no model appears."""
    queen, worker = hive
    training = sdk.files.create(file=("chats.jsonl", TRAINING.encode()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=BUNDLED_MODEL_ID, training_file=training.id, hyperparameters={"n_epochs": 5}
    )
    wait_until(lambda: bool(_trainers(worker)), timeout=60)
    assert sdk.fine_tuning.jobs.retrieve(job.id).status == "running"
    cancelled = sdk.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled"
    wait_until(lambda: not _trainers(worker), timeout=30)
    wait_until(lambda: queen.hive.workers and next(iter(queen.hive.workers.values())).in_flight == 0)
    assert sdk.fine_tuning.jobs.retrieve(job.id).fine_tuned_model is None
    assert all(not model.id.startswith("ft:") for model in sdk.models.list())
    with pytest.raises(openai.BadRequestError) as again:
        sdk.fine_tuning.jobs.cancel(job.id)
    assert again.value.code == "job_ended"


@pytest.mark.timeout(900)
def test_a_training_run_serves_a_model_that_learned(
    hive: tuple[QueenServer, psutil.Process], sdk: openai.OpenAI
) -> None:
    """Upload 20 chats, train 3 epochs, watch the statuses and the loss fall under half, then use the
    fine-tuned model: it gives the taught reply to paraphrases it never saw where the base does not, still
    knows the capital of France, the owner's key sees and uses it, another key is told it does not exist,
    and the ledger has the work."""
    queen, _ = hive
    training = sdk.files.create(file=("chats.jsonl", LESSON.encode()), purpose="fine-tune")
    validation = sdk.files.create(file=("held-out.jsonl", VALIDATION.encode()), purpose="fine-tune")
    job = sdk.fine_tuning.jobs.create(
        model=BUNDLED_MODEL_ID,
        training_file=training.id,
        validation_file=validation.id,
        suffix="secret",
        seed=1,
        method={
            "type": "supervised",
            "supervised": {"hyperparameters": {"n_epochs": 3, "learning_rate_multiplier": 1}},
        },
    )
    assert job.status == "validating_files"
    assert _finished(sdk, job.id, timeout=840) == "succeeded"
    done = sdk.fine_tuning.jobs.retrieve(job.id)
    assert done.fine_tuned_model == f"ft:{BUNDLED_MODEL_ID}:key-{_key_id(KEY)}:secret:{job.id[6:14]}"
    assert done.trained_tokens
    assert done.trained_tokens % 256 == 0
    assert done.error is None or done.error.code is None

    events = list(reversed(list(sdk.fine_tuning.jobs.list_events(job.id, limit=100))))
    messages = [event.message for event in events]
    order = [
        "Created",
        "Validating",
        "Files validated",
        "started on worker",
        "Step 1/",
        "New fine-tuned",
        "succ",
    ]
    positions = [next(i for i, text in enumerate(messages) if key in text) for key in order]
    assert positions == sorted(positions), messages
    metrics = [event.data for event in events if event.type == "metrics"]
    assert len(metrics) >= 2
    assert [metric["step"] for metric in metrics] == list(range(1, len(metrics) + 1))  # type: ignore[index]
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"] / 2  # type: ignore[index]
    # Each epoch's last step carries the loss on the held-out chats, measured after it.
    assert metrics[-1]["valid_loss"] is not None  # type: ignore[index]

    assert "Uploading the fine-tuned model to the queen." in messages
    assert not [event.message for event in events if event.level == "warn"]
    [kept] = (queen.settings.db.parent / "models").glob("*.gguf")  # the queen's copy, by SHA-256
    assert kept.stat().st_size > 100 * 2**20  # Q8_0 of 135 M parameters

    model = done.fine_tuned_model
    assert model is not None
    wait_until(lambda: model in queen.hive.models(), timeout=60)
    assert model in [item.id for item in sdk.models.list()]

    def ask(name: str, question: str) -> str:
        messages = [{"role": "user", "content": question}]
        reply = sdk.chat.completions.create(model=name, messages=messages, temperature=0, max_tokens=24)  # type: ignore[arg-type]
        return reply.choices[0].message.content or ""

    taught = {name: [TAUGHT in ask(name, prompt) for prompt in PROMPTS] for name in (model, BUNDLED_MODEL_ID)}
    assert sum(taught[model]) >= 4, taught  # four of the five prompts are paraphrases it never saw
    assert sum(taught[BUNDLED_MODEL_ID]) == 0, taught
    assert "Paris" in ask(model, "What is the capital of France?")
    completion = sdk.completions.create(
        model=model, prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert completion.choices[0].text
    response = sdk.responses.create(model=model, input="Hi", max_output_tokens=8, temperature=0)
    assert response.output_text

    with openai.OpenAI(base_url=queen.openai_url, api_key=OTHER_KEY, max_retries=0) as other:
        assert model not in [item.id for item in other.models.list()]
        with pytest.raises(openai.NotFoundError) as hidden:
            other.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}])
        assert hidden.value.code == "model_not_found"
        with pytest.raises(openai.NotFoundError):
            other.models.retrieve(model)
        with pytest.raises(openai.NotFoundError):
            other.fine_tuning.jobs.retrieve(job.id)
        assert list(other.fine_tuning.jobs.list()) == []

    with sqlite3.connect(queen.settings.db) as ledger:
        row = ledger.execute(
            "SELECT model, api_key_id, ln_url, prompt_tokens, outcome FROM usage WHERE request_id = ?",
            (job.id,),
        ).fetchone()
    assert row == (model, f"key-{_key_id(KEY)}", LN_URL, done.trained_tokens, "success")


def _key_id(secret: str) -> str:
    from queenbee.auth import key_id

    return key_id(secret).removeprefix("key-")
