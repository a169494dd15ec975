"""The auditor's scorer on the real SmolLM2 model, and the rule (queenbee/audits.py) on what it scores.

Answers come from the real engine (batching.py) the way a worker streams them; the auditor is a second
context on the same weights, as in `workerbee --auditor-token`. Cheats are made from real answers:
random tokens, an answer run past its end (`ignore_eos` behind the client's back), one cut short.
"""

from __future__ import annotations

import asyncio
import hashlib
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import pytest
from pydantic import ValidationError
from servers import smollm2_path

from protocol import AuditedChoice, AuditJob, ChallengeJob, ErrorCode
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.verification import AUDIT_REPORT, CHALLENGE_REPORT, AuditReport
from queenbee.audits import AuditRule, Delivered, DeliveredChoice, Verdict, answer_mode, judge
from workerbee.auditor import Auditor, mass_between, score_rows
from workerbee.batching import BatchedModel
from workerbee.errors import EngineError
from workerbee.possession import Possession, range_sha256
from workerbee.prompts import ModelConfig

CONFIG = ModelConfig(id="smol", path=smollm2_path(), n_ctx=1024)
PROMPTS = ["Describe the sea in two sentences.", "Name three primary colors.", "How do birds fly?"]


@pytest.fixture(scope="module")
def engine() -> Iterator[BatchedModel]:
    """The worker's engine, batching two sequences at once."""
    model = BatchedModel.load(CONFIG, parallel=2, threads=1)
    yield model
    model.close()


@pytest.fixture(scope="module")
def auditor(engine: BatchedModel) -> Iterator[Auditor]:
    """An auditor on the same weights: its own context, its own thread."""
    scorer = Auditor.for_models({"smol": engine}, threads=1)
    yield scorer
    scorer.close()


Answer = tuple[ChatCompletionRequest, list[int], str, str | None, int]


def chat(prompt: str, **fields: Any) -> ChatCompletionRequest:
    """A greedy streamed chat request."""
    body = {"model": "smol", "messages": [{"role": "user", "content": prompt}], "stream": True}
    return ChatCompletionRequest.model_validate({**body, "temperature": 0, "max_tokens": 40, **fields})


async def answer(engine: BatchedModel, request: ChatCompletionRequest) -> Answer:
    """Stream a request: its ids, its text, its finish reason and the completion tokens it reported."""
    ids: list[int] = []
    text: list[str] = []
    finish: list[str] = []

    async def on_chunk(chunk: dict[str, Any], tokens: int) -> None:
        ids.extend(getattr(tokens, "ids", ()))
        for choice in chunk["choices"]:
            text.append(choice["delta"].get("content") or "")
            if choice["finish_reason"]:
                finish.append(choice["finish_reason"])

    usage, _ = await engine.chat(request, threading.Event(), on_chunk)
    return request, ids, "".join(text), finish[0] if finish else None, usage.prompt_tokens


async def audited(
    auditor: Auditor, request: ChatCompletionRequest, ids: list[int], text: str, finished: bool, prompt: int
) -> tuple[Verdict, AuditReport]:
    """Audit an answer as the queen would and judge it with the queen's rule."""
    job = AuditJob(
        model="smol", chat=request, choices=[AuditedChoice(index=0, token_ids=ids, finished=finished)]
    )
    _, response = await auditor.audit(job)
    report = AUDIT_REPORT.validate_python(response)
    delivered = Delivered(
        request_id="r",
        model="smol",
        model_hash="0" * 64,
        identity="worker-identity",
        worker_id="w",
        ln_url="",
        request=request,
        choices=(DeliveredChoice(0, tuple(ids), text, finished),),
        mode=answer_mode(request) or "sampled",
        ignore_eos=request.ignore_eos,
        reported_prompt_tokens=prompt,
        reported_completion_tokens=len(ids),
        stops=tuple(request.stop) if isinstance(request.stop, list) else (),
    )
    return judge(delivered, report, AuditRule()), report


def test_scores_are_gaps_ranks_and_end_probabilities_of_each_row() -> None:
    """Row i predicts token i: the gap is the best logit less the token's, the rank counts better tokens,
    and the last row (after the last token) gives only the probability of ending."""
    rows = np.log(np.array([[0.5, 0.3, 0.2], [0.1, 0.6, 0.3], [0.7, 0.2, 0.1]], dtype=np.float32))
    scored = score_rows(rows, [1, 1], eog=[0], index=3, text="ab")
    assert scored.index == 3
    assert scored.gaps == pytest.approx([np.log(0.5 / 0.3), 0.0], abs=1e-5)
    assert scored.ranks == [1, 0]
    assert scored.eos == pytest.approx([0.5, 0.1, 0.7], abs=1e-5)
    assert scored.best_is_eos == [True, False]
    with pytest.raises(ValueError, match="3 rows for 3 tokens"):
        score_rows(rows, [1, 1, 1], eog=[0], index=0, text="")


async def test_honest_greedy_answers_from_a_batch_of_two_pass(engine: BatchedModel, auditor: Auditor) -> None:
    """Answers decoded two at a time pass the audit, their texts and prompt counts agree, and every
    token is the model's best or within a hair of it."""
    answers = await asyncio.gather(*(answer(engine, chat(prompt)) for prompt in PROMPTS[:2]))
    for request, ids, text, finish, prompt in answers:
        assert ids
        verdict, report = await audited(auditor, request, ids, text, finish == "stop", prompt)
        assert verdict == Verdict(False, ())
        assert report.prompt_tokens == prompt
        assert report.choices[0].text == text
        assert max(report.choices[0].gaps) < 0.5
        assert len(report.choices[0].eos) == len(ids) + 1


async def test_random_tokens_are_flagged_on_the_first_audit(engine: BatchedModel, auditor: Auditor) -> None:
    """Tokens drawn at random, with their own text, are miles below the model's best."""
    request, ids, _, _, prompt = await answer(engine, chat(PROMPTS[0]))
    rng = random.Random(7)
    noise = [rng.randrange(100, engine.weights.vocab.n_tokens) for _ in ids]
    verdict, _ = await audited(auditor, request, noise, engine.weights.detokenize(noise), False, prompt)
    assert verdict.flagged
    assert any("nats below the model's best" in reason for reason in verdict.reasons)
    assert any("ranked" in reason for reason in verdict.reasons)


async def test_an_answer_run_past_its_end_is_flagged(engine: BatchedModel, auditor: Auditor) -> None:
    """A worker that suppresses the end of generation (ignore_eos the client never asked for) goes on
    where ending was the model's best by far."""
    honest = await answer(engine, chat(PROMPTS[1], max_tokens=200))
    assert honest[3] == "stop"
    padded = await answer(engine, chat(PROMPTS[1], max_tokens=len(honest[1]) + 12, ignore_eos=True))
    request, ids, text, _, prompt = padded
    verdict, report = await audited(auditor, chat(PROMPTS[1], max_tokens=200), ids, text, False, prompt)
    assert verdict.flagged
    assert any("went on at token" in reason for reason in verdict.reasons), verdict.reasons
    assert report.choices[0].best_is_eos[len(honest[1])]
    # The client that asked for ignore_eos gets what it asked for: not flagged.
    verdict, _ = await audited(auditor, request, ids, text, False, prompt)
    assert not any("went on" in reason for reason in verdict.reasons)


async def test_an_answer_cut_short_and_called_finished_is_flagged(
    engine: BatchedModel, auditor: Auditor
) -> None:
    """Stopping mid-sentence and reporting a natural end: the model gave ending little probability."""
    request, ids, _, _, prompt = await answer(engine, chat(PROMPTS[2]))
    cut = ids[: len(ids) // 2]
    verdict, _ = await audited(auditor, request, cut, engine.weights.detokenize(cut), True, prompt)
    assert any("ended where the model gives ending" in reason for reason in verdict.reasons), verdict.reasons


async def test_ids_behind_other_text_and_an_inflated_prompt_count_are_flagged(
    engine: BatchedModel, auditor: Auditor
) -> None:
    """The relayed text must be what the ids say, and the worker's prompt count the auditor's."""
    request, ids, text, finish, prompt = await answer(engine, chat(PROMPTS[0]))
    verdict, _ = await audited(auditor, request, ids, text + " (and more)", finish == "stop", prompt + 1)
    assert verdict.flagged
    assert any("do not detokenize to the relayed text" in reason for reason in verdict.reasons)
    assert any(f"reported {prompt + 1} prompt tokens" in reason for reason in verdict.reasons)


async def test_a_text_completion_is_scored_per_prompt(engine: BatchedModel, auditor: Auditor) -> None:
    """A completion job with two prompts: each choice is scored against its own prompt."""
    request = CompletionRequest.model_validate(
        {"model": "smol", "prompt": ["The sea is", "Birds fly"], "max_tokens": 8, "temperature": 0}
    )
    prompts = engine.prompts.completion_prompts(request)
    ids = [
        engine.weights.tokenize(" blue and deep", add_bos=False),
        engine.weights.tokenize(" south", add_bos=False),
    ]
    job = AuditJob(
        model="smol",
        completion=request,
        choices=[AuditedChoice(index=i, token_ids=choice, finished=False) for i, choice in enumerate(ids)],
    )
    report = AUDIT_REPORT.validate_python((await auditor.audit(job))[1])
    assert report.prompt_tokens == sum(len(prompt.tokens) for prompt in prompts)
    assert [choice.text for choice in report.choices] == [" blue and deep", " south"]
    assert [len(choice.gaps) for choice in report.choices] == [len(ids[0]), len(ids[1])]


async def test_bad_audits_are_refused_with_the_parameter_at_fault(auditor: Auditor) -> None:
    """A model the auditor does not serve, ids outside the vocabulary, an answer beyond the context, a
    choice without a prompt, and a job with no or two requests."""
    request = chat("Hi")
    cases = [
        (
            AuditJob(
                model="other", chat=request, choices=[AuditedChoice(index=0, token_ids=[1], finished=False)]
            ),
            ErrorCode.MODEL_NOT_FOUND,
            "model",
        ),
        (
            AuditJob(
                model="smol",
                chat=request,
                choices=[AuditedChoice(index=0, token_ids=[10**7], finished=False)],
            ),
            ErrorCode.INVALID_REQUEST,
            "choices",
        ),
        (
            AuditJob(
                model="smol",
                chat=request,
                choices=[AuditedChoice(index=0, token_ids=[5] * 2000, finished=False)],
            ),
            ErrorCode.CONTEXT_LENGTH_EXCEEDED,
            "messages",
        ),
        (
            AuditJob(
                model="smol", chat=request, choices=[AuditedChoice(index=3, token_ids=[5], finished=False)]
            ),
            ErrorCode.INVALID_REQUEST,
            "choices",
        ),
    ]
    for job, code, param in cases:
        with pytest.raises(EngineError) as caught:
            await auditor.audit(job)
        assert (caught.value.code, caught.value.param) == (code, param)
    with pytest.raises(ValidationError, match="exactly one of chat and completion"):
        AuditJob(model="smol", choices=[AuditedChoice(index=0, token_ids=[1], finished=False)])


def sampled(prompt: str, seed: int | None, **fields: Any) -> ChatCompletionRequest:
    """A streamed chat request sampled at temperature 0.8 (with `seed`, if not None)."""
    extra = {} if seed is None else {"seed": seed}
    return chat(prompt, temperature=0.8, **extra, **fields)


@pytest.fixture(scope="module")
def q4_0(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BatchedModel]:
    """The engine on a Q4_0 quantization of the bundled Q4_1 file, made here."""
    target = tmp_path_factory.mktemp("q4_0") / "q4_0.gguf"
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0
    params.allow_requantize = True
    assert llama_cpp.llama_model_quantize(str(CONFIG.path).encode(), str(target).encode(), params) == 0
    model = BatchedModel.load(ModelConfig(id="smol", path=target, n_ctx=1024), parallel=1, threads=1)
    yield model
    model.close()


def test_a_draw_is_a_sliver_of_probability_from_the_token_next_to_it() -> None:
    """The distance between a returned token and the replayed draw is the mass strictly between them in
    the order the draw walks; a token the sampler dropped is a whole distribution away."""
    order = np.array([4, 2, 7, 9], dtype=np.int32)
    weights = np.array([0.1, 0.2, 0.3, 0.4])
    assert mass_between(order, weights, 4, 4) == 0.0
    assert mass_between(order, weights, 4, 2) == 0.0
    assert mass_between(order, weights, 9, 4) == pytest.approx(0.5)
    assert mass_between(order, weights, 2, 5) == 1.0


async def test_honest_seeded_samples_from_a_batch_of_two_pass_the_replay(
    engine: BatchedModel, auditor: Auditor
) -> None:
    """Seeded answers at temperature 0.8 decoded two at a time are the draws of their own sampler
    replayed on the auditor's logits: most tokens exactly, the rest a sliver of probability away."""
    requests = [sampled(prompt, 100 + index) for index, prompt in enumerate(PROMPTS)]
    answers = await asyncio.gather(*(answer(engine, request) for request in requests))
    for request, ids, text, finish, prompt in answers:
        verdict, report = await audited(auditor, request, ids, text, finish == "stop", prompt)
        assert verdict == Verdict(False, ())
        scored = report.choices[0]
        assert scored.replay_distances is not None
        assert scored.sampled_p is not None
        assert len(scored.replay_distances) == len(scored.sampled_p) == len(ids)
        assert sum(distance == 0 for distance in scored.replay_distances) >= len(ids) * 0.7
        assert sorted([0.0, *scored.replay_distances])[-2] < 0.05  # the rule allows one far draw
        assert min(scored.sampled_p) > 0


async def test_a_sampled_answer_of_another_seed_or_another_quantization_fails_the_replay(
    engine: BatchedModel, auditor: Auditor, q4_0: BatchedModel
) -> None:
    """A worker that ignores the client's seed, or samples from a Q4_0 file posing as Q4_1, draws
    tokens far from the replay of the seeded sampler on the trusted logits: flagged. (A Q4_0 answer is
    flagged 38 times in 40, docs/verification.md: two of three is what this asserts of it.)"""
    liar_flags = 0
    for index, prompt in enumerate(PROMPTS):
        _, ids, text, finish, tokens = await answer(engine, sampled(prompt, 7))
        verdict, _ = await audited(auditor, sampled(prompt, 8), ids, text, finish == "stop", tokens)
        assert any("from the seeded sampler's replay" in reason for reason in verdict.reasons), index
        request, ids, text, finish, tokens = await answer(q4_0, sampled(prompt, 205 + index))
        verdict, _ = await audited(auditor, request, ids, text, finish == "stop", tokens)
        liar_flags += any("from the seeded sampler's replay" in reason for reason in verdict.reasons)
    assert liar_flags >= 2


async def test_sampled_tokens_the_requests_top_k_drops_are_flagged_without_a_seed(
    engine: BatchedModel, auditor: Auditor
) -> None:
    """Without a seed nothing can be replayed, but a worker may draw only what the request's top-k (or
    top-p, min-p) allow: tokens from outside them are flagged; the honest answer is not."""
    request, ids, text, finish, prompt = await answer(engine, sampled(PROMPTS[0], None, top_k=5))
    verdict, report = await audited(auditor, request, ids, text, finish == "stop", prompt)
    assert verdict == Verdict(False, ())
    assert report.choices[0].replay_distances is None
    rng = random.Random(3)
    noise = [rng.randrange(100, engine.weights.vocab.n_tokens) for _ in ids]
    verdict, _ = await audited(auditor, request, noise, engine.weights.detokenize(noise), False, prompt)
    assert any("top-k, top-p or min-p do not allow" in reason for reason in verdict.reasons)


async def test_a_possession_challenge_is_the_hash_of_the_asked_bytes(tmp_path: Path) -> None:
    """The hash of a range over a split model's parts in order; a range past the end is refused."""
    parts = [tmp_path / "a.gguf", tmp_path / "b.gguf"]
    parts[0].write_bytes(b"0123456789")
    parts[1].write_bytes(b"abcdefghij")
    report = range_sha256(parts, 7, 6)
    assert report.sha256 == hashlib.sha256(b"789abc").hexdigest()
    assert report.size_bytes == 20
    with pytest.raises(EngineError, match="runs past the end"):
        range_sha256(parts, 15, 6)
    possession = Possession({"m": parts})
    _, response = await possession.answer(ChallengeJob(model="m", offset=0, length=20))
    assert (
        CHALLENGE_REPORT.validate_python(response).sha256
        == hashlib.sha256(b"0123456789abcdefghij").hexdigest()
    )
    with pytest.raises(EngineError) as caught:
        await possession.answer(ChallengeJob(model="other", offset=0, length=1))
    assert caught.value.code == ErrorCode.MODEL_NOT_FOUND
