"""The batching thread of one model: admits requests into sequence slots and decodes them together.

Each step builds one llama.cpp batch with the next token of every generating sequence and, within a
budget, a chunk of newcomers' prompt tokens; one `llama_decode` advances them all; each sequence then
samples its next token with its own sampler chain (and grammar), reads its log probabilities from the
same logits row if asked, and its text goes back to the request's event loop.

A job is one prompt and 1 to n_seq choices. It is admitted when it has a slot for every choice: the
first choice's slot decodes the prompt; when its last prompt token is decoded, the stream is copied to
the others' slots and every choice samples its first token from that one logits row with its own seeded
sampler, so the prompt is decoded once for all n.

- Requests join at the next step and leave when they finish. While others are generating, a newcomer's
  prompt is fed in chunks sized so that a step stays near STEP_TARGET_SECONDS; when nobody is waiting
  for a token, a whole batch of it; a short one (WHOLE_PROMPT_TOKENS) always in one step, so that its
  numbers do not depend on the load. Several newcomers' short prompts share a step only up to that
  size too, in the order they came (a long one's chunk does not count against them): on a CPU a step
  takes about as long as its tokens, so a burst read a few prompts a step gives the first of them
  their first token steps earlier, where reading all in one step would keep every one of them waiting
  for all the others.
- A step's batch lists its sequences in slot order: with a stream per sequence, llama.cpp decodes a
  batch as micro-batches of consecutive sequence ids, one pass over the weights each, so a newcomer
  with no cached prefix to reuse takes the free slot that keeps the busy ones together.
- Slots keep the cells of their last sequence as a prompt cache: a newcomer takes the free slot whose
  cache shares the longest prefix with its prompt, or copies the stream of another slot that shares at
  least COPY_MIN_TOKENS more, and decodes only the rest (a shared prefix under MIN_REUSE_TOKENS is
  decoded again). A newcomer whose prefix (HOLD_MIN_TOKENS or more of it) another slot is reading
  right now waits until it is read and then copies it, rather than reading it a second time beside it
  (the first turns of conversations over one system prompt arrive together). A cancelled sequence's
  cells are freed at once. With a host cache (--cache-ram, cache_ram.py), a slot about to be
  overwritten is saved to RAM first, and a saved state that shares more with a newcomer's prompt than
  any slot is restored into its slot instead of decoding it again.
- Each slot keeps the queen's names of the prefixes it holds (prefix_cache.py); every change to them
  is published as a snapshot (`cached_prefixes`) and announced through `on_cache_change`.
- A resumed choice (JobChoice.replay) decodes its prompt, then the relayed tokens one a step, as they
  were generated, and only then samples: its answer goes on as the interrupted one would have.

Everything here but `submit`, `poke`, `slot_states`, `cached_prefixes` and `close` runs on the
scheduler's own thread, the only one that touches the llama.cpp context; events reach the requests
through their `post` callback.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from protocol import ErrorCode
from protocol.prefix import reply_hash
from workerbee.cache_ram import MIN_SAVED_TOKENS, HostCache, SavedState
from workerbee.decoding import FinishReason, TokenLogprob
from workerbee.detokenize import TextAssembler, TokenSpans
from workerbee.errors import Cancelled, EngineError
from workerbee.llama_context import (
    DecodeError,
    MultiSequenceContext,
    TokenBatch,
    Vocabulary,
    longest_common_prefix,
)
from workerbee.mailbox import Mailbox
from workerbee.prefix_cache import NO_BLOCKS, Block, PromptBlocks, SlotBlocks, summarize
from workerbee.sampling import SamplerChain, token_logprob
from workerbee.threads import ThreadTuner

log = logging.getLogger("workerbee.scheduler")

STEP_TARGET_SECONDS = 0.25
"""How long a step with prompt tokens may take while other sequences wait for their next token."""
MIN_PROMPT_CHUNK = 32
"""Prompt tokens a step takes at least, so that a long prompt still makes progress on a slow machine."""
WHOLE_PROMPT_TOKENS = 128
"""Prompts (what is left of them past the cache) this short are decoded in one step, never split."""
MIN_REUSE_TOKENS = 16
"""Cached prefix tokens a slot must share with a prompt before they are reused rather than decoded."""
COPY_MIN_TOKENS = 16
"""Prefix tokens another slot must have beyond a slot's own before its whole KV stream is copied over."""
HOLD_MIN_TOKENS = 128
"""Prompt tokens another slot must still be reading of a newcomer's prefix before the newcomer waits
for them (to copy them) instead of reading them too."""


@dataclass(frozen=True)
class Started:
    """The request has a slot and its prompt is being decoded, past the `cached` tokens reused."""

    cached: int = 0


@dataclass(frozen=True)
class TextReady:
    """A choice's text that is final (streamed requests only), the log probabilities of the tokens it
    completes, and the tokens generated since the choice's last TextReady."""

    choice: int
    text: str
    tokens: int
    logprobs: list[TokenLogprob] = field(default_factory=list)
    ids: tuple[int, ...] = ()
    """The ids of those tokens."""


@dataclass(frozen=True)
class Finished:
    """A choice ended: the text not yet sent, the whole text, and how.

    `tail_tokens` counts the tokens generated since the last TextReady (those of the tail, and of any
    text dropped at the end, such as a stop sequence). `tail_logprobs` are those not yet sent, and
    `logprobs` all of them (None if the job asked for none).
    """

    choice: int
    tail: str
    text: str
    finish_reason: FinishReason
    completion_tokens: int
    tail_tokens: int = 0
    tail_logprobs: list[TokenLogprob] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    tail_ids: tuple[int, ...] = ()
    stop_sequence: str | None = None
    """The stop sequence that ended the choice (finish_reason "stop" without the end token)."""
    """The ids of the `tail_tokens`."""


@dataclass(frozen=True)
class Failed:
    """The job ended with an error (Cancelled, with the tokens all its choices generated, included)."""

    error: Exception


RequestEvent = Started | TextReady | Finished | Failed
Post = Callable[[RequestEvent], None]


@dataclass
class JobChoice:
    """One choice of a job: its index in the request, and its own sampler (seeded, with its grammar)."""

    index: int
    sampler: SamplerChain
    replay: list[int] = field(default_factory=list)
    """A resumed choice's tokens that another worker generated and the client has: decoded after the
    prompt one a step, as they were generated (see `_Sequence.forced`), their text taken as sent; they
    count towards the limit but not as generated here."""


@dataclass
class Job:
    """A prompt and the choices to generate for it, as the scheduler receives them.

    The scheduler owns the samplers once the job is submitted and frees them when the job ends.
    """

    prompt: list[int]
    choices: list[JobChoice]
    stop: tuple[str, ...]
    top_logprobs: int | None
    """None: no log probabilities; else how many alternatives per token."""
    limit: int
    stream: bool
    cancel: threading.Event
    post: Post
    running: int = 0
    """Choices still in the batch."""
    generated: int = 0
    """Tokens generated by all its choices."""
    blocks: PromptBlocks = NO_BLOCKS
    """The prompt's prefixes as the queen names them: what its slots hold once it has run."""
    held: bool = False
    """It waited for another slot to read its prefix (counted once)."""

    def close(self) -> None:
        """Free every choice's sampler (idempotent)."""
        for choice in self.choices:
            choice.sampler.close()


@dataclass
class _Slot:
    """A sequence id of the context, and the tokens its KV stream holds at positions 0..len-1."""

    seq_id: int
    cached: list[int] = field(default_factory=list)
    busy: bool = False
    last_used: int = 0
    blocks: SlotBlocks = field(default_factory=SlotBlocks)
    """The prefixes of `cached` as the queen names them (see prefix_cache.py)."""


@dataclass
class _Sequence:
    """A running request: where its prompt is, the token to decode next, what it has generated."""

    job: Job
    choice: JobChoice
    slot: _Slot
    assembler: TextAssembler
    position: int
    """Position of the next token to decode (prompt tokens before it are in the KV cache)."""
    followers: list[_Sequence] = field(default_factory=list)
    """The job's other choices, waiting for this one's prompt to be decoded (the first choice only)."""
    leader: _Sequence | None = None
    """The sequence that decodes the prompt for this one (the other choices only), until it is done."""
    next_token: int | None = None
    """The last sampled token, decoded at the next step; None while the prompt is being fed."""
    generated: int = 0
    reported: int = 0
    """Generated tokens already counted in a TextReady."""
    spans: TokenSpans[TokenLogprob] = field(default_factory=TokenSpans)
    ids: list[int] = field(default_factory=list)
    """Every generated token (a resumed choice's replayed ones first)."""
    replayed: int = 0
    """Tokens of `ids` another worker generated (JobChoice.replay)."""
    forced: deque[int] = field(default_factory=deque)
    """Replayed tokens still to decode. Each goes through a generating step of its own, not with the
    prompt: llama.cpp's CPU kernels give a token's cells slightly different numbers in a long prompt
    batch than in a one-token step, enough to change a near-tie later, and the original worker decoded
    them one a step."""

    def resume(self, vocab: Vocabulary) -> None:
        """Take the choice's replayed tokens as generated and their text as sent."""
        replay = self.choice.replay
        for token in replay:
            self.assembler.feed(vocab.piece(token))
        self.ids = list(replay)
        self.forced = deque(replay)
        self.generated = self.reported = self.replayed = len(replay)

    def fresh_ids(self) -> tuple[int, ...]:
        """The ids generated since the last TextReady."""
        return tuple(self.ids[self.reported :])


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
    restores: int = 0
    """Slot states brought back from host RAM (--cache-ram) for a newcomer's prefix."""
    holds: int = 0
    """Jobs that waited for another slot to finish reading their prefix, to copy it."""
    generated_tokens: int = 0
    max_running: int = 0
    """The most sequences running at once."""


class Scheduler:
    """The model's batching thread: admits requests into slots, and decodes them together step by step."""

    def __init__(
        self,
        context: MultiSequenceContext,
        vocab: Vocabulary,
        *,
        name: str,
        token_seconds: float,
        tuner: ThreadTuner | None = None,
        on_cache_change: Callable[[], None] | None = None,
        host_cache: HostCache | None = None,
    ) -> None:
        self.context = context
        self.host_cache = host_cache
        """Evicted slot states kept in host RAM (--cache-ram), or None."""
        self.on_cache_change = on_cache_change
        """Called on the scheduler's thread whenever what the slots hold changes."""
        self.cache_version = 0
        """Bumped on every change of `cached_prefixes`."""
        self._cached_prefixes: list[Block] = []
        self.tuner = tuner
        self.vocab = vocab
        self.stats = BatchStats()
        self.mailbox = Mailbox()
        """How requests' events reach their loops: each step hands its events over at once."""
        self._slots = [_Slot(seq_id) for seq_id in range(context.n_seq)]
        self._running: list[_Sequence] = []
        self._inbox: deque[Job] = deque()
        self._wake = threading.Condition()
        self._closing = False
        self._batch = TokenBatch(context.n_batch)
        self._clock = itertools.count(1)
        # Seconds per token of a decode: sizes prompt chunks; starts from the thread measurement.
        self._token_seconds = token_seconds
        self._thread = threading.Thread(target=self._run, name=f"batch-{name[:16]}", daemon=True)
        self._thread.start()

    def submit(self, job: Job) -> None:
        """Queue a request; it joins the batch at the next step with a free slot."""
        with self._wake:
            if self._closing:
                job.close()
                job.post(Failed(EngineError(ErrorCode.OVERLOADED, "the model is shutting down")))
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

    def cached_prefixes(self) -> list[Block]:
        """The prefixes the slots hold, as the queen names them (a snapshot; safe from any thread)."""
        return self._cached_prefixes

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
        busy: tuple[float, BatchStats] | None = None  # since when, and the counters then
        try:
            while (admitted := self._next_jobs()) is not None:
                if busy is None:
                    busy = (time.perf_counter(), replace(self.stats))
                for job in admitted:
                    self._admit(job)
                self._drop_cancelled()
                if self._running:
                    # A step's events reach their loops together, once it has sampled every stream.
                    with self.mailbox.holding():
                        self._step()
                if not self._running:
                    self._log_busy_period(*busy)
                    busy = None
        except Exception as exc:
            log.exception("the batching thread failed")
            self._fail_all(EngineError(ErrorCode.INTERNAL_ERROR, f"the batching thread failed: {exc}"))
        else:
            self._fail_all(Cancelled())

    def _log_busy_period(self, since: float, before: BatchStats) -> None:
        """One debug line per busy period: how much of it llama_decode took, and what it decoded."""
        wall = time.perf_counter() - since
        decode = self.stats.decode_seconds - before.decode_seconds
        log.debug(
            "busy %.2f s: %d steps, llama_decode %.0f%% of it, %d tokens generated, %d prompt tokens "
            "decoded, %d reused",
            wall,
            self.stats.steps - before.steps,
            100 * decode / wall if wall else 0,
            self.stats.generated_tokens - before.generated_tokens,
            self.stats.prompt_tokens - before.prompt_tokens,
            self.stats.reused_tokens - before.reused_tokens,
        )

    def _next_jobs(self) -> list[Job] | None:
        """The jobs to admit now (what fits); waits while there is nothing to do. None once closing."""
        with self._wake:
            while not (self._closing or self._inbox or self._running):
                self._wake.wait()
            if self._closing:
                return None
            waiting = [job for job in self._inbox if not job.cancel.is_set()]
            for job in self._inbox:
                if job.cancel.is_set():
                    job.post(Failed(Cancelled(0)))
                    job.close()
            self._inbox.clear()
            free = sum(not slot.busy for slot in self._slots)
            # First come, first served: a job that needs more slots than are free waits, and so do the
            # jobs behind it, or a request with n > 1 could wait for ever behind single ones. A job
            # whose prefix another slot is reading right now waits for it (and copies it), letting
            # the others pass.
            admitted: list[Job] = []
            held: list[Job] = []
            for index, job in enumerate(waiting):
                if len(job.choices) > free:
                    held.extend(waiting[index:])
                    break
                if self._prefix_being_read(job, admitted):
                    held.append(job)
                    continue
                free -= len(job.choices)
                admitted.append(job)
            self._inbox.extend(held)
        return admitted

    def _prefix_being_read(self, job: Job, admitted: list[Job]) -> bool:
        """Whether a slot is reading (or, `admitted` with it, is about to read) at least HOLD_MIN_TOKENS
        of `job`'s prompt that no cache holds yet: the job then waits to copy them rather than read
        them again beside it."""
        prompt = job.prompt
        readers = [
            (seq.job.prompt, seq.position)
            for seq in self._running
            if seq.next_token is None and seq.leader is None
        ]
        readers += [(other.prompt, 0) for other in admitted]
        if not readers:
            return False
        cached = max(longest_common_prefix(slot.cached, prompt) for slot in self._slots)
        for reading, position in readers:
            shared = longest_common_prefix(reading, prompt)
            if shared - max(cached, position) >= HOLD_MIN_TOKENS:
                if not job.held:
                    job.held = True
                    self.stats.holds += 1
                return True
        return False

    def _admit(self, job: Job) -> None:
        leader = self._admit_leader(job)
        for choice in job.choices[1:]:
            free = [slot for slot in self._slots if not slot.busy]
            # Next to the busy slots (see `_passes_with`); then the least useful cache goes: the shortest,
            # then the least recently used.
            slot = min(free, key=lambda s: (self._passes_with(s), len(s.cached), s.last_used))
            slot.busy = True
            slot.last_used = next(self._clock)
            follower = _Sequence(job, choice, slot, TextAssembler(job.stop), position=0, leader=leader)
            follower.resume(self.vocab)
            leader.followers.append(follower)
            self._running.append(follower)
        job.running = len(job.choices)
        self.stats.max_running = max(self.stats.max_running, len(self._running))
        # The slots' old prefixes are being overwritten; the new ones count once they are decoded.
        holders = [seq.slot.blocks for seq in [leader, *leader.followers] if seq.slot.blocks.blocks]
        for blocks in holders:
            blocks.clear()
        if holders or self.host_cache is not None:  # host RAM may have given or taken a state
            self._publish_cache()
        job.post(Started(cached=leader.position))

    def _admit_leader(self, job: Job) -> _Sequence:
        prompt = job.prompt
        free = [slot for slot in self._slots if not slot.busy]
        # The free slot whose cache shares most with the prompt (a prefix too short to reuse counts as
        # none); among equals the one that keeps the busy slots' ids together (see `_passes_with`), then
        # the least recently used, so that recent caches live longest.
        slot = max(
            free,
            key=lambda s: (
                _reusable(longest_common_prefix(s.cached, prompt)),
                -self._passes_with(s),
                -s.last_used,
            ),
        )
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
        saved = self.host_cache.best(prompt) if self.host_cache is not None else None
        if saved is not None and saved[1] >= max(keep, shared) + COPY_MIN_TOKENS:
            assert self.host_cache is not None
            self._save(slot, 0)
            state = self.host_cache.take(saved[0])
            if self.context.restore(state.data, slot.seq_id):
                slot.cached = state.tokens
                keep = saved[1]
                self.stats.restores += 1
            else:
                log.warning("llama.cpp refused a state saved in host RAM; decoding the prompt again")
                slot.cached = []
                keep = 0
        elif donor is not None and shared >= keep + COPY_MIN_TOKENS:
            self._save(slot, 0)
            # Streams are separate buffers: llama.cpp copies a whole stream, then the tail is dropped.
            self.context.copy(donor.seq_id, slot.seq_id)
            slot.cached = donor.cached[:shared]
            keep = shared
            self.stats.copies += 1
        else:
            self._save(slot, keep if keep >= MIN_REUSE_TOKENS else 0)
        # At least the last prompt token is decoded again: its logits give the first token. A prefix too
        # short to save anything (the chat template's first tokens) is decoded again too, so that prompts
        # that share only that decode exactly as they would cold (see WHOLE_PROMPT_TOKENS).
        if keep < MIN_REUSE_TOKENS:
            keep = 0
        keep = self.context.remove(slot.seq_id, min(keep, len(prompt) - 1))
        del slot.cached[keep:]
        slot.busy = True
        slot.last_used = next(self._clock)
        leader = _Sequence(job, job.choices[0], slot, TextAssembler(job.stop), position=keep)
        leader.resume(self.vocab)
        self._running.append(leader)
        self.stats.reused_tokens += keep
        return leader

    def _passes_with(self, slot: _Slot) -> int:
        """How many runs of consecutive ids the busy slots would form with `slot` busy too.

        With a stream per sequence, llama.cpp decodes each such run as a pass of its own over the
        weights (`_step`): 4 sequences in slots 0-3 take one pass, in slots 0, 2, 4 and 6 four, about
        15% slower on a CPU.
        """
        busy = [other.busy or other is slot for other in self._slots]
        return sum(1 for index, taken in enumerate(busy) if taken and (index == 0 or not busy[index - 1]))

    def _save(self, slot: _Slot, keep: int) -> None:
        """Keep the slot's state in host RAM if more than a little of it is about to be overwritten."""
        if self.host_cache is None or len(slot.cached) - keep < MIN_SAVED_TOKENS:
            return
        state = SavedState(list(slot.cached), self.context.save(slot.seq_id), list(slot.blocks.blocks))
        if not self.host_cache.put(state):
            log.debug("a slot state of %d bytes is larger than --cache-ram", len(state.data))

    def _publish_cache(self) -> None:
        """Take a new snapshot of what the slots and host RAM hold and say it changed."""
        caches = [slot.blocks.blocks for slot in self._slots]
        if self.host_cache is not None:
            caches += self.host_cache.blocks()
        self._cached_prefixes = summarize(caches)
        self.cache_version += 1
        if self.on_cache_change is not None:
            self.on_cache_change()

    def _drop_cancelled(self) -> None:
        for sequence in [seq for seq in self._running if seq.job.cancel.is_set()]:
            if sequence not in self._running:
                continue  # a follower, released with its leader
            self._release(sequence, keep_cache=False)
            if sequence.job.running == 0:
                sequence.job.post(Failed(Cancelled(sequence.job.generated)))

    def _prompt_budget(self, generating: int) -> int:
        room = self.context.n_batch - generating
        if generating == 0:
            # Nobody waits for a next token: take as much prompt as one call holds.
            return room
        return self._step_share(room)

    def _step_share(self, room: int) -> int:
        """Prompt tokens that keep a step near STEP_TARGET_SECONDS (MIN_PROMPT_CHUNK at least)."""
        return max(1, min(room, max(MIN_PROMPT_CHUNK, int(STEP_TARGET_SECONDS / self._token_seconds))))

    def _step(self) -> None:
        batch = self._batch
        batch.clear()
        outputs: list[tuple[_Sequence, int]] = []
        generating = [seq for seq in self._running if seq.next_token is not None]
        budget = self._prompt_budget(len(generating))
        room = self.context.n_batch - len(generating)
        # Prompt tokens go to the sequences in the order they came, within the step's budget. A short
        # prompt after another joins only while the short ones fed are under the step's share (see
        # `_step_share`); one behind a long prompt's chunk is not held up by it.
        share = self._step_share(room)
        short_fed = 0
        fed: list[tuple[_Sequence, int]] = []
        for seq in self._running:
            if seq.next_token is not None or seq.leader is not None:
                continue
            left = len(seq.job.prompt) - seq.position
            short = left <= WHOLE_PROMPT_TOKENS
            if short and short_fed >= share:
                continue
            # A short prompt is never split across steps, however busy the worker: llama.cpp's CPU kernels
            # give a position slightly different numbers in a batch of 8 than of 40, and a greedy answer
            # (a resumed one included) should not depend on the load when its prompt came.
            take = left if short else min(budget, left)
            if take <= 0 or take > room:
                continue
            fed.append((seq, take))
            budget -= take
            room -= take
            if short:
                short_fed += take
        # The batch lists the sequences by id: with a stream per sequence, llama.cpp splits a batch into
        # micro-batches of consecutive sequence ids (each a pass over the weights), so the order of
        # admission would cut 8 generating tokens into several passes.
        # A generating sequence takes its next token, a prompt's `take` of its tokens.
        for seq, take in sorted(
            [*((seq, 0) for seq in generating), *fed], key=lambda pair: pair[0].slot.seq_id
        ):
            if seq.next_token is not None:
                outputs.append((seq, batch.add(seq.next_token, seq.position, seq.slot.seq_id, True)))
                continue
            start = seq.position
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
        threads = self.context.threads
        if self.tuner is not None:
            threads = self.tuner.threads_for(len(batch))
            if threads != self.context.threads:
                self.context.set_threads(threads)
        started = time.perf_counter()
        try:
            self.context.decode(batch)
        except DecodeError as exc:
            log.error("decoding a batch of %d tokens failed: %s", len(batch), exc)
            failed = {id(seq.job): seq.job for seq in [*generating, *(seq for seq, _ in fed)]}
            for job in failed.values():
                for seq in [seq for seq in self._running if seq.job is job]:
                    self._release(seq, keep_cache=False)
                job.post(Failed(EngineError(ErrorCode.INTERNAL_ERROR, f"llama.cpp: {exc}")))
            return
        elapsed = time.perf_counter() - started
        if self.tuner is not None and self.tuner.record(threads, len(batch), elapsed):
            log.info("decoding with %d threads from now on: faster at %d tokens a step", threads, len(batch))
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
        published = False
        for seq, index in outputs:
            if seq.next_token is None:  # its prompt is decoded now: the slots hold it
                for holder in [seq, *seq.followers]:
                    holder.slot.blocks.replace(seq.job.blocks)
                published = True
            for follower in seq.followers:
                # The prompt's cells are the leader's: its stream is copied (at the next decode).
                self.context.copy(seq.slot.seq_id, follower.slot.seq_id)
                follower.slot.cached = list(seq.slot.cached)
                follower.position = seq.position
                follower.leader = None
            followers, seq.followers = seq.followers, []
            for sampled in [seq, *followers]:
                if sampled.forced:
                    sampled.next_token = sampled.forced.popleft()  # its sampler advanced over it already
                elif sampled in self._running:
                    self._accept(sampled, sampled.choice.sampler.sample(self.context, index), index)
        if published:
            self._publish_cache()

    def _accept(self, seq: _Sequence, token: int, index: int) -> None:
        """Take a sampled token: end the sequence, or keep it for the next step and post its text."""
        if self.vocab.is_eog(token):
            self._finish(seq, "stop", "")
            return
        seq.generated += 1
        seq.ids.append(token)
        seq.job.generated += 1
        self.stats.generated_tokens += 1
        assembler = seq.assembler
        start = len(assembler.text)
        text = assembler.feed(self.vocab.piece(token))
        top = seq.job.top_logprobs
        if top is not None:
            entry = token_logprob(self.vocab, self.context.logits_row(index), token, top)
            seq.spans.add(start, max(start, len(assembler.text)), entry)
        if assembler.stopped:
            self._finish(seq, "stop", text)
        elif seq.generated >= seq.job.limit:
            self._finish(seq, "length", text)
        else:
            seq.next_token = token
            if seq.job.stream and (text or top is not None):
                logprobs = seq.spans.release(assembler.sent) if top is not None else []
                if text or logprobs:
                    seq.job.post(
                        TextReady(
                            seq.choice.index, text, seq.generated - seq.reported, logprobs, seq.fresh_ids()
                        )
                    )
                    seq.reported = seq.generated

    def _finish(self, seq: _Sequence, finish_reason: FinishReason, text: str) -> None:
        assembler = seq.assembler
        tail = text + assembler.finish()
        self._release(seq, keep_cache=True)
        root = seq.job.blocks.reply_root
        if root is not None and seq.slot.cached:
            # The client sends this answer back as the next turn's assistant message.
            seq.slot.blocks.blocks.append((reply_hash(root, assembler.text), len(seq.slot.cached)))
            self._publish_cache()
        tail_logprobs: list[TokenLogprob] = []
        logprobs = None
        if seq.job.top_logprobs is not None:
            tail_logprobs = seq.spans.release(len(assembler.text), by_start=assembler.stopped)
            logprobs = seq.spans.released()
        if not seq.job.stream:
            tail = assembler.text
            tail_logprobs = logprobs or []
        seq.job.post(
            Finished(
                seq.choice.index,
                tail,
                assembler.text,
                finish_reason,
                seq.generated - seq.replayed,
                seq.generated - seq.reported,
                tail_logprobs,
                logprobs,
                seq.fresh_ids(),
                assembler.stop_sequence if finish_reason == "stop" else None,
            )
        )

    def _release(self, seq: _Sequence, *, keep_cache: bool) -> None:
        if seq not in self._running:
            return
        seq.choice.sampler.close()
        self._running.remove(seq)
        seq.job.running -= 1
        if seq.leader is not None:
            seq.leader.followers.remove(seq)
            seq.leader = None
        for follower in seq.followers:
            # The prompt is not decoded for them any more: they go too.
            follower.leader = None
            self._release(follower, keep_cache=False)
        seq.followers = []
        slot = seq.slot
        slot.busy = False
        if not keep_cache:
            self.context.remove(slot.seq_id)
            slot.cached.clear()
            if slot.blocks.blocks:
                slot.blocks.clear()
                self._publish_cache()
        if seq.job.running == 0:
            seq.job.close()

    def _fail_all(self, error: Exception) -> None:
        for seq in list(self._running):
            if seq not in self._running:
                continue
            job = seq.job
            for other in [other for other in self._running if other.job is job]:
                if other in self._running:
                    self._release(other, keep_cache=False)
            job.post(Failed(Cancelled(job.generated) if isinstance(error, Cancelled) else error))
        with self._wake:
            self._closing = True
            jobs = list(self._inbox)
            self._inbox.clear()
        for job in jobs:
            job.close()
            job.post(Failed(error))


def _reusable(shared: int) -> int:
    """The prefix tokens a slot's cache would save a prompt: none below MIN_REUSE_TOKENS."""
    return shared if shared >= MIN_REUSE_TOKENS else 0
