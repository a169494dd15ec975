"""Continuous batching: one llama.cpp context generates for up to `parallel` requests at once.

llama-cpp-python's `Llama` decodes one sequence at a time, so N requests on one model take N times as
long. Here every running request is a sequence of one llama.cpp context, and one `llama_decode` call
advances all of them: each step's batch holds the next token of every generating sequence and, within
a budget, a chunk of prompt tokens of newcomers.

- Requests join at the next step and leave when they finish; a newcomer's prompt is fed in chunks sized
  so that one step stays short (about STEP_TARGET_SECONDS) while others are generating, and whole when
  nobody is waiting on it.
- Each sequence has a KV stream of its own (see llama_context.py) of the model's full context length.
  Finished sequences leave their cells in place as a prompt cache: a newcomer takes the free slot whose
  cache shares the longest prefix with its prompt, or copies a longer one from another slot, and only
  decodes the rest. A cancelled sequence's cells are freed at once.
- Sampling is per sequence (sampling.py); bytes become text in detokenize.py; chunks take the same
  shape as on the engine's other path (choices.py).

All llama.cpp work runs on one thread per model, the scheduler's; the event loop only waits on events
that thread posts with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from protocol import ErrorCode, Usage
from protocol.openai import ChatCompletionRequest
from workerbee.choices import ChatChoice
from workerbee.decoding import Cancelled, FinishReason, Generation, Piece, Sampling, choice_seeds
from workerbee.detokenize import TextAssembler
from workerbee.engine import ChunkSink, EngineError, LoadedModel, chat_sampling
from workerbee.llama_context import (
    DecodeError,
    MultiSequenceContext,
    TokenBatch,
    Vocabulary,
    longest_common_prefix,
)
from workerbee.sampling import SamplerChain
from workerbee.threads import ThreadChoice, choose_threads, thread_candidates

log = logging.getLogger("workerbee.batching")

STEP_TARGET_SECONDS = 0.25
"""How long a step with prompt tokens may take while other sequences wait for their next token."""
MIN_PROMPT_CHUNK = 32
"""Prompt tokens a step takes at least, so that a long prompt still makes progress on a slow machine."""
MAX_BATCH = 512
"""Tokens one decode call takes at most (llama-cpp-python's n_batch)."""
COPY_MIN_TOKENS = 16
"""Prefix tokens another slot must have beyond a slot's own before its whole KV stream is copied over."""


@dataclass(frozen=True)
class _Started:
    """The request has a slot and its prompt is being decoded."""


@dataclass(frozen=True)
class _Text:
    """Text that is final (streamed requests only)."""

    text: str


@dataclass(frozen=True)
class _Finished:
    """The request ended: the text not yet sent, the whole text, and how."""

    tail: str
    text: str
    finish_reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class _Failed:
    """The request ended with an error (Cancelled included)."""

    error: Exception


_Event = _Started | _Text | _Finished | _Failed
Post = Callable[[_Event], None]


@dataclass
class _Job:
    """A request as the scheduler receives it."""

    prompt: list[int]
    sampling: Sampling
    seed: int
    limit: int
    stream: bool
    cancel: threading.Event
    post: Post


@dataclass
class _Slot:
    """A sequence id of the context, and the tokens its KV stream holds at positions 0..len-1."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0


@dataclass
class _Sequence:
    """A running request: where its prompt is, the token to decode next, what it has generated."""

    job: _Job
    slot: _Slot
    sampler: SamplerChain
    assembler: TextAssembler
    position: int
    """Position of the next token to decode (prompt tokens before it are in the KV cache)."""
    next_token: int | None = None
    """The last sampled token, decoded at the next step; None while the prompt is being fed."""
    generated: int = 0


@dataclass(frozen=True)
class SlotState:
    """What a slot holds, for tests and diagnostics."""

    seq_id: int
    busy: bool
    cached_tokens: int
    kv_last_position: int
    """The highest position llama.cpp holds for the slot's sequence (-1: none)."""


@dataclass
class BatchStats:
    """Counters for benchmarks and tests (written by the scheduler thread; read them as approximations)."""

    steps: int = 0
    decode_seconds: float = 0.0
    prompt_tokens: int = 0
    """Prompt tokens decoded."""
    reused_tokens: int = 0
    """Prompt tokens not decoded because a slot's cache already held them."""
    copies: int = 0
    """KV streams copied from one slot to another for their shared prefix."""
    generated_tokens: int = 0
    max_running: int = 0
    """The most sequences running at once."""


class Scheduler:
    """The model's batching thread: admits requests into slots, and decodes them together step by step."""

    def __init__(self, context: MultiSequenceContext, vocab: Vocabulary, *, name: str, token_seconds: float):
        self.context = context
        self.vocab = vocab
        self.stats = BatchStats()
        self._slots = [_Slot(seq_id) for seq_id in range(context.n_seq)]
        self._running: list[_Sequence] = []
        self._inbox: deque[_Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._batch = TokenBatch(context.n_batch)
        self._clock = itertools.count(1)
        # Seconds per token of a decode: sizes prompt chunks; starts from the thread measurement.
        self._token_seconds = token_seconds
        self._thread = threading.Thread(target=self._run, name=f"batch-{name[:16]}", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        with self._wake:
            if self._closing:
                job.post(_Failed(EngineError(ErrorCode.OVERLOADED, "the model is shutting down")))
                return
            self._inbox.append(job)
            self._wake.notify()

    def slot_states(self) -> list[SlotState]:
        """Each slot's state. Call it only while no request runs: llama.cpp's cache is not thread-safe."""
        with self._wake:
            if self._running or self._inbox:
                raise RuntimeError("slot states are only read while the scheduler is idle")
            return [
                SlotState(slot.seq_id, slot.busy, len(slot.cached), self.context.last_position(slot.seq_id))
                for slot in self._slots
            ]

    def poke(self) -> None:
        """Wake the thread: a cancel flag was set."""
        with self._wake:
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread (running requests end as cancelled) and free the batch and the context."""
        with self._wake:
            self._closing = True
            self._wake.notify()
        self._thread.join()
        self._batch.close()
        self.context.close()

    # Everything below runs on the scheduler's thread.

    def _run(self) -> None:
        try:
            while self._next_jobs():
                self._drop_cancelled()
                if self._running:
                    self._step()
        except Exception as exc:
            log.exception("the batching thread failed")
            self._fail_all(EngineError(ErrorCode.INTERNAL_ERROR, f"the batching thread failed: {exc}"))
        else:
            self._fail_all(Cancelled())

    def _next_jobs(self) -> bool:
        """Admit what fits; wait while there is nothing to do. False once closing."""
        with self._wake:
            while not (self._closing or self._inbox or self._running):
                self._wake.wait()
            if self._closing:
                return False
            waiting = [job for job in self._inbox if not job.cancel.is_set()]
            for job in self._inbox:
                if job.cancel.is_set():
                    job.post(_Failed(Cancelled()))
            self._inbox.clear()
            free = sum(not slot.busy for slot in self._slots)
            self._inbox.extend(waiting[free:])
        for job in waiting[:free]:
            self._admit(job)
        return True

    def _admit(self, job: _Job) -> None:
        prompt = job.prompt
        free = [slot for slot in self._slots if not slot.busy]
        # The free slot whose cache shares most with the prompt; among equals the least recently used,
        # so that recent caches live longest.
        slot = max(free, key=lambda s: (longest_common_prefix(s.cached, prompt), -s.last_used))
        keep = longest_common_prefix(slot.cached, prompt)
        donor, shared = max(
            (
                (other, longest_common_prefix(other.cached, prompt))
                for other in self._slots
                if other is not slot
            ),
            key=lambda pair: pair[1],
            default=(None, 0),
        )
        if donor is not None and shared >= keep + COPY_MIN_TOKENS:
            # Streams are separate buffers: llama.cpp copies a whole stream, then the tail is dropped.
            self.context.copy(donor.seq_id, slot.seq_id)
            slot.cached = donor.cached[:shared]
            keep = shared
            self.stats.copies += 1
        # At least the last prompt token is decoded again: its logits give the first token.
        keep = self.context.remove(slot.seq_id, min(keep, len(prompt) - 1))
        del slot.cached[keep:]
        slot.busy = True
        slot.last_used = next(self._clock)
        banned = self.vocab.eog_tokens if job.sampling.ignore_eos else ()
        sampler = SamplerChain(job.sampling, n_vocab=self.vocab.n_tokens, seed=job.seed, banned=banned)
        self._running.append(_Sequence(job, slot, sampler, TextAssembler(job.sampling.stop), position=keep))
        self.stats.reused_tokens += keep
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        job.post(_Started())

    def _drop_cancelled(self) -> None:
        for sequence in [seq for seq in self._running if seq.job.cancel.is_set()]:
            self._release(sequence, keep_cache=False)
            sequence.job.post(_Failed(Cancelled()))

    def _prompt_budget(self, generating: int) -> int:
        room = self.context.n_batch - generating
        if generating == 0:
            # Nobody waits for a next token: take as much prompt as one call holds.
            return room
        return max(1, min(room, max(MIN_PROMPT_CHUNK, int(STEP_TARGET_SECONDS / self._token_seconds))))

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        outputs: list[tuple[_Sequence, int]] = []
        generating = [seq for seq in self._running if seq.next_token is not None]
        for seq in generating:
            assert seq.next_token is not None
            outputs.append((seq, batch.add(seq.next_token, seq.position, seq.slot.seq_id, True)))
        budget = self._prompt_budget(len(generating))
        fed: list[tuple[_Sequence, int]] = []
        for seq in self._running:
            if seq.next_token is not None or budget <= 0:
                continue
            start = seq.position
            take = min(budget, len(seq.job.prompt) - start)
            complete = start + take == len(seq.job.prompt)
            for position in range(start, start + take):
                index = batch.add(
                    seq.job.prompt[position],
                    position,
                    seq.slot.seq_id,
                    complete and position == start + take - 1,
                )
            if complete:
                outputs.append((seq, index))
            fed.append((seq, take))
            budget -= take
        started = time.perf_counter()
        try:
            self.context.decode(batch)
        except DecodeError as exc:
            log.error("decoding a batch of %d tokens failed: %s", len(batch), exc)
            for seq in [*generating, *(seq for seq, _ in fed)]:
                self._release(seq, keep_cache=False)
                seq.job.post(_Failed(EngineError(ErrorCode.INTERNAL_ERROR, f"llama.cpp: {exc}")))
            return
        elapsed = time.perf_counter() - started
        self.stats.steps += 1
        self.stats.decode_seconds += elapsed
        if len(batch) >= 8:
            self._token_seconds = 0.8 * self._token_seconds + 0.2 * elapsed / len(batch)
        for seq in generating:
            assert seq.next_token is not None
            seq.slot.cached.append(seq.next_token)
            seq.position += 1
        for seq, take in fed:
            seq.slot.cached.extend(seq.job.prompt[seq.position : seq.position + take])
            seq.position += take
            self.stats.prompt_tokens += take
        for seq, index in outputs:
            self._accept(seq, seq.sampler.sample(self.context.raw, index))

    def _accept(self, seq: _Sequence, token: int) -> None:
        """Take a sampled token: end the sequence, or keep it for the next step and post its text."""
        if self.vocab.is_eog(token):
            self._finish(seq, "stop", "")
            return
        seq.generated += 1
        self.stats.generated_tokens += 1
        text = seq.assembler.feed(self.vocab.piece(token))
        if seq.assembler.stopped:
            self._finish(seq, "stop", text)
        elif seq.generated >= seq.job.limit:
            self._finish(seq, "length", text)
        else:
            seq.next_token = token
            if text and seq.job.stream:
                seq.job.post(_Text(text))

    def _finish(self, seq: _Sequence, finish_reason: FinishReason, text: str) -> None:
        tail = text + seq.assembler.finish()
        self._release(seq, keep_cache=True)
        if not seq.job.stream:
            tail = seq.assembler.text
        seq.job.post(_Finished(tail, seq.assembler.text, finish_reason, seq.generated))

    def _release(self, seq: _Sequence, *, keep_cache: bool) -> None:
        seq.sampler.close()
        self._running.remove(seq)
        slot = seq.slot
        slot.busy = False
        if not keep_cache:
            self.context.remove(slot.seq_id)
            slot.cached.clear()

    def _fail_all(self, error: Exception) -> None:
        for seq in list(self._running):
            self._release(seq, keep_cache=False)
            seq.job.post(_Failed(error))
        with self._wake:
            self._closing = True
            jobs = list(self._inbox)
            self._inbox.clear()
        for job in jobs:
            job.post(_Failed(error))


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
        scheduler = Scheduler(context, vocab, name=model.config.id, token_seconds=token_seconds)
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

        Raises Cancelled if `cancel` is set before it ends; if this coroutine is cancelled, the sequence
        leaves the batch at the next step.
        """
        # The template and the tokenizer are CPU work: off the event loop, beside the decoding thread.
        prompt = await asyncio.to_thread(self.model.chat_prompt, chat)
        limit = self._check(chat, prompt)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[_Event] = asyncio.Queue()

        def post(event: _Event) -> None:
            # A closed loop refuses the call: nobody waits for this request any more.
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(events.put_nowait, event)

        job = _Job(
            prompt=prompt,
            sampling=chat_sampling(chat),
            seed=choice_seeds(chat.seed, 1)[0],
            limit=limit,
            stream=chat.stream,
            cancel=cancel,
            post=post,
        )
        if limit <= 0:
            job.post(_Started())
            job.post(_Finished("", "", "length", 0))
        else:
            self.scheduler.submit(job)
        chunks: list[dict[str, Any]] = []
        choice: ChatChoice | None = None
        result: _Finished | None = None
        whole: dict[str, Any] = {}
        ended = False  # the scheduler is done with the request
        try:
            while result is None:
                # Everything posted while on_chunk was busy is handled at once: text becomes one chunk.
                ready = [await events.get()]
                while not events.empty():
                    ready.append(events.get_nowait())
                for event in _merge_text(ready):
                    if isinstance(event, _Started):
                        choice = ChatChoice(
                            index=0,
                            tool_mode="none",
                            logprobs=False,
                            fingerprint=self.model.fingerprint,
                            emit=chunks.append if chat.stream else None,
                        )
                    elif isinstance(event, _Failed):
                        ended = True
                        raise event.error
                    elif choice is None:
                        raise AssertionError(f"{event} before the request started")
                    elif isinstance(event, _Text):
                        choice.on_piece(Piece(event.text, []))
                    else:
                        result = event
                        ended = True
                        if event.tail:
                            choice.on_piece(Piece(event.tail, []))
                        whole = choice.finish(
                            Generation(event.text, event.finish_reason, event.completion_tokens, None)
                        )
                for chunk in chunks:
                    await on_chunk(chunk)
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


def _merge_text(events: list[_Event]) -> list[_Event]:
    """The events in order, with each run of text events joined into one."""
    merged: list[_Event] = []
    for event in events:
        if isinstance(event, _Text) and merged and isinstance(merged[-1], _Text):
            merged[-1] = _Text(merged[-1].text + event.text)
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
        return ThreadChoice(candidates[0], {}, "the only candidate: one core is left for the rest")
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
