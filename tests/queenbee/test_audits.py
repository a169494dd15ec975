"""The audit policy (queenbee/audits.py), escrow in the ledger (queenbee/escrow.py), and the completion
count taken from relayed token ids (usage_check.counted_by_ids): sans-I/O cores and a real ledger file."""

from __future__ import annotations

import random
import subprocess
import sys
from collections import deque
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from protocol import Chunk, ModelInfo, Register, Result, Usage, encode, result_frames
from protocol.openai import ChatCompletionRequest
from protocol.verification import AuditReport, ScoredChoice
from queenbee import escrow
from queenbee.auditing import parse_pins
from queenbee.audits import (
    AuditPolicy,
    AuditRule,
    Delivered,
    DeliveredChoice,
    Standing,
    Verdict,
    answer_mode,
    implausibly_fast,
    judge,
    same_text,
)
from queenbee.ledger import Ledger, connect, insert
from queenbee.observer import RequestRecord
from queenbee.resume import AnswerSoFar
from queenbee.standings import load_standings, save_standing
from queenbee.usage_check import counted_by_ids
from queenbee.usage_report import usage_totals
from queenbee.whole_answers import whole_answer

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


async def test_a_standing_is_kept_in_the_ledger_as_it_was(tmp_path: Path) -> None:
    """Probation, the recent audits' window, the pause and its reason, and cleared escrow come back from
    the ledger as they were saved; a second save of one identity replaces the first; the most
    recently changed come first when there are more than the queen keeps."""
    await standings_round_trip(tmp_path / "ledger.db")


async def test_a_standing_is_kept_in_a_postgresql_ledger_as_it_was(postgres_url: str, tmp_path: Path) -> None:
    """The same on PostgreSQL: migration 8 and the upsert are portable."""
    await standings_round_trip(postgres_url, spool=tmp_path / "spool")


async def standings_round_trip(db: Path | str, spool: Path | None = None) -> None:
    """Save standings to a ledger on `db`, read them back, and check them."""
    policy = AuditPolicy()
    paused = Standing(ln_url="liar@x")
    paused.record(PASS, policy)
    paused.record(FLAG, policy)
    paused.record(FLAG, policy)
    cleared = Standing(ln_url="honest@x", cleared=True)
    cleared.record(PASS, policy)
    ledger = await Ledger.open(db, spool=spool)
    try:
        await ledger.write(lambda connection: save_standing(connection, "liar", Standing(), 1.0))
        await ledger.write(lambda connection: save_standing(connection, "liar", paused, 2.0))
        await ledger.write(lambda connection: save_standing(connection, "honest", cleared, 3.0))
        kept = await ledger.read(lambda connection: load_standings(connection, 10))
        newest = await ledger.read(lambda connection: load_standings(connection, 1))
    finally:
        await ledger.close()
    assert list(kept) == ["liar", "honest"]
    assert kept["liar"] == paused
    assert kept["liar"].paused
    assert kept["liar"].recent == deque([False, True, True])
    assert kept["liar"].probation_left == 20
    assert kept["honest"] == cleared
    assert list(newest) == ["honest"]


def test_whole_answers_are_read_by_their_ids_and_refused_without_one_list_per_choice() -> None:
    """A whole answer's ids, text and finish reason per choice (chat and text completions); ids that do
    not match the choices one to one make it uncountable by ids (the bounded count stands)."""
    chat_answer = {
        "choices": [
            {"index": 0, "message": {"content": "Hi"}, "finish_reason": "stop"},
            {"index": 1, "message": {"content": None, "tool_calls": []}, "finish_reason": "tool_calls"},
        ]
    }
    answer = whole_answer(chat_answer, [[5, 6], [7]])
    assert answer.resumable
    assert answer.ids == {0: [5, 6], 1: [7]}
    assert answer.texts == {0: ["Hi"]}
    assert answer.finish_reasons == {0: "stop", 1: "tool_calls"}
    usage = Usage(prompt_tokens=3, completion_tokens=4, total_tokens=7)
    assert counted_by_ids(usage, answer).completion_tokens == 3
    text = whole_answer({"choices": [{"index": 0, "text": " blue", "finish_reason": "length"}]}, [[9]])
    assert text.texts == {0: [" blue"]}
    for ids in (None, [[5, 6]], [[1], [2], [3]]):
        assert not whole_answer(chat_answer, ids).resumable
        assert counted_by_ids(usage, whole_answer(chat_answer, ids)) == usage
    twice = {"choices": [{"index": 0, "text": "a"}, {"index": 0, "text": "b"}]}
    assert not whole_answer(twice, [[1], [2]]).resumable


def test_a_result_too_big_for_its_ids_goes_without_them() -> None:
    """A whole answer split into parts keeps its ids on the last frame when they fit, and drops them
    (the queen then counts within bounds) when that frame would pass the peer's limit."""
    big = {"choices": [{"index": 0, "text": "x" * 200_000}]}
    few = Result(
        request_id="r",
        usage=Usage(prompt_tokens=1, completion_tokens=2, total_tokens=3),
        response=big,
        token_ids=[[1, 2]],
    )
    kept = result_frames(few, 2**16)[-1]
    assert isinstance(kept, Result)
    assert kept.parts > 0
    assert kept.token_ids == [[1, 2]]
    many = few.model_copy(update={"token_ids": [list(range(30_000))]})
    last = result_frames(many, 2**16)[-1]
    assert isinstance(last, Result)
    assert last.parts > 0
    assert last.token_ids is None
    assert "token_ids" not in encode(few.model_copy(update={"token_ids": None}))


def scored_answer(mode: str, finished: bool, **scores: Any) -> tuple[Delivered, AuditReport]:
    """A delivered one-choice answer of three tokens and the auditor's report on it."""
    delivered = Delivered(
        request_id="r",
        model="m",
        model_hash="0" * 64,
        identity="i",
        worker_id="w",
        ln_url="",
        request=chat(temperature=0.8, seed=1),
        choices=(DeliveredChoice(0, (1, 2, 3), "abc", finished),),
        mode="sampled" if mode == "sampled" else "greedy",
        ignore_eos=False,
        reported_prompt_tokens=5,
        reported_completion_tokens=3,
        stops=("\n",),
    )
    score = ScoredChoice(
        index=0, gaps=[0.0] * 3, ranks=[0] * 3, eos=[0.5] * 4, best_is_eos=[False] * 3, text="abc", **scores
    )
    return delivered, AuditReport(prompt_tokens=5, choices=[score], seconds=0.1)


def test_a_sampled_answer_is_flagged_by_two_draws_far_from_the_replay_or_two_dropped_tokens() -> None:
    """One far draw passes (an honest worker's logits move a boundary now and then), two flag, a
    finished answer's end counting as a draw; two tokens the sampler drops flag without a seed."""
    rule = AuditRule()
    cases: list[tuple[dict[str, Any], bool, bool]] = [
        ({"replay_distances": [0.0, 0.01, 0.2], "replay_end_distance": 0.0}, True, False),
        ({"replay_distances": [0.0, 0.06, 0.2], "replay_end_distance": 0.0}, True, True),
        ({"replay_distances": [0.0, 0.0, 0.2], "replay_end_distance": 0.3}, True, True),
        ({"replay_distances": [0.0, 0.0, 0.2], "replay_end_distance": 0.3}, False, False),
        ({"sampled_p": [0.2, 0.0, 0.1]}, False, False),
        ({"sampled_p": [0.0, 0.0, 0.1]}, False, True),
    ]
    for scores, finished, flagged in cases:
        delivered, report = scored_answer("sampled", finished, **scores)
        assert judge(delivered, report, rule).flagged is flagged, scores
    # A greedy answer is judged by its gaps, whatever replay fields a report carries.
    delivered, report = scored_answer("greedy", False, replay_distances=[1.0, 1.0, 1.0])
    assert judge(delivered, report, rule) == Verdict(False, ())


def test_ids_spell_the_relayed_text_or_the_text_and_the_stop_that_ended_it() -> None:
    """A choice a stop sequence ended relays the text before the stop; its ids also spell the stop and
    what its last token held after it. Anything else is other text."""
    assert same_text("abc", "abc", ())
    assert same_text("abc\nde", "abc", ("\n",))
    assert not same_text("abcde", "abc", ("\n",))
    assert not same_text("abc\n", "abd", ("\n",))
    assert not same_text("abc", "abc and more", ("\n",))
    delivered, report = scored_answer("greedy", False)
    report = report.model_copy(update={"choices": [report.choices[0].model_copy(update={"text": "abc\nx"})]})
    assert not judge(delivered, report, AuditRule()).flagged
