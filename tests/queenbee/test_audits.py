"""The audit policy (queenbee/audits.py), escrow in the ledger (queenbee/escrow.py), and the completion
count taken from relayed token ids (usage_check.counted_by_ids): sans-I/O cores and a real ledger file."""

from __future__ import annotations

import random
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from protocol import Chunk, ModelInfo, Register, Usage
from protocol.openai import ChatCompletionRequest
from queenbee import escrow
from queenbee.auditing import parse_pins
from queenbee.audits import AuditPolicy, Standing, Verdict, answer_mode, implausibly_fast
from queenbee.ledger import Ledger, connect, insert
from queenbee.observer import RequestRecord
from queenbee.resume import AnswerSoFar
from queenbee.usage_check import counted_by_ids
from queenbee.usage_report import usage_totals

FLAG = Verdict(True, ("choice 0: 3 of 40 tokens more than 0.5 nats below the model's best",))
PASS = Verdict(False, ())


def chat(**fields: Any) -> ChatCompletionRequest:
    """A chat request."""
    return ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "hi"}], **fields}
    )


def test_one_flag_means_probation_and_two_within_the_window_a_pause() -> None:
    """The first flag raises the audit rate for the next 20 requests; a second flag within 50 audits
    pauses the worker, after exactly two audits."""
    policy = AuditPolicy()
    standing = Standing()
    assert not standing.record(FLAG, policy)
    assert standing.on_probation
    assert standing.probation_left == 20
    assert not standing.paused
    assert standing.record(FLAG, policy)
    assert standing.paused
    assert standing.paused_after == 2
    assert standing.pause_reason == FLAG.reasons[0]


def test_two_flags_more_than_fifty_audits_apart_do_not_pause() -> None:
    """An honest worker's rare false flag does not add up over its whole life: only the last 50 count."""
    policy = AuditPolicy()
    standing = Standing()
    standing.record(FLAG, policy)
    for _ in range(50):
        standing.record(PASS, policy)
    assert not standing.record(FLAG, policy)
    assert not standing.paused
    assert standing.flags == 2
    assert standing.passed_since_flag == 0


def test_probation_audits_at_its_own_rate_for_its_requests_then_the_base_rate() -> None:
    """With a seeded draw: 50% of the 20 requests after a flag are audited, then 5%."""
    policy = AuditPolicy()
    standing = Standing()
    standing.record(FLAG, policy)
    rng = random.Random(1)
    during = sum(standing.sample(policy, rng) for _ in range(20))
    assert not standing.on_probation
    after = sum(standing.sample(policy, rng) for _ in range(2000))
    reference = random.Random(1)
    assert during == sum(reference.random() < 0.5 for _ in range(20))
    assert after == sum(reference.random() < 0.05 for _ in range(2000))


def test_only_answers_of_the_model_alone_get_the_greedy_rule() -> None:
    """Penalties, biases, tools and response formats change the model's best token: such answers get only
    the text and count checks; temperature 0 or top_k 1 is greedy; anything else is sampled."""
    assert answer_mode(chat(temperature=0)) == "greedy"
    assert answer_mode(chat(top_k=1, temperature=0.8)) == "greedy"
    assert answer_mode(chat(temperature=0.7)) == "sampled"
    assert answer_mode(chat()) == "sampled"
    assert answer_mode(chat(temperature=0, presence_penalty=0.5)) is None
    assert answer_mode(chat(temperature=0, logit_bias={"5": 3})) is None
    assert answer_mode(chat(temperature=0, response_format={"type": "json_object"})) is None


def test_pins_are_id_equals_sha256() -> None:
    """--model-pin takes ID=SHA256 (ids may contain '='); anything else names the bad pin."""
    digest = "ab" * 32
    assert parse_pins([f"org/model:Q4=x={digest.upper()}"]) == {"org/model:Q4=x": digest}
    for bad in ("model", f"={digest}", "model=abc", f"model={digest}0"):
        with pytest.raises(ValueError, match="expected ID=SHA256"):
            parse_pins([bad])


def test_a_queen_refuses_a_malformed_pin_at_startup(tmp_path: Path) -> None:
    """A bad --model-pin stops the queen with exit status 2 and the option named."""
    result = subprocess.run(
        [sys.executable, "-m", "queenbee", "--db", str(tmp_path / "q.db"), "--model-pin", "m=nothex"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "--model-pin" in result.stderr
    assert "is not ID=SHA256" in result.stderr


def relayed(*chunks: tuple[int, list[int] | None]) -> AnswerSoFar:
    """What the queen relayed: chunks of one choice, each with its token count and ids."""
    answer = AnswerSoFar()
    for tokens, ids in chunks:
        answer.relayed(
            Chunk(
                request_id="r",
                chunk={"choices": [{"index": 0, "delta": {"content": "x" * tokens}, "finish_reason": None}]},
                tokens=tokens,
                token_ids=ids,
            )
        )
    return answer


def test_a_worker_inflating_its_count_is_paid_for_the_ids_it_relayed() -> None:
    """100 relayed ids and a report of 101: the count is 100. A report at or below the ids stands, and a
    stream whose chunks did not name their ids keeps the worker's bounded figure."""
    answer = relayed(*[(10, list(range(i, i + 10))) for i in range(0, 100, 10)])
    inflated = Usage(prompt_tokens=20, completion_tokens=101, total_tokens=121)
    assert counted_by_ids(inflated, answer) == Usage(
        prompt_tokens=20, completion_tokens=100, total_tokens=120
    )
    honest = Usage(prompt_tokens=20, completion_tokens=100, total_tokens=120)
    assert counted_by_ids(honest, answer) is honest
    anonymous = relayed((10, None), (10, None))
    assert counted_by_ids(inflated, anonymous) is inflated


def record(request_id: str, started_at: float, ln_url: str, prompt: int, completion: int) -> RequestRecord:
    """A finished request served by a worker paid at `ln_url`."""
    return RequestRecord(
        request_id=request_id,
        path="/v1/chat/completions",
        model="m",
        started_at=started_at,
        outcome="success",
        status=200,
        worker_id="worker-1",
        ln_url=ln_url,
        prompt_tokens=prompt,
        completion_tokens=completion,
    )


def test_the_report_splits_each_address_into_payable_escrowed_and_forfeited_to_the_token(
    tmp_path: Path,
) -> None:
    """Rows before a hold are payable, rows under an open hold escrowed, a forfeited row lost; releasing
    the hold makes its rows payable; a hold opened again escrows what follows. Totals stay exact."""
    db = tmp_path / "ledger.db"
    with closing(connect(db)) as connection:
        insert(connection, record("before", 100.0, "a@x", 7, 11))
        escrow.open_hold(connection, "a@x", "worker-a", 200.0)
        assert not escrow.open_hold(connection, "a@x", "worker-a", 201.0)
        insert(connection, record("held", 300.0, "a@x", 5, 13))
        insert(connection, record("flagged", 310.0, "a@x", 3, 17))
        insert(connection, record("other", 320.0, "b@x", 2, 19))
        escrow.forfeit(connection, "flagged", "a@x", "flagged", 400.0)
        workers, _ = usage_totals(connection, None, None)
        a = next(row for row in workers if row.name == "a@x")
        b = next(row for row in workers if row.name == "b@x")
        assert (a.payable, a.escrowed, a.forfeited) == (18, 18, 20)
        assert (b.payable, b.escrowed, b.forfeited) == (21, 0, 0)
        assert escrow.release_holds(connection, "worker-a", 500.0) == 1
        escrow.open_hold(connection, "a@x", "worker-a", 600.0)
        insert(connection, record("after", 700.0, "a@x", 1, 1))
        workers, _ = usage_totals(connection, None, None)
        a = next(row for row in workers if row.name == "a@x")
        assert (a.payable, a.escrowed, a.forfeited, a.total_tokens) == (36, 2, 20, 58)
        assert escrow.release_holds(connection, "worker-a", 800.0) == 1
        workers, _ = usage_totals(connection, 250.0, 650.0)
        a = next(row for row in workers if row.name == "a@x")
        assert (a.payable, a.escrowed, a.forfeited) == (18, 0, 20)


async def test_the_ledger_writes_audits_and_holds_in_one_transaction(tmp_path: Path) -> None:
    """Ledger.write runs on the writer's thread; a failing function leaves nothing behind."""
    ledger = await Ledger.open(tmp_path / "ledger.db")
    try:
        row = escrow.AuditRow("r1", 1.0, "id", "a@x", "m", "auditor", True, "why", 40, 0.25)

        def store(connection: Any) -> None:
            escrow.record_audit(connection, row)
            escrow.forfeit(connection, "r1", "a@x", "why", 1.0)

        await ledger.write(store)

        def broken(connection: Any) -> None:
            escrow.record_audit(connection, row)
            raise RuntimeError("half done")

        with pytest.raises(RuntimeError):
            await ledger.write(broken)
        counts = await ledger.read(
            lambda connection: (
                connection.execute("SELECT COUNT(*) FROM audits").fetchone()[0],
                connection.execute("SELECT COUNT(*) FROM forfeits").fetchone()[0],
            )
        )
        assert counts == (1, 1)
    finally:
        await ledger.close()


def test_registration_models_refused_by_a_pin_are_dropped_and_the_rest_served(tmp_path: Path) -> None:
    """A worker serving a pinned id with another file keeps its other models; with only that one it is
    refused, the reason naming both hashes."""
    from queenbee.auditing import AuditService
    from queenbee.hive import Hive
    from queenbee.settings import QueenSettings

    pinned = "ab" * 32
    settings = QueenSettings(db=tmp_path / "q.db", model_pin=[f"m={pinned}"])
    service = AuditService(settings, Hive(settings), ledger=None)  # type: ignore[arg-type]
    models = [ModelInfo(id="m", n_ctx=8, sha256="cd" * 32), ModelInfo(id="n", n_ctx=8)]
    register = Register(
        protocol_version=3,
        worker_version="t",
        instance_id="instance-1",
        max_frame_bytes=2**20,
        cpu_count=1,
        disk_space=0,
        vram=0,
        models=models,
    )
    admission = service.admit(register)
    assert admission.refusal is None
    assert [model.id for model in admission.registration.models] == ["n"]
    assert admission.refused_models == {
        "m": f"'m' is pinned to the file with SHA-256 {pinned}; this worker's has {'cd' * 32}"
    }
    alone = service.admit(register.model_copy(update={"models": models[:1]}))
    assert alone.refusal is not None
    assert pinned in alone.refusal
    trusted = service.admit(register.model_copy(update={"auditor_token": "guess"}))
    assert trusted.refusal == "the auditor token is not this queen's"


def test_a_worker_much_faster_than_the_others_on_its_file_is_audited_more() -> None:
    """Twice the median speed of at least two others with the same file: sampled at the probation rate."""
    assert implausibly_fast(250.0, [100.0, 110.0, 90.0])
    assert not implausibly_fast(150.0, [100.0, 110.0, 90.0])
    assert not implausibly_fast(900.0, [100.0])  # one other worker says little
    assert not implausibly_fast(None, [100.0, 110.0])
    policy = AuditPolicy()
    rng, reference = random.Random(3), random.Random(3)
    sampled = sum(Standing().sample(policy, rng, suspicious=True) for _ in range(200))
    assert sampled == sum(reference.random() < 0.5 for _ in range(200))
