"""The auditor mode of a worker (`workerbee --auditor-token ...`): score delivered answers on a trusted copy.

An audit renders the request's prompt with this worker's own copy of the model (its own prompt count),
appends each choice's returned token ids and decodes the whole with one teacher-forced prefill, reading
the logits at every completion position: how far below the best token each returned token is (the
"gap", in nats), its rank, and the probability of ending generation there. The prefill uses a context
of its own on the same weights, a fixed batch size and no prompt cache, so that the numbers depend on
nothing but the model file and the tokens (docs/verification.md).

A sampled answer (temperature above 0) is also replayed through the worker's own sampler
(workerbee/sampling.py: logit bias, penalties, top-k, top-p, min-p, temperature, then a draw seeded per
choice with `seed + index`, llama.cpp's chain) on the trusted logits, the returned tokens fed back in:
each token's probability in the distribution the sampler draws from, and, when the request has a seed,
how far each returned token is from the replayed draw (`replay_choice`). An honest worker draws the
replay's token, or one a sliver of probability away where its own logits moved the boundaries a little.

`score_rows` is the sans-I/O core; `Auditor` owns one scoring context per model and runs every audit
on its single thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import numpy.typing as npt

from protocol import AuditJob, ErrorCode, Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest
from protocol.verification import AuditReport, ScoredChoice
from workerbee.batching import BatchedModel
from workerbee.decoding import Sampling, choice_seeds
from workerbee.errors import EngineError
from workerbee.llama_context import MultiSequenceContext, TokenBatch
from workerbee.prompts import request_sampling
from workerbee.sampling import SamplerChain

AUDIT_BATCH = 512
"""Tokens per decode call of a prefill: fixed, whatever the audited worker used."""


def score_rows(
    rows: npt.NDArray[np.float32], ids: Sequence[int], eog: Sequence[int], index: int, text: str
) -> ScoredChoice:
    """The scores of a choice from its logits: len(ids) + 1 rows, the last one after the last token.

    Row i holds the logits that predict token i. The gap is a difference of log-probabilities of one
    row, so the normalizer cancels: it is the difference of the logits.
    """
    if rows.shape[0] != len(ids) + 1:
        raise ValueError(f"{rows.shape[0]} rows for {len(ids)} tokens")
    best = rows.max(axis=1)
    # float64 for the normalizer: a sum over tens of thousands of exponentials.
    shifted = np.exp((rows - best[:, None]).astype(np.float64))
    normalizer = shifted.sum(axis=1)
    eog_index = np.asarray(eog, dtype=np.intp)
    eos = shifted[:, eog_index].sum(axis=1) / normalizer if eog_index.size else np.zeros(len(rows))
    best_is_eos = np.isin(rows.argmax(axis=1), eog_index)
    taken = np.asarray(ids, dtype=np.intp)
    chosen = rows[np.arange(len(taken)), taken]
    gaps = best[: len(taken)] - chosen
    ranks = (rows[: len(taken)] > chosen[:, None]).sum(axis=1)
    return ScoredChoice(
        index=index,
        gaps=[round(float(gap), 6) for gap in gaps],
        ranks=[int(rank) for rank in ranks],
        eos=[round(float(value), 6) for value in eos],
        best_is_eos=[bool(value) for value in best_is_eos[: len(taken)]],
        text=text,
    )


def replay_choice(
    sampler: SamplerChain, rows: npt.NDArray[np.float32], ids: Sequence[int], eog: Sequence[int]
) -> tuple[list[float], list[float], float]:
    """Replay a sampled choice through the worker's sampler on the trusted rows (len(ids) + 1 of them).

    Returns, per returned token, its probability in the distribution drawn from and its distance from
    the replayed draw (the probability mass strictly between the two in the order the draw walks the
    tokens: 0 when the draw is the token, 1 when the sampler drops it), and the same distance for the
    end of generation after the last token (the nearest end token).
    """
    probabilities: list[float] = []
    distances: list[float] = []
    for row, token in zip(rows[: len(ids)], ids, strict=True):
        drawn, order, weights = sampler.replay(row, token)
        probabilities.append(float(weights[order == token].sum()))
        distances.append(mass_between(order, weights, drawn, token))
    drawn, order, weights = sampler.replay(rows[len(ids)], eog[0] if eog else 0)
    end = min((mass_between(order, weights, drawn, token) for token in eog), default=1.0)
    return probabilities, distances, end


def mass_between(
    order: npt.NDArray[np.int32], weights: npt.NDArray[np.float64], drawn: int, token: int
) -> float:
    """The probability mass strictly between `drawn` and `token` in `order` (1 if `token` is not in it).

    A draw walks the tokens in order, summing their probabilities until it passes a uniform number: a
    worker whose logits differ a little from the auditor's draws a token a little mass away.
    """
    if drawn == token:
        return 0.0
    where = np.flatnonzero(order == token)
    there = np.flatnonzero(order == drawn)
    if where.size == 0 or there.size == 0:
        return 1.0
    low, high = sorted((int(where[0]), int(there[0])))
    return float(weights[low + 1 : high].sum())


def _chunks(start: int, stop: int, size: int) -> Iterator[tuple[int, int]]:
    for first in range(start, stop, size):
        yield first, min(stop, first + size)


class ModelScorer:
    """One model's scoring context: a single sequence, AUDIT_BATCH tokens per decode (blocking)."""

    def __init__(self, model: BatchedModel, threads: int) -> None:
        self.model = model
        self.context = MultiSequenceContext(
            model.weights, n_seq=1, n_ctx_seq=model.config.n_ctx, n_batch=AUDIT_BATCH, threads=threads
        )
        self.batch = TokenBatch(AUDIT_BATCH)

    def prefill(self, prompt: Sequence[int], ids: Sequence[int]) -> npt.NDArray[np.float32]:
        """The logits after the prompt's last token and after each of `ids`, one row each."""
        tokens = [*prompt, *ids]
        if not prompt:
            raise EngineError(ErrorCode.INVALID_REQUEST, "the audited prompt is empty", "prompt")
        if len(tokens) > self.context.n_ctx_seq:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"the audited answer takes {len(tokens)} tokens, more than the context of "
                f"{self.context.n_ctx_seq}",
                "messages",
            )
        first_scored = len(prompt) - 1
        rows = np.empty((len(ids) + 1, self.context.n_vocab), dtype=np.float32)
        row = 0
        self.context.remove(0)
        try:
            for start, stop in _chunks(0, len(tokens), AUDIT_BATCH):
                self.batch.clear()
                for position in range(start, stop):
                    self.batch.add(tokens[position], position, 0, position >= first_scored)
                self.context.decode(self.batch)
                for position in range(max(start, first_scored), stop):
                    rows[row] = self.context.logits_row(position - start)
                    row += 1
        finally:
            self.context.remove(0)
        return rows

    def audit(self, job: AuditJob) -> AuditReport:
        """Score every choice of a delivered answer."""
        started = time.perf_counter()
        prompts = self.model.prompts
        if job.chat is not None:
            prompt_list = [prompts.chat_prompt(job.chat)]
            per_prompt = job.chat.n or 1
        else:
            assert job.completion is not None
            prompt_list = [prompt.tokens for prompt in prompts.completion_prompts(job.completion)]
            per_prompt = job.completion.n or 1
        eog = self.model.weights.vocab.eog_tokens
        request = job.chat if job.chat is not None else job.completion
        assert request is not None
        sampling = self._sampling(request)
        seeds = choice_seeds(request.seed, per_prompt) if sampling is not None else []
        scored: list[ScoredChoice] = []
        for choice in job.choices:
            which = choice.index // per_prompt
            if which >= len(prompt_list):
                raise EngineError(
                    ErrorCode.INVALID_REQUEST,
                    f"choice {choice.index} has no prompt in the request",
                    "choices",
                )
            prompts.check_token_ids(choice.token_ids, "choices")
            rows = self.prefill(prompt_list[which], choice.token_ids)
            text = self.model.weights.detokenize(choice.token_ids)
            score = score_rows(rows, choice.token_ids, eog, choice.index, text)
            if sampling is not None:
                seed = seeds[choice.index % per_prompt]
                banned = eog if sampling.ignore_eos else ()
                sampler = SamplerChain(sampling, vocab=self.model.weights.vocab, seed=seed, banned=banned)
                try:
                    probabilities, distances, end = replay_choice(sampler, rows, choice.token_ids, eog)
                finally:
                    sampler.close()
                # Without a seed the worker's draws were random: only the probabilities say anything.
                seeded = request.seed is not None
                update = {
                    "sampled_p": [round(value, 9) for value in probabilities],
                    "replay_distances": [round(value, 9) for value in distances] if seeded else None,
                    "replay_end_distance": round(end, 9) if seeded else None,
                }
                score = score.model_copy(update=update)
            scored.append(score)
        return AuditReport(
            prompt_tokens=sum(len(prompt) for prompt in prompt_list),
            choices=scored,
            seconds=round(time.perf_counter() - started, 6),
        )

    @staticmethod
    def _sampling(request: ChatCompletionRequest | CompletionRequest) -> Sampling | None:
        """The worker's sampling for a request that samples with the model's own distribution; None for
        greedy ones and for grammars (tools, response formats), which this replay does not follow."""
        if isinstance(request, ChatCompletionRequest) and (
            (request.tools and request.tool_mode != "none") or request.response_format is not None
        ):
            return None
        sampling = request_sampling(request)
        if sampling.temperature <= 0 or sampling.top_k == 1:
            return None
        return sampling

    def close(self) -> None:
        """Free the context and its batch."""
        self.batch.close()
        self.context.close()


class Auditor:
    """Scores audit jobs for every model the worker serves, one at a time on a thread of its own."""

    def __init__(self, scorers: dict[str, ModelScorer]) -> None:
        self._scorers = scorers
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="auditor")

    @classmethod
    def for_models(cls, models: dict[str, BatchedModel], threads: int = 1) -> Auditor:
        """A scoring context on each loaded model's weights (blocking)."""
        scorers: dict[str, ModelScorer] = {}
        try:
            for model_id, model in models.items():
                scorers[model_id] = ModelScorer(model, threads)
        except BaseException:
            for scorer in scorers.values():
                scorer.close()
            raise
        return cls(scorers)

    async def audit(self, job: AuditJob) -> tuple[Usage, dict[str, Any]]:
        """Score a delivered answer; the Result's response is the AuditReport."""
        scorer = self._scorers.get(job.model)
        if scorer is None:
            raise EngineError(
                ErrorCode.MODEL_NOT_FOUND, f"this auditor does not serve '{job.model}'", "model"
            )
        loop = asyncio.get_running_loop()
        report = await loop.run_in_executor(self._thread, scorer.audit, job)
        return Usage(prompt_tokens=0, completion_tokens=0, total_tokens=0), report.model_dump(mode="json")

    def close(self) -> None:
        """Stop the thread and free every scoring context."""
        self._thread.shutdown(wait=True)
        for scorer in self._scorers.values():
            scorer.close()
