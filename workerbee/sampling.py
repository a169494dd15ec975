"""One sequence's sampling in llama.cpp: the request's parameters as a native sampler chain, a grammar,
and log probabilities read from the batch's logits.

The chain is the one llama-cpp-python builds for `Llama.generate`: logit bias and banned tokens, then
repetition penalties, then greedy at temperature 0, else top-k, top-p, min-p, temperature and a seeded
draw. Each sequence owns its chain: penalties and the random state are per sequence.

A resumed choice (another worker relayed its first tokens) advances its chain over those tokens with
`advance`: the penalties and the grammar accept each, and a seeded draw consumes one random number per
token, as the original sampling did, so a seeded answer continues with the draws it would have made.

A grammar is checked the way llama.cpp's own server does it: the chain picks a token from the raw
logits; only if the grammar refuses it is the grammar applied to the whole vocabulary and the token
picked again. Most steps then cost one grammar check of one token instead of one per vocabulary entry.
At temperature 0 a refused token costs less still: the grammar checks the 64 best tokens in greedy's
order (then 2,048), and the first it allows is the answer, the one the whole vocabulary would give
(about 7 ms for SmolLM2's 49,152 tokens on one core, against well under one for the 64).
"""

from __future__ import annotations

import ctypes
import math
from collections.abc import Iterable
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt

from workerbee.decoding import Sampling, TokenLogprob, TopLogprob
from workerbee.llama_context import MultiSequenceContext, Vocabulary

PENALTY_LAST_N = 64
"""Tokens the repetition penalties look back over: llama-cpp-python's `last_n_tokens_size` default."""

GRAMMAR_WIDTHS = (64, 2048)
"""How many of the best tokens a greedy grammar check tries, in turn, before the whole vocabulary."""

# llama_token_data as numpy lays it out: candidates are filled from the logits row without a Python loop.
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


class GrammarRefused(ValueError):
    """llama.cpp could not parse a grammar."""


class _Candidates:
    """A llama_token_data_array over a numpy buffer, refilled from a logits row before each use."""

    def __init__(self, size: int) -> None:
        self.data = np.zeros(size, dtype=_TOKEN_DATA)
        self.ids = np.arange(size, dtype=np.int32)
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p), size=size, selected=-1, sorted=False
        )
        self.pointer = ctypes.byref(self.array)

    def fill(self, logits: npt.NDArray[np.float32]) -> None:
        """Every token with its raw logit, unsorted, nothing selected."""
        self.data["id"] = self.ids[: len(self.data)]
        self.data["logit"] = logits
        self.data["p"] = 0.0
        self.array.size = len(self.data)
        self.array.selected = -1
        self.array.sorted = False

    def selected(self) -> int:
        """The token the last sampler selected."""
        return int(self.array.data[self.array.selected].id)


class SamplerChain:
    """A llama.cpp sampler chain (and grammar) for one sequence; `close()` frees it."""

    def __init__(
        self, sampling: Sampling, *, vocab: Vocabulary, seed: int, banned: Iterable[int] = ()
    ) -> None:
        self._chain: Any = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        self._grammar: Any = None
        self._dist: Any = None
        """The chain's seeded draw (owned by the chain); None when greedy."""
        self._all: _Candidates | None = None
        self._one: _Candidates | None = None
        self._few: dict[int, _Candidates] = {}
        """Candidate arrays for the narrower grammar checks (`_best_allowed`), by width."""
        try:
            self._build(sampling, vocab.n_tokens, seed, tuple(banned))
            if sampling.grammar is not None:
                self._grammar = llama_cpp.llama_sampler_init_grammar(
                    vocab.raw, sampling.grammar.encode("utf-8"), b"root"
                )
                if not self._grammar:
                    self._grammar = None
                    raise GrammarRefused("llama.cpp could not parse the grammar")
                self._all = _Candidates(vocab.n_tokens)
                self._one = _Candidates(1)
        except BaseException:
            self.close()
            raise

    def _add(self, sampler: Any) -> None:
        # The chain owns what is added to it and frees it with itself.
        llama_cpp.llama_sampler_chain_add(self._chain, sampler)

    def _build(self, sampling: Sampling, n_vocab: int, seed: int, banned: tuple[int, ...]) -> None:
        bias = [(token, value) for token, value in sampling.logit_bias.items()]
        bias += [(token, float("-inf")) for token in banned]
        if bias:
            entries = (llama_cpp.llama_logit_bias * len(bias))()
            for entry, (token, value) in zip(entries, bias, strict=True):
                entry.token = token
                entry.bias = value
            self._add(llama_cpp.llama_sampler_init_logit_bias(n_vocab, len(bias), entries))
        penalized = (
            sampling.repeat_penalty != 1.0
            or sampling.frequency_penalty != 0.0
            or sampling.presence_penalty != 0.0
        )
        if penalized:
            self._add(
                llama_cpp.llama_sampler_init_penalties(
                    n_vocab,
                    PENALTY_LAST_N,
                    sampling.repeat_penalty,
                    sampling.frequency_penalty,
                    sampling.presence_penalty,
                )
            )
        if sampling.temperature == 0:
            self._add(llama_cpp.llama_sampler_init_greedy())
            return
        self._add(llama_cpp.llama_sampler_init_top_k(sampling.top_k))
        self._add(llama_cpp.llama_sampler_init_top_p(sampling.top_p, 1))
        self._add(llama_cpp.llama_sampler_init_min_p(sampling.min_p, 1))
        self._add(llama_cpp.llama_sampler_init_temp(sampling.temperature))
        self._add(llama_cpp.llama_sampler_init_dist(seed))
        self._dist = llama_cpp.llama_sampler_chain_get(
            self._chain, llama_cpp.llama_sampler_chain_n(self._chain) - 1
        )

    def sample(self, context: MultiSequenceContext, index: int) -> int:
        """Sample the token for the logits at `index` of the last decoded batch (and remember it)."""
        if self._grammar is None:
            return int(llama_cpp.llama_sampler_sample(self._chain, context.raw, index))
        return self.sample_row(context.logits_row(index))

    def sample_row(self, logits: npt.NDArray[np.float32]) -> int:
        """Sample the token for a row of logits with the grammar (and remember it)."""
        assert self._grammar is not None
        assert self._all is not None
        assert self._one is not None
        candidates = self._all
        candidates.fill(logits)
        llama_cpp.llama_sampler_apply(self._chain, candidates.pointer)
        token = candidates.selected()
        one = self._one
        one.data[0] = (token, logits[token], 0.0)
        one.array.size, one.array.selected, one.array.sorted = 1, -1, False
        llama_cpp.llama_sampler_apply(self._grammar, one.pointer)
        if not np.isfinite(one.data[0]["logit"]):
            best = self._best_allowed(candidates) if self._dist is None else None
            if best is None:
                candidates.fill(logits)
                llama_cpp.llama_sampler_apply(self._grammar, candidates.pointer)
                llama_cpp.llama_sampler_apply(self._chain, candidates.pointer)
                best = candidates.selected()
            token = best
        llama_cpp.llama_sampler_accept(self._grammar, token)
        llama_cpp.llama_sampler_accept(self._chain, token)
        return token

    def _best_allowed(self, candidates: _Candidates) -> int | None:
        """Greedy under the grammar without checking the whole vocabulary: the best token it allows.

        `candidates` hold every token after the chain's bias and penalties (greedy only selects, it
        moves nothing). The grammar checks the best GRAMMAR_WIDTHS[0] of them, then more, in the order
        greedy would rank them (logit, then id): the first it allows is what the whole-vocabulary check
        would pick. None if none of the widest set passes (then the caller checks them all).
        """
        assert self._grammar is not None
        logits = candidates.data["logit"]
        for width in GRAMMAR_WIDTHS:
            if width >= len(logits):
                return None
            best = np.argpartition(logits, -width)[-width:]
            ranked = best[np.lexsort((best, -logits[best]))]
            few = self._few.get(width)
            if few is None:
                few = self._few[width] = _Candidates(width)
            few.data["id"] = ranked
            few.data["logit"] = logits[ranked]
            few.data["p"] = 0.0
            few.array.size, few.array.selected, few.array.sorted = width, -1, False
            llama_cpp.llama_sampler_apply(self._grammar, few.pointer)
            passed = np.isfinite(few.data["logit"])
            if passed.any():
                return int(few.data["id"][int(np.argmax(passed))])
        return None

    def advance(self, tokens: Iterable[int]) -> None:
        """Take tokens as if this chain had sampled them: a resumed choice's relayed tokens.

        Each seeded draw is consumed on a two-way tie, so that the random state moves as it did when the
        tokens were drawn (exact unless a grammar made that step draw twice).
        """
        tie = _Candidates(2) if self._dist is not None else None
        for token in tokens:
            if tie is not None:
                tie.fill(np.zeros(2, dtype=np.float32))
                tie.data["p"] = 0.5
                llama_cpp.llama_sampler_apply(self._dist, tie.pointer)
            if self._grammar is not None:
                llama_cpp.llama_sampler_accept(self._grammar, token)
            llama_cpp.llama_sampler_accept(self._chain, token)

    def replay(
        self, logits: npt.NDArray[np.float32], token: int
    ) -> tuple[int, npt.NDArray[np.int32], npt.NDArray[np.float64]]:
        """Draw from `logits` as `sample` would, then take `token` as the one sampled instead.

        What an auditor does to check another worker's seeded answer on its own logits (auditor.py).
        Returns the token drawn and the distribution it was drawn from: the tokens left after bias,
        penalties, top-k, top-p and min-p, in the order the draw walks them, with their probabilities
        at the temperature. The draw consumes the random state exactly as `sample` does. Not for
        grammars.
        """
        if self._grammar is not None or self._dist is None:
            raise ValueError("only a seeded chain without a grammar can be replayed")
        if self._all is None or len(self._all.data) != len(logits):
            self._all = _Candidates(len(logits))
        candidates = self._all
        candidates.fill(logits)
        last = llama_cpp.llama_sampler_chain_n(self._chain) - 1
        for position in range(last):
            llama_cpp.llama_sampler_apply(
                llama_cpp.llama_sampler_chain_get(self._chain, position), candidates.pointer
            )
        if ctypes.cast(candidates.array.data, ctypes.c_void_p).value != candidates.data.ctypes.data:
            raise RuntimeError("a sampler replaced the candidates array")
        kept = candidates.data[: candidates.array.size].copy()
        scaled = kept["logit"].astype(np.float64)
        finite = np.isfinite(scaled)
        weights = np.where(finite, np.exp(scaled - scaled[finite].max(initial=-np.inf)), 0.0)
        total = weights.sum()
        llama_cpp.llama_sampler_apply(self._dist, candidates.pointer)
        drawn = candidates.selected()
        llama_cpp.llama_sampler_accept(self._chain, token)
        return drawn, kept["id"], weights / total if total > 0 else weights

    def close(self) -> None:
        """Free the chain, the grammar and their samplers (idempotent)."""
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
        if self._grammar is not None:
            llama_cpp.llama_sampler_free(self._grammar)
            self._grammar = None


def token_logprob(vocab: Vocabulary, logits: npt.NDArray[np.float32], token: int, top: int) -> TokenLogprob:
    """A sampled token's log probability in the model's own distribution (before bias, bans, grammar),
    and the `top` most likely tokens at its position.

    Only the normalizer is computed over the whole row (one exp of float32s, summed in float64); the
    log probabilities themselves only for the tokens reported: a full log-softmax in float64 per token
    cost three times as much.
    """
    peak = float(logits.max())
    shifted = logits - peak
    np.exp(shifted, out=shifted)
    normalizer = peak + math.log(float(shifted.sum(dtype=np.float64)))
    alternatives: list[TopLogprob] = []
    if top > 0:
        best = np.argpartition(logits, -top)[-top:]
        for candidate in best[np.argsort(-logits[best], kind="stable")]:
            piece = vocab.piece(int(candidate))
            alternatives.append(
                TopLogprob(
                    piece.decode("utf-8", errors="replace"),
                    float(logits[candidate]) - normalizer,
                    list(piece),
                )
            )
    piece = vocab.piece(token)
    return TokenLogprob(
        piece.decode("utf-8", errors="replace"), float(logits[token]) - normalizer, list(piece), alternatives
    )
