"""Fine-tuning jobs in a database that several queens share (replicas): one queen starts a queued job,
and a restarting replica requeues only the jobs it started itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from queenbee.hive import Hive
from queenbee.ledger_db import Target
from queenbee.observer import Observers
from queenbee.settings import QueenSettings
from queenbee.training_queue import INTERNAL, FineTunedModels, TrainingQueue
from queenbee.tuning_store import TuningStore


@pytest.fixture(params=["sqlite", "postgres"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    if request.param == "postgres":
        url: str = request.getfixturevalue("postgres_url")
        return url
    return tmp_path / "ledger.db"


def job(job_id: str, status: str, replica: str | None = None) -> dict[str, Any]:
    return {"id": job_id, "created_at": 1000, "status": status, INTERNAL: {"replica": replica}}


async def test_only_one_claim_of_a_queued_job_succeeds(db: Target) -> None:
    """Two queens that both saw the job queued: the first claim stores it running, the second is refused
    and changes nothing; a job cancelled meanwhile cannot be claimed."""
    store = await TuningStore.open(db)
    try:
        await store.put_job("key-a", job("ftjob-1", "queued"))
        assert await store.claim_job("key-a", job("ftjob-1", "running", "a"), expected="queued")
        assert not await store.claim_job("key-a", job("ftjob-1", "running", "b"), expected="queued")
        stored = await store.get_job("key-a", "ftjob-1")
        assert stored == job("ftjob-1", "running", "a")
        assert not await store.claim_job("key-b", job("ftjob-1", "queued"), expected="running")  # not its job
        await store.put_job("key-a", job("ftjob-2", "cancelled"))
        assert not await store.claim_job("key-a", job("ftjob-2", "running"), expected="queued")
        assert (await store.get_job("key-a", "ftjob-2") or {})["status"] == "cancelled"
    finally:
        await store.close()


@pytest.mark.parametrize(
    ("settings", "requeued"),
    [
        (QueenSettings(), {"by-a", "by-b", "unnamed"}),  # one queen: every running job was its own
        (QueenSettings(redis_url="redis://127.0.0.1:1/0", replica_id="b"), {"by-b"}),
        (QueenSettings(redis_url="redis://127.0.0.1:1/0"), set()),  # a random id owns nothing yet
    ],
)
async def test_a_restarting_replica_requeues_only_its_own_running_jobs(
    tmp_path: Path, settings: QueenSettings, requeued: set[str]
) -> None:
    store = await TuningStore.open(tmp_path / "ledger.db")
    try:
        for job_id, replica in (("by-a", "a"), ("by-b", "b"), ("unnamed", None)):
            await store.put_job(None, job(job_id, "running", replica))
        queue = TrainingQueue(Hive(settings), store, FineTunedModels(), Observers([]), settings)
        await queue.load()
        assert {found["id"] for _, found in await store.jobs_with_status("queued")} == requeued
        assert len(await store.jobs_with_status("running")) == 3 - len(requeued)
    finally:
        await store.close()
