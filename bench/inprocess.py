"""Measurements inside the benchmark's own process: llama-cpp-python alone, and raw llama.cpp decoding.

- `AloneReference` is reference (a): llama-cpp-python's `Llama.generate` on the chat-templated prompt,
  greedy, end-of-generation tokens banned, one request at a time: the most one stream can get from
  llama.cpp through Python on this machine.
- `decode_ceiling` times `llama_decode` itself with k sequences per call (no sampling, no Python per
  token beyond the batch): what batching can possibly give here, whatever the engine around it.
- `thread_sweep` times the same decode steps with each thread count, interleaved.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.load import RequestResult
from workerbee.llama_context import ModelWeights, MultiSequenceContext, TokenBatch, Vocabulary


class AloneReference:
    """llama-cpp-python in this process, one request at a time (reference (a))."""

    def __init__(self, model_path: Path, *, threads: int, n_ctx: int = 2048) -> None:
        from llama_cpp import Llama, llama_chat_format

        self.model_path = model_path
        self._weights: ModelWeights | None = None
        self.llama: Any = Llama(
            model_path=str(model_path), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads, verbose=False
        )
        eos, bos = self.llama.token_eos(), self.llama.token_bos()
        self._formatter = llama_chat_format.Jinja2ChatFormatter(
            template=self.llama.metadata["tokenizer.chat_template"],
            eos_token=self.llama._model.token_get_text(eos),
            bos_token=self.llama._model.token_get_text(bos),
            stop_token_ids=[eos],
        )
        self.vocab = Vocabulary(self.llama.model)
        self._banned = np.array(self.vocab.eog_tokens, dtype=np.intc)

    def _ban(self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]) -> npt.NDArray[np.single]:
        scores[self._banned] = -np.inf
        return scores

    def run(self, messages: list[dict[str, Any]], max_tokens: int) -> RequestResult:
        """Generate exactly `max_tokens` tokens greedily for a chat; timed like a client would."""
        started = time.perf_counter()
        chat: Any = messages  # llama-cpp-python types messages as TypedDicts
        result = self._formatter(messages=chat)
        prompt = self.llama.tokenize(result.prompt.encode(), add_bos=not result.added_special, special=True)
        tokens: list[int] = []
        first: float | None = None
        generator = self.llama.generate(
            prompt, temp=0.0, top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0, logits_processor=[self._ban]
        )
        try:
            for token in generator:
                tokens.append(int(token))
                first = first or time.perf_counter()
                if len(tokens) >= max_tokens:
                    break
        finally:
            generator.close()
        ended = time.perf_counter()
        text = b"".join(self.vocab.piece(token) for token in tokens).decode("utf-8", errors="replace")
        return RequestResult(started, first, ended, len(tokens), text)

    def set_threads(self, threads: int) -> None:
        """Decode with `threads` threads from now on."""
        import llama_cpp

        llama_cpp.llama_set_n_threads(self.llama.ctx, threads, threads)

    def close(self) -> None:
        """Free the model."""
        self.llama.close()


@dataclass(frozen=True)
class StepTiming:
    """Median seconds of one decode step of `sequences` tokens with `threads` threads."""

    threads: int
    sequences: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        """Tokens decoded per second at this setting."""
        return self.sequences / self.seconds


def _context(reference: AloneReference, n_seq: int, threads: int) -> MultiSequenceContext:
    # The engine's own loading (weights without a context); the file is memory-mapped once for both.
    if reference._weights is None:
        reference._weights = ModelWeights(reference.model_path)
    return MultiSequenceContext(reference._weights, n_seq=n_seq, n_ctx_seq=512, n_batch=512, threads=threads)


def _prefill(context: MultiSequenceContext, batch: TokenBatch, sequences: int, length: int) -> None:
    """Give every sequence `length` tokens of context, as a running request has."""
    for seq_id in range(context.n_seq):
        context.remove(seq_id)
    batch.clear()
    for seq_id in range(sequences):
        for position in range(length):
            batch.add(100 + position, position, seq_id, False)
    context.decode(batch)


def _step(context: MultiSequenceContext, batch: TokenBatch, sequences: int, position: int) -> float:
    batch.clear()
    for seq_id in range(sequences):
        batch.add(200 + position % 100, position, seq_id, True)
    started = time.perf_counter()
    context.decode(batch)
    return time.perf_counter() - started


def decode_ceiling(
    reference: AloneReference, *, threads: Sequence[int], sequences: Sequence[int], rounds: int = 8
) -> list[StepTiming]:
    """Median step time of raw batched decoding per (thread count, sequences per call).

    64 tokens of context per sequence. Every setting is tried once per round, so that outside load
    hits them alike.
    """
    context = _context(reference, max(sequences), 1)
    batch = TokenBatch(512)
    samples: dict[tuple[int, int], list[float]] = {(t, n): [] for t in threads for n in sequences}
    try:
        _prefill(context, batch, max(sequences), 64)
        for _ in range(rounds):
            for count, sequences_ in samples:
                context.set_threads(count)
                # Every sequence stays at position 64: each step's cell is removed again.
                samples[count, sequences_].append(_step(context, batch, sequences_, 64))
                for seq_id in range(sequences_):
                    context.remove(seq_id, 64)
    finally:
        batch.close()
        context.close()
    return [StepTiming(t, n, statistics.median(values)) for (t, n), values in samples.items()]


def thread_sweep(
    reference: AloneReference, *, candidates: Sequence[int], sequences: Sequence[int], rounds: int = 3
) -> list[StepTiming]:
    """Median decode-step time per (threads, sequences), candidates interleaved within every round."""
    context = _context(reference, max(sequences), 1)
    batch = TokenBatch(512)
    samples: dict[tuple[int, int], list[float]] = {(t, s): [] for t in candidates for s in sequences}
    try:
        for count in sequences:
            _prefill(context, batch, count, 64)
            position = 64
            for _ in range(rounds):
                for threads in candidates:
                    context.set_threads(threads)
                    samples[threads, count].append(_step(context, batch, count, position))
                    position += 1
    finally:
        batch.close()
        context.close()
    return [StepTiming(t, s, statistics.median(values)) for (t, s), values in samples.items()]
