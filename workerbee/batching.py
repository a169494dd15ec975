"""Continuous batching: one llama.cpp context generates for up to `parallel` chat requests at once.

llama-cpp-python's `Llama` decodes one sequence at a time, so N requests on one model take N times as
long. `BatchedModel` is the engine's backend for plain chat requests: every running request is a
sequence of one llama.cpp context (llama_context.py), advanced together by the model's scheduler thread
(scheduler.py), sampled per sequence (sampling.py), with stop sequences and UTF-8 handled in
detokenize.py. Chunks take the same shape as on the engine's other path (choices.py).

Each sequence has a KV stream of its own of the model's full context length (not unified): a token
attends only to its own sequence's cells, so a sequence's numbers, and its greedy text, do not depend
on which others share the batch.

The event loop never blocks: templating and tokenizing run in a worker thread, and the scheduler posts
events with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Any

from protocol import ErrorCode, Usage
from protocol.openai import ChatCompletionRequest
from workerbee.choices import ChatChoice
from workerbee.decoding import Cancelled, Generation, Piece, choice_seeds
from workerbee.engine import ChunkSink, EngineError, LoadedModel, chat_sampling
from workerbee.llama_context import MultiSequenceContext, TokenBatch, Vocabulary
from workerbee.scheduler import (
    MIN_PROMPT_CHUNK,
    Failed,
    Finished,
    Job,
    RequestEvent,
    Scheduler,
    Started,
    TextReady,
)
from workerbee.threads import ThreadChoice, ThreadTuner, choose_threads, thread_candidates

log = logging.getLogger("workerbee.batching")

MAX_BATCH = 512
"""Tokens one decode call takes at most (llama-cpp-python's n_batch)."""


class BatchedModel:
    """The batched backend of one loaded model: plain chat requests, up to `parallel` at once."""

    def __init__(self, model: LoadedModel, scheduler: Scheduler, threads: ThreadChoice) -> None:
        self.model = model
        self.scheduler = scheduler
        self.threads = threads
        self.n_ctx = int(model.llama.n_ctx())

    @classmethod
    def create(cls, model: LoadedModel, *, parallel: int, threads: int | None) -> BatchedModel:
        """Make the model's batching context (blocking). `threads` None: measure the best count first.

        The measured count is applied to the model's own llama-cpp-python context too.
        """
        import llama_cpp

        llama = model.llama
        n_ctx_seq = int(llama.n_ctx())
        vocab = Vocabulary(llama.model)
        n_batch = max(MAX_BATCH, parallel + MIN_PROMPT_CHUNK)
        context = MultiSequenceContext(
            llama.model,
            llama.context_params,
            n_seq=parallel,
            n_ctx_seq=n_ctx_seq,
            n_batch=n_batch,
            threads=threads or 1,
        )
        try:
            if context.n_ctx_seq < n_ctx_seq:
                raise RuntimeError(f"llama.cpp gave {context.n_ctx_seq} tokens per sequence, not {n_ctx_seq}")
            choice = measure_threads(context, fixed=threads)
            context.set_threads(choice.threads)
            llama_cpp.llama_set_n_threads(llama.ctx, choice.threads, choice.threads)
        except BaseException:
            context.close()
            raise
        log.info(
            "model %s: batching %d sequences of %d tokens; %s",
            model.config.id,
            parallel,
            n_ctx_seq,
            choice.describe(),
        )
        token_seconds = choice.timings.get(choice.threads, 0.05) / parallel
        # A count given with --threads is kept; a measured one is only where tuning starts.
        tuner = ThreadTuner(thread_candidates(), choice.threads) if threads is None else None
        scheduler = Scheduler(context, vocab, name=model.config.id, token_seconds=token_seconds, tuner=tuner)
        return cls(model, scheduler, choice)

    @staticmethod
    def supports(chat: ChatCompletionRequest) -> bool:
        """Whether this backend runs `chat`: one plain text choice, without log probabilities or grammars."""
        return (
            (chat.n or 1) == 1
            and not chat.logprobs
            and not chat.tools
            and (chat.response_format is None or chat.response_format.type == "text")
        )

    def _check(self, chat: ChatCompletionRequest, prompt: list[int]) -> int:
        """Refuse what cannot run; returns the number of tokens to generate at most."""
        if len(prompt) >= self.n_ctx:
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {self.n_ctx} tokens, "
                f"but the messages take {len(prompt)} tokens.",
                "messages",
            )
        limit = chat.token_limit
        if limit is not None and len(prompt) + limit > self.n_ctx:
            param = "max_completion_tokens" if chat.max_completion_tokens is not None else "max_tokens"
            raise EngineError(
                ErrorCode.CONTEXT_LENGTH_EXCEEDED,
                f"This model's maximum context length is {self.n_ctx} tokens. However, you requested "
                f"{len(prompt) + limit} tokens ({len(prompt)} in the messages, {limit} in the completion).",
                param,
            )
        n_vocab = self.scheduler.vocab.n_tokens
        for token in chat.logit_bias or {}:
            if not 0 <= int(token) < n_vocab:
                raise EngineError(
                    ErrorCode.INVALID_REQUEST,
                    f"token id {token} is out of range: the vocabulary has {n_vocab}",
                    "logit_bias",
                )
        room = self.n_ctx - len(prompt)
        return room if limit is None else min(limit, room)

    async def chat(
        self, chat: ChatCompletionRequest, cancel: threading.Event, on_chunk: ChunkSink
    ) -> tuple[Usage, dict[str, Any] | None]:
        """Run a chat completion in the batch; streamed chunks go to `on_chunk`.

        Raises Cancelled, with the usage so far, if `cancel` is set before it ends; if this coroutine is
        cancelled, the sequence leaves the batch at the next step.
        """
        # The template and the tokenizer are CPU work: off the event loop, beside the decoding thread.
        prompt = await asyncio.to_thread(self.model.chat_prompt, chat)
        limit = self._check(chat, prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[RequestEvent] = asyncio.Queue()

        def post(event: RequestEvent) -> None:
            # A closed loop refuses the call: nobody waits for this request any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(
            prompt=prompt,
            sampling=chat_sampling(chat),
            seed=choice_seeds(chat.seed, 1)[0],
            limit=limit,
            stream=chat.stream,
            cancel=cancel,
            post=post,
        )
        if limit <= 0:
            job.post(Started())
            job.post(Finished("", "", "length", 0))
        else:
            self.scheduler.submit(job)
        chunks: list[tuple[dict[str, Any], int]] = []

        def collect(chunk: dict[str, Any], tokens: int) -> None:
            chunks.append((chunk, tokens))

        choice: ChatChoice | None = None
        result: Finished | None = None
        whole: dict[str, Any] = {}
        ended = False  # the scheduler is done with the request
        try:
            while result is None:
                # Everything posted while on_chunk was busy is handled at once: text becomes one chunk.
                ready = [await events.get()]
                while not events.empty():
                    ready.append(events.get_nowait())
                for event in _merge_text(ready):
                    if isinstance(event, Started):
                        choice = ChatChoice(
                            index=0,
                            tool_mode="none",
                            logprobs=False,
                            fingerprint=self.model.fingerprint,
                            emit=collect if chat.stream else None,
                        )
                    elif isinstance(event, Failed):
                        ended = True
                        if isinstance(event.error, Cancelled):
                            generated = event.error.generated
                            raise Cancelled(
                                generated,
                                Usage(
                                    prompt_tokens=len(prompt),
                                    completion_tokens=generated,
                                    total_tokens=len(prompt) + generated,
                                ),
                            )
                        raise event.error
                    elif choice is None:
                        raise AssertionError(f"{event} before the request started")
                    elif isinstance(event, TextReady):
                        choice.on_piece(Piece(event.text, [], event.tokens))
                    else:
                        result = event
                        ended = True
                        if event.tail:
                            choice.on_piece(Piece(event.tail, [], event.tail_tokens))
                        whole = choice.finish(
                            Generation(event.text, event.finish_reason, event.completion_tokens, None)
                        )
                for chunk, tokens in chunks:
                    await on_chunk(chunk, tokens)
                chunks.clear()
        finally:
            if not ended:
                cancel.set()
                self.scheduler.poke()
        usage = Usage(
            prompt_tokens=len(prompt),
            completion_tokens=result.completion_tokens,
            total_tokens=len(prompt) + result.completion_tokens,
        )
        if chat.stream:
            return usage, None
        return usage, {
            "object": "chat.completion",
            "choices": [whole],
            "system_fingerprint": self.model.fingerprint,
        }

    def close(self) -> None:
        """Stop the batching thread and free its llama.cpp context."""
        self.scheduler.close()


def _merge_text(events: list[RequestEvent]) -> list[RequestEvent]:
    """The events in order, with each run of text events joined into one."""
    merged: list[RequestEvent] = []
    for event in events:
        if isinstance(event, TextReady) and merged and isinstance(merged[-1], TextReady):
            merged[-1] = TextReady(merged[-1].text + event.text, merged[-1].tokens + event.tokens)
        else:
            merged.append(event)
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
