"""The token loop shared by chat and text completions: sample, turn tokens into text, stop where asked.

It drives llama-cpp-python's sampler chain (`Llama.generate`, which also reuses the KV cache of the
previous request's common prefix) and does the rest itself, because llama-cpp-python's completion loop
keeps every position's logits for log probabilities (`logits_all`: n_ctx x n_vocab floats, about 800 MB
for a 4k-context, 49k-vocabulary model) and runs one choice per call. Here:

- a logits processor sees each step's raw logits once, and keeps what log probabilities need;
- stop sequences are found in the decoded text, and text that may be the start of one is held back,
  so stop text never reaches the client, streamed or not;
- UTF-8 characters split across tokens are held back until complete.

Everything here blocks: it runs on the model's own thread (see engine.py).
"""

from __future__ import annotations

import codecs
import random
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from protocol import Usage

FinishReason = Literal["stop", "length"]

_LLAMA_DEFAULT_SEED = 0xFFFFFFFF
"""llama.cpp reads this seed as "pick one at random", so it is never passed on."""


class Cancelled(Exception):
    """Raised inside generation when the request was cancelled.

    `generated` counts the tokens the interrupted generation had made; `usage`, once the engine adds it,
    what the whole request used until then (None where that is not known).
    """

    def __init__(self, generated: int = 0, usage: Usage | None = None) -> None:
        super().__init__("cancelled")
        self.generated = generated
        self.usage = usage


@dataclass(frozen=True)
class Sampling:
    """How to sample one choice, in llama.cpp's terms, with OpenAI's defaults."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repeat_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    seed: int | None = None
    max_tokens: int | None = None
    """Tokens to generate at most; None: up to the context length."""
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    top_logprobs: int | None = None
    """None: no log probabilities; otherwise how many alternatives to report per token (0-20)."""
    grammar: str | None = None
    """GBNF the output must match (structured outputs, tool calls)."""


def llama_seed(seed: int) -> int:
    """A client's seed (any integer) as a llama.cpp seed (32 bits, never the "random" value)."""
    return seed % _LLAMA_DEFAULT_SEED


def choice_seeds(seed: int | None, n: int) -> list[int]:
    """The seed of each of n choices: seed, seed+1, ... if the client gave one, else random ones."""
    if seed is None:
        return [random.randrange(_LLAMA_DEFAULT_SEED) for _ in range(n)]
    return [llama_seed(seed + index) for index in range(n)]


@dataclass(frozen=True)
class TopLogprob:
    """One of the most likely tokens at a position."""

    token: str
    logprob: float
    bytes: list[int]


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token, its log probability, and the most likely alternatives at its position."""

    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


@dataclass(frozen=True)
class Piece:
    """Text ready to be sent, the log probabilities of the tokens it completes, and how many tokens it took.

    `tokens` counts the generated tokens since the previous piece, up to the last one whose text (some
    of it) this piece carries: summed over a choice's pieces, every generated token is counted once,
    except those after the last piece (text held back and then dropped: a stop sequence, say).
    """

    text: str
    logprobs: list[TokenLogprob]
    tokens: int = 0


@dataclass(frozen=True)
class Generation:
    """One finished choice."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: list[TokenLogprob] | None


class _LogitsHook:
    """The logits processor: keeps log probabilities, applies logit_bias, bans end-of-generation tokens.

    It runs inside a ctypes callback, where an exception would be printed and swallowed, so it never
    raises; cancellation is checked by the loop between tokens instead.
    """

    def __init__(self, top_logprobs: int | None, bias: dict[int, float], banned: list[int]) -> None:
        self.want_logprobs = top_logprobs is not None
        self.bias_ids = np.array(list(bias), dtype=np.intc)
        self.bias_values = np.array(list(bias.values()), dtype=np.single)
        self.banned = np.array(banned, dtype=np.intc)
        self.logprobs: npt.NDArray[np.float64] | None = None

    def __call__(
        self, input_ids: npt.NDArray[np.intc], scores: npt.NDArray[np.single]
    ) -> npt.NDArray[np.single]:
        if self.want_logprobs:
            # The model's own distribution, before bias and bans: what OpenAI's logprobs describe.
            raw = scores.astype(np.float64)
            peak = raw.max()
            self.logprobs = raw - (peak + np.log(np.exp(raw - peak).sum()))
        if self.bias_ids.size:
            scores[self.bias_ids] += self.bias_values
        if self.banned.size:
            scores[self.banned] = -np.inf
        return scores


def _held_back(text: str, start: int, stops: tuple[str, ...]) -> int:
    """Length of the longest end of text[start:] that could begin a stop sequence."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text) - start), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


def _first_stop(text: str, start: int, stops: tuple[str, ...]) -> int | None:
    positions = [found for stop in stops if (found := text.find(stop, start)) != -1]
    return min(positions) if positions else None


def _token_text(llama: Any, token: int) -> bytes:
    piece: bytes = llama.detokenize([token])
    return piece


def end_of_generation_tokens(llama: Any) -> tuple[int, ...]:
    """Every token that ends generation (EOS, EOT, <|im_end|>...).

    ignore_eos must ban all of them, or a model that may not say EOS says another one and stops anyway.
    """
    import llama_cpp

    vocab = llama._model.vocab
    return tuple(token for token in range(llama.n_vocab()) if llama_cpp.llama_vocab_is_eog(vocab, token))


def generate(
    llama: Any,
    prompt: list[int],
    sampling: Sampling,
    cancel: threading.Event,
    on_piece: Callable[[Piece], None] | None = None,
    *,
    eog_tokens: Sequence[int] = (),
) -> Generation:
    """Generate one choice for `prompt` (tokens). Pieces of text go to `on_piece` as they become final.

    The caller has checked that the prompt fits the context; generation ends at the context's end.
    `eog_tokens` (see end_of_generation_tokens) are banned when the request ignores EOS.
    """
    import llama_cpp
    from llama_cpp.llama_grammar import LlamaGrammar

    room = llama.n_ctx() - len(prompt)
    limit = room if sampling.max_tokens is None else min(sampling.max_tokens, room)
    if limit <= 0:
        return Generation("", "length", 0, [] if sampling.top_logprobs is not None else None)
    vocab = llama._model.vocab
    banned = list(eog_tokens or [llama.token_eos()]) if sampling.ignore_eos else []
    hook = _LogitsHook(sampling.top_logprobs, sampling.logit_bias, banned)
    grammar = None
    if sampling.grammar is not None:
        grammar = LlamaGrammar.from_string(sampling.grammar, verbose=False)
    llama.set_seed(sampling.seed if sampling.seed is not None else choice_seeds(None, 1)[0])

    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = ""
    emitted = 0
    # (start, end) of each generated token in `text`, and its log probabilities if asked for.
    spans: list[tuple[int, int]] = []
    entries: list[TokenLogprob] = []
    reported = 0
    finish: FinishReason = "length"
    cut: int | None = None
    count = 0
    counted = 0  # tokens attributed to pieces already given to on_piece

    def take_logprobs(upto: int, *, by_start: bool = False) -> list[TokenLogprob]:
        # Each token is reported once: when its text is wholly sent, or at a stop, if it begins before
        # the stop (a token wholly inside the stop text is not part of the answer).
        nonlocal reported
        end = reported
        while end < len(entries) and (spans[end][0] < upto if by_start else spans[end][1] <= upto):
            end += 1
        taken = entries[reported:end]
        reported = end
        return taken

    tokens = llama.generate(
        prompt,
        top_k=sampling.top_k,
        top_p=sampling.top_p,
        min_p=sampling.min_p,
        typical_p=1.0,
        temp=sampling.temperature,
        repeat_penalty=sampling.repeat_penalty,
        frequency_penalty=sampling.frequency_penalty,
        presence_penalty=sampling.presence_penalty,
        logits_processor=[hook],
        grammar=grammar,
    )
    try:
        for token in tokens:
            if cancel.is_set():
                raise Cancelled(count)
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                finish = "stop"
                break
            count += 1
            piece = _token_text(llama, token)
            start = len(text)
            text += decoder.decode(piece)
            spans.append((start, len(text)))
            if hook.logprobs is not None:
                entries.append(_token_logprob(llama, token, piece, hook.logprobs, sampling.top_logprobs or 0))
            cut = _first_stop(text, emitted, sampling.stop)
            if cut is not None:
                finish = "stop"
                break
            if count >= limit:
                break
            ready = len(text) - _held_back(text, emitted, sampling.stop)
            if on_piece is not None and ready > emitted:
                on_piece(Piece(text[emitted:ready], take_logprobs(ready), count - counted))
                emitted, counted = ready, count
    finally:
        tokens.close()
    if cut is not None:
        text = text[:cut]
        rest = take_logprobs(cut, by_start=True)
    else:
        text += decoder.decode(b"", final=True)
        rest = take_logprobs(len(text))
    if on_piece is not None and (len(text) > emitted or rest):
        on_piece(Piece(text[emitted:], rest, count - counted))
    return Generation(text, finish, count, entries[:reported] if sampling.top_logprobs is not None else None)


def _token_logprob(
    llama: Any, token: int, piece: bytes, logprobs: npt.NDArray[np.float64], top: int
) -> TokenLogprob:
    alternatives: list[TopLogprob] = []
    if top > 0:
        best = np.argpartition(-logprobs, top)[:top]
        for candidate in best[np.argsort(-logprobs[best])]:
            text = _token_text(llama, int(candidate))
            alternatives.append(
                TopLogprob(text.decode("utf-8", errors="replace"), float(logprobs[candidate]), list(text))
            )
    return TokenLogprob(
        piece.decode("utf-8", errors="replace"), float(logprobs[token]), list(piece), alternatives
    )
