"""One model's engine: every generating request in one continuous batch, embeddings in a pooled one.

`BatchedModel` owns a model's weights (llama_context.py) and the contexts on them: the generating
context, whose KV cache keeps a stream per sequence (`parallel` of them, each of the model's full
context length), run by the scheduler's thread (scheduler.py); and with --embeddings a pooled context
run by the embeddings thread (embeddings.py). Nothing else decodes: there is no second path.

A request becomes, on a worker thread (prompts.py): prompt tokens, checked against the context, and a
sampler for each choice (its seed, its grammar from tools or response_format). Its choices then run as
jobs of at most `parallel` choices each, every job decoding its prompt once (a chat request with n
choices: one job of n, if n fits; a text completion: a job per prompt). Events come back through
`call_soon_threadsafe`; choices.py shapes them into OpenAI's chunks and objects.

A token attends only to its own sequence's cells, so a sequence's numbers, and its greedy text, do not
depend on which others share the batch.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from protocol import ErrorCode, ModelInfo, PromptTokensDetails, Resume, Usage
from protocol.openai import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from workerbee.answer_ids import WithTokenIds
from workerbee.cache_ram import HostCache
from workerbee.choices import ChatChoice, CompletionChoice
from workerbee.decoding import Generation, Piece, Sampling, choice_seeds
from workerbee.detokenize import TextAssembler
from workerbee.embeddings import Embedder, EmbeddingJob, Vector
from workerbee.engine import ChunkSink
from workerbee.errors import Cancelled, EngineError, ModelLoadError
from workerbee.llama_context import EmbeddingContext, ModelWeights, MultiSequenceContext, TokenBatch
from workerbee.prefix_cache import Block, PromptBlocks, chat_blocks, text_blocks
from workerbee.prompts import ModelConfig, Prompts, request_sampling
from workerbee.sampling import GrammarRefused, SamplerChain
from workerbee.scheduler import (
    MIN_PROMPT_CHUNK,
    Failed,
    Finished,
    Job,
    JobChoice,
    RequestEvent,
    Scheduler,
    Started,
    TextReady,
)
from workerbee.threads import ThreadChoice, ThreadTuner, choose_threads, thread_candidates

log = logging.getLogger("workerbee.batching")

MAX_BATCH = 512
"""Tokens one decode call takes at most."""
EMBEDDING_SEQUENCES = 16
"""Inputs one embeddings decode takes at most."""

AnyChoice = ChatChoice | CompletionChoice


class BatchedModel:
    """One loaded model: its requests, up to `parallel` sequences at once."""

    def __init__(
        self,
        config: ModelConfig,
        weights: ModelWeights,
        scheduler: Scheduler,
        threads: ThreadChoice,
        embedder: Embedder | None = None,
    ) -> None:
        self.config = config
        self.weights = weights
        self.prompts = Prompts(config, weights)
        self.scheduler = scheduler
        self.threads = threads
        self.embedder = embedder
        self.parallel = scheduler.context.n_seq
        self.fingerprint = self.prompts.fingerprint

    @property
    def cache_version(self) -> int:
        """Bumped whenever `cached_prefixes` changes."""
        return self.scheduler.cache_version

    def cached_prefixes(self) -> list[Block]:
        """The prefixes this model's caches hold, as the queen names them (any thread)."""
        return self.scheduler.cached_prefixes()

    @classmethod
    def load(cls, config: ModelConfig, *, parallel: int, threads: int | None) -> BatchedModel:
        """Load a GGUF and make its contexts (blocking). `threads` None: measure the best count first.

        Raises ModelLoadError with one clear line.
        """
        if not config.path.is_file():
            raise ModelLoadError(f"model file not found: {config.path}")
        try:
            weights = ModelWeights(
                config.path,
                n_gpu_layers=config.n_gpu_layers,
                main_gpu=config.main_gpu,
                tensor_split=config.tensor_split,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise ModelLoadError(f"could not load {config.path}: {exc}") from None
        try:
            return cls._on_weights(config, weights, parallel=parallel, threads=threads)
        except BaseException:
            weights.close()
            raise

    @classmethod
    def _on_weights(
        cls, config: ModelConfig, weights: ModelWeights, *, parallel: int, threads: int | None
    ) -> BatchedModel:
        n_batch = max(MAX_BATCH, parallel + MIN_PROMPT_CHUNK)
        try:
            context = MultiSequenceContext(
                weights, n_seq=parallel, n_ctx_seq=config.n_ctx, n_batch=n_batch, threads=threads or 1
            )
        except RuntimeError as exc:
            raise ModelLoadError(f"could not load {config.path}: {exc}") from None
        try:
            if context.n_ctx_seq < config.n_ctx:
                raise ModelLoadError(
                    f"llama.cpp gave {context.n_ctx_seq} tokens per sequence, not {config.n_ctx}"
                )
            choice = measure_threads(context, fixed=threads)
            context.set_threads(choice.threads)
        except BaseException:
            context.close()
            raise
        log.info(
            "model %s: batching %d sequences of %d tokens; %s",
            config.id,
            parallel,
            config.n_ctx,
            choice.describe(),
        )
        token_seconds = choice.timings.get(choice.threads, 0.05) / parallel
        # A count given with --threads is kept; a measured one is only where tuning starts.
        tuner = ThreadTuner(thread_candidates(), choice.threads) if threads is None else None
        host_cache = HostCache(config.cache_ram * 2**20) if config.cache_ram else None
        scheduler = Scheduler(
            context,
            weights.vocab,
            name=config.id,
            token_seconds=token_seconds,
            tuner=tuner,
            host_cache=host_cache,
        )
        embedder = None
        if config.embeddings:
            try:
                pooled = EmbeddingContext(
                    weights, n_ctx=config.n_ctx, n_seq=EMBEDDING_SEQUENCES, threads=choice.threads
                )
            except RuntimeError as exc:
                scheduler.close()
                raise ModelLoadError(f"could not load {config.path} for embeddings: {exc}") from None
            embedder = Embedder(pooled, name=config.id)
        return cls(config, weights, scheduler, choice, embedder)

    def info(self) -> ModelInfo:
        """How the model is advertised to the queen."""
        return ModelInfo(
            id=self.config.id,
            n_ctx=self.config.n_ctx,
            size_bytes=self.config.size_bytes,
            n_gpu_layers=self.config.n_gpu_layers,
            embeddings=self.embedder is not None,
            sha256=self.config.sha256,
        )

    def _samplers(self, sampling: Sampling, seeds: Sequence[int], param: str | None) -> list[SamplerChain]:
        banned = self.weights.vocab.eog_tokens if sampling.ignore_eos else ()
        samplers: list[SamplerChain] = []
        try:
            for seed in seeds:
                samplers.append(SamplerChain(sampling, vocab=self.weights.vocab, seed=seed, banned=banned))
        except GrammarRefused as exc:
            for sampler in samplers:
                sampler.close()
            raise EngineError(ErrorCode.INVALID_REQUEST, f"unsupported JSON schema: {exc}", param) from None
        except BaseException:
            for sampler in samplers:
                sampler.close()
            raise
        return samplers

    def _prepare_chat(
        self, chat: ChatCompletionRequest
    ) -> tuple[list[int], int, Sampling, list[SamplerChain], PromptBlocks]:
        prompt = self.prompts.chat_prompt(chat)
        limit = self.prompts.check_fits(len(prompt), chat)
        self.prompts.check_token_ids([int(token) for token in chat.logit_bias or ()], "logit_bias")
        grammar, param = self.prompts.chat_grammar(chat)
        sampling = request_sampling(chat, grammar)
        blocks = chat_blocks(self.prompts, chat, prompt)
        samplers = self._samplers(sampling, choice_seeds(chat.seed, chat.n or 1), param)
        return prompt, limit, sampling, samplers, blocks

    async def chat(
        self,
        chat: ChatCompletionRequest,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        resume: Resume | None = None,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a chat completion in the batch; streamed chunks go to `on_chunk`; `resume`: continue it.

        Everything that can be refused is checked before the request joins the batch. Raises Cancelled,
        with the usage so far, if `cancel` is set before it ends; if this coroutine is cancelled, its
        sequences leave the batch at the next step.
        """
        # The template, the tokenizer and the grammar are CPU work: off the event loop.
        prompt, limit, sampling, samplers, blocks = await asyncio.to_thread(self._prepare_chat, chat)
        n = len(samplers)

        def make(index: int, emit: Callable[[dict[str, Any], int], None] | None, resumed: bool) -> AnyChoice:
            return ChatChoice(
                index=index,
                tool_mode=chat.tool_mode,
                logprobs=bool(chat.logprobs),
                fingerprint=self.fingerprint,
                emit=emit,
                resumed=resumed,
            )

        ids: dict[int, list[int]] = {}
        choices, completion_tokens, cached = await self._run(
            [(prompt, limit, samplers)],
            sampling,
            make,
            chat.stream,
            cancel,
            on_chunk,
            n_prompt=len(prompt),
            resume=resume,
            blocks=[blocks],
            ids=ids,
        )
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=completion_tokens,
            total_tokens=len(prompt) + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
        if chat.stream:
            return usage, None
        assert len(choices) == (n if resume is None else len(resume.choices))
        response = {"object": "chat.completion", "choices": choices, "system_fingerprint": self.fingerprint}
        return usage, WithTokenIds(response, [ids.get(choice["index"], []) for choice in choices])

    def _prepare_completion(
        self, request: CompletionRequest
    ) -> tuple[list[tuple[list[int], int, list[SamplerChain]]], list[str], Sampling, list[PromptBlocks]]:
        prompts = self.prompts.completion_prompts(request)
        limits = [self.prompts.check_fits(len(prompt.tokens), request) for prompt in prompts]
        self.prompts.check_token_ids([int(token) for token in request.logit_bias or ()], "logit_bias")
        sampling = request_sampling(request)
        n = request.n or 1
        runs: list[tuple[list[int], int, list[SamplerChain]]] = []
        try:
            for prompt, limit in zip(prompts, limits, strict=True):
                runs.append(
                    (prompt.tokens, limit, self._samplers(sampling, choice_seeds(request.seed, n), None))
                )
        except BaseException:
            for _, _, samplers in runs:
                for sampler in samplers:
                    sampler.close()
            raise
        blocks = [
            text_blocks(self.weights, text, prompt.tokens)
            for text, prompt in zip(request.prompts, prompts, strict=True)
            if isinstance(text, str)
        ]
        if len(blocks) != len(prompts):
            blocks = [PromptBlocks() for _ in prompts]  # token-id prompts: nothing the queen can name
        return runs, [prompt.text for prompt in prompts], sampling, blocks

    async def complete(
        self,
        request: CompletionRequest,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        resume: Resume | None = None,
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Complete each prompt n times in the batch; streamed chunks go to `on_chunk`; `resume`: continue."""
        runs, texts, sampling, blocks = await asyncio.to_thread(self._prepare_completion, request)
        n = request.n or 1
        prompt_tokens = sum(len(tokens) for tokens, _, _ in runs)

        def make(index: int, emit: Callable[[dict[str, Any], int], None] | None, resumed: bool) -> AnyChoice:
            return CompletionChoice(
                index=index,
                logprobs=request.logprobs is not None,
                fingerprint=self.fingerprint,
                prompt=texts[index // n],
                echo=request.echo,
                emit=emit,
                resumed=resumed,
            )

        ids: dict[int, list[int]] = {}
        choices, completion_tokens, cached = await self._run(
            runs,
            sampling,
            make,
            request.stream,
            cancel,
            on_chunk,
            n_prompt=prompt_tokens,
            resume=resume,
            blocks=blocks,
            ids=ids,
        )
        usage = Usage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
        )
        if request.stream:
            return usage, None
        response = {"object": "text_completion", "choices": choices, "system_fingerprint": self.fingerprint}
        return usage, WithTokenIds(response, [ids.get(choice["index"], []) for choice in choices])

    async def _run(
        self,
        runs: list[tuple[list[int], int, list[SamplerChain]]],
        sampling: Sampling,
        make: Callable[[int, Callable[[dict[str, Any], int], None] | None, bool], AnyChoice],
        stream: bool,
        cancel: threading.Event,
        on_chunk: ChunkSink,
        *,
        n_prompt: int,
        resume: Resume | None = None,
        blocks: list[PromptBlocks] | None = None,
        ids: dict[int, list[int]] | None = None,
    ) -> tuple[list[dict[str, Any]], int, int]:
        """Generate every choice of every prompt (runs: tokens, limit, one sampler per choice).

        With `resume`, only its choices run, each as a job of its own that decodes the tokens already
        relayed after its prompt before it samples (see `_resumed_jobs`). `blocks` name each run's
        prompt prefixes for the cache summary; `ids` gets each choice's generated token ids (the end
        token excluded). Returns the whole choices in index order, the completion
        tokens of all of them (generated here, not the relayed ones) and the prompt tokens every job
        took from a cache instead of decoding them.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[Job, RequestEvent]] = asyncio.Queue()
        chunks: list[tuple[dict[str, Any], int]] = []

        def collect(chunk: dict[str, Any], tokens: int) -> None:
            chunks.append((chunk, tokens))

        jobs: list[Job] = []
        choices: dict[int, AnyChoice] = {}
        groups = self._groups(runs) if resume is None else self._resumed_jobs(runs, resume)
        named = {id(run[0]): prompt_blocks for run, prompt_blocks in zip(runs, blocks or (), strict=False)}
        cached = 0
        for prompt, limit, group in groups:
            job = Job(
                prompt=prompt,
                choices=group,
                stop=sampling.stop,
                top_logprobs=sampling.top_logprobs,
                limit=limit,
                stream=stream,
                cancel=cancel,
                post=lambda event: None,
                blocks=named.get(id(prompt), PromptBlocks()),
            )

            def post(event: RequestEvent, job: Job = job) -> None:
                self.scheduler.mailbox.post(loop, events.put_nowait, (job, event))

            job.post = post
            jobs.append(job)
        for job in jobs:
            for job_choice in job.choices:
                choice = make(job_choice.index, collect if stream else None, resume is not None)
                if job_choice.replay:
                    choice.replay(Piece(self._text_of(job_choice.replay, sampling.stop), []))
                choices[job_choice.index] = choice
        whole: dict[int, dict[str, Any]] = {}
        generated: dict[int, int] = {}
        open_jobs = len(jobs)
        submitted: list[Job] = []
        try:
            for job in jobs:
                if job.limit <= len(job.choices[0].replay):
                    job.close()
                    for job_choice in job.choices:
                        job.post(Finished(job_choice.index, "", "", "length", 0))
                else:
                    self.scheduler.submit(job)
                    submitted.append(job)
            while len(whole) < len(choices):
                # Everything posted while on_chunk was busy is handled at once: text becomes one chunk.
                ready = [await events.get()]
                while not events.empty():
                    ready.append(events.get_nowait())
                for job, event in _merge_text(ready):
                    if isinstance(event, Started):
                        cached += event.cached
                        continue
                    if isinstance(event, Failed):
                        open_jobs -= 1
                        submitted.remove(job)
                        if isinstance(event.error, Cancelled):
                            counted = sum(generated.get(c.index, 0) for c in job.choices)
                            others = sum(generated.values()) - counted
                            total = others + max(counted, event.error.generated)
                            raise Cancelled(
                                total,
                                Usage(
                                    prompt_tokens=n_prompt,
                                    completion_tokens=total,
                                    total_tokens=n_prompt + total,
                                ),
                            )
                        raise event.error
                    choice = choices[event.choice]
                    if isinstance(event, TextReady):
                        generated[event.choice] = generated.get(event.choice, 0) + event.tokens
                        if ids is not None:
                            ids.setdefault(event.choice, []).extend(event.ids)
                        choice.on_piece(Piece(event.text, event.logprobs, event.tokens, event.ids))
                    else:
                        generated[event.choice] = event.completion_tokens
                        if ids is not None:
                            ids.setdefault(event.choice, []).extend(event.tail_ids)
                        if event.tail or event.tail_logprobs:
                            choice.on_piece(
                                Piece(event.tail, event.tail_logprobs, event.tail_tokens, event.tail_ids)
                            )
                        whole[event.choice] = choice.finish(
                            Generation(
                                event.text,
                                event.finish_reason,
                                event.completion_tokens,
                                event.logprobs,
                                event.stop_sequence,
                            )
                        )
                        if all(c.index in whole for c in job.choices) and job in submitted:
                            submitted.remove(job)
                for chunk, tokens in chunks:
                    await on_chunk(chunk, tokens)
                chunks.clear()
        finally:
            if submitted:
                # Jobs still in the scheduler's hands: it stops them at the next step, and frees them.
                cancel.set()
                self.scheduler.poke()
        # A prompt split into several jobs (n beyond --parallel) is billed once: so is its cache.
        return [whole[i] for i in sorted(whole)], sum(generated.values()), min(cached, n_prompt)

    def _groups(
        self, runs: list[tuple[list[int], int, list[SamplerChain]]]
    ) -> list[tuple[list[int], int, list[JobChoice]]]:
        """The jobs of a request: each prompt's choices, at most `parallel` to a job, indexed in order."""
        groups: list[tuple[list[int], int, list[JobChoice]]] = []
        index = 0
        for prompt, limit, samplers in runs:
            for start in range(0, len(samplers), self.parallel):
                group = [
                    JobChoice(index + offset, sampler)
                    for offset, sampler in enumerate(samplers[start : start + self.parallel])
                ]
                index += len(group)
                groups.append((prompt, limit, group))
        return groups

    def _resumed_jobs(
        self, runs: list[tuple[list[int], int, list[SamplerChain]]], resume: Resume
    ) -> list[tuple[list[int], int, list[JobChoice]]]:
        """A job for each resumed choice: its prompt, the relayed tokens to replay, its sampler advanced.

        The limit stays the request's (the relayed tokens count towards it), lowered to what the queen
        says is left; the samplers of choices that are not resumed (finished ones) are freed.
        """
        wanted = {choice.index: choice for choice in resume.choices}
        groups: list[tuple[list[int], int, list[JobChoice]]] = []
        index = 0
        for prompt, limit, samplers in runs:
            for sampler in samplers:
                resumed = wanted.pop(index, None)
                if resumed is None:
                    sampler.close()
                else:
                    self.prompts.check_token_ids(resumed.token_ids, "resume")
                    replay = list(resumed.token_ids)
                    sampler.advance(replay)
                    if resumed.budget is not None:
                        limit = min(limit, len(replay) + resumed.budget)
                    groups.append((prompt, limit, [JobChoice(index, sampler, replay)]))
                index += 1
        if wanted:
            for _, _, group in groups:
                group[0].sampler.close()
            raise EngineError(ErrorCode.INVALID_REQUEST, f"no choice {min(wanted)} to resume", "resume")
        return groups

    def _text_of(self, tokens: list[int], stop: tuple[str, ...]) -> str:
        """The text the client was sent for a choice's first `tokens`."""
        assembler = TextAssembler(stop)
        return "".join(assembler.feed(self.weights.vocab.piece(token)) for token in tokens)

    def _prepare_embedding(self, request: EmbeddingRequest) -> list[list[int]]:
        if self.embedder is None:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"this worker does not serve embeddings for '{self.config.id}' (start it with --embeddings)",
                "model",
            )
        n_embd = self.weights.n_embd
        if request.dimensions is not None and request.dimensions != n_embd:
            raise EngineError(
                ErrorCode.INVALID_REQUEST,
                f"this model's embeddings have {n_embd} dimensions; other sizes are not supported",
                "dimensions",
            )
        n_ctx = self.embedder.context.n_ctx
        inputs: list[list[int]] = []
        for item in request.inputs:
            tokens = (
                self.weights.tokenize(item, add_bos=True, special=False)
                if isinstance(item, str)
                else list(item)
            )
            self.prompts.check_token_ids(tokens, "input")
            if len(tokens) > n_ctx:
                raise EngineError(
                    ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                    f"This model's maximum context length is {n_ctx} tokens, but an input has "
                    f"{len(tokens)} tokens.",
                    "input",
                )
            inputs.append(tokens)
        return inputs

    async def embed(self, request: EmbeddingRequest, cancel: threading.Event) -> tuple[Usage, dict[str, Any]]:
        """Embed every input: mean-pooled (unless the model says otherwise), unit length.

        The inputs are batched with those of every other embeddings request waiting.
        """
        inputs = await asyncio.to_thread(self._prepare_embedding, request)
        assert self.embedder is not None
        loop = asyncio.get_running_loop()
        result: asyncio.Future[list[Vector] | Exception] = loop.create_future()

        def done(outcome: list[Vector] | Exception) -> None:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_settle, result, outcome)

        job = EmbeddingJob(inputs, cancel, done)
        self.embedder.submit(job)
        try:
            outcome = await result
        finally:
            if not result.done():
                cancel.set()
        if isinstance(outcome, Exception):
            raise outcome
        data: list[dict[str, Any]] = []
        for index, raw in enumerate(outcome):
            norm = float(np.linalg.norm(raw))
            vector = raw / norm if norm > 0 else raw
            embedding: list[float] | str = (
                base64.b64encode(vector.astype("<f4").tobytes()).decode("ascii")
                if request.encoding_format == "base64"
                else vector.tolist()
            )
            data.append({"object": "embedding", "index": index, "embedding": embedding})
        total = sum(len(tokens) for tokens in inputs)
        return Usage(prompt_tokens=total, completion_tokens=0, total_tokens=total), {
            "object": "list",
            "data": data,
        }

    def close(self) -> None:
        """Stop the threads and free the contexts, then the weights."""
        self.scheduler.close()
        if self.embedder is not None:
            self.embedder.close()
        self.weights.close()


def _settle(future: asyncio.Future[list[Vector] | Exception], outcome: list[Vector] | Exception) -> None:
    if not future.done():
        future.set_result(outcome)


def _merge_text(events: list[tuple[Job, RequestEvent]]) -> list[tuple[Job, RequestEvent]]:
    """The events in order, with each run of one choice's text events joined into one."""
    merged: list[tuple[Job, RequestEvent]] = []
    for job, event in events:
        if merged and isinstance(event, TextReady):
            last_job, last = merged[-1]
            if isinstance(last, TextReady) and last.choice == event.choice:
                merged[-1] = (
                    last_job,
                    TextReady(
                        event.choice,
                        last.text + event.text,
                        last.tokens + event.tokens,
                        last.logprobs + event.logprobs,
                        last.ids + event.ids,
                    ),
                )
                continue
        merged.append((job, event))
    return merged


def measure_threads(context: MultiSequenceContext, *, fixed: int | None) -> ThreadChoice:
    """The thread count to decode with: `fixed` if given, else the fastest candidate on this machine now.

    A step decodes one token for every sequence (the steady state of a full batch) on a scratch position
    0, and the cells are freed after each step.
    """
    if fixed is not None:
        return ThreadChoice(fixed, {}, "set with --threads")
    candidates = thread_candidates()
    if len(candidates) == 1:
        return ThreadChoice(1, {}, "the only candidate: every other core is left to the rest of the system")
    batch = TokenBatch(context.n_seq)

    def step(threads: int) -> float:
        context.set_threads(threads)
        batch.clear()
        for seq_id in range(context.n_seq):
            batch.add(0, 0, seq_id, True)
        started = time.perf_counter()
        context.decode(batch)
        elapsed = time.perf_counter() - started
        for seq_id in range(context.n_seq):
            context.remove(seq_id)
        return elapsed

    try:
        step(1)  # the first decode pays for allocations
        return choose_threads(step, candidates)
    finally:
        batch.close()
