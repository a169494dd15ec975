"""One sequence's sampler chain in llama.cpp: the request's sampling parameters as native samplers.

The chain is the one llama-cpp-python builds for `Llama.generate` (the engine's other path), so a seeded
request samples the same tokens from the same logits on either path: logit bias and banned tokens,
then repetition penalties, then greedy at temperature 0, else top-k, top-p, min-p, temperature and a
seeded draw. Each sequence owns its chain: penalties and the random state are per sequence.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import llama_cpp

from workerbee.decoding import Sampling

PENALTY_LAST_N = 64
"""Tokens the repetition penalties look back over: llama-cpp-python's `last_n_tokens_size` default."""


class SamplerChain:
    """A llama.cpp sampler chain for one sequence; `close()` frees it."""

    def __init__(self, sampling: Sampling, *, n_vocab: int, seed: int, banned: Iterable[int] = ()) -> None:
        self._chain: Any = llama_cpp.llama_sampler_chain_init(llama_cpp.llama_sampler_chain_default_params())
        try:
            self._build(sampling, n_vocab, seed, tuple(banned))
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

    def sample(self, ctx: Any, index: int) -> int:
        """Sample the token for the logits at `index` of the last decoded batch (and remember it)."""
        return int(llama_cpp.llama_sampler_sample(self._chain, ctx, index))

    def close(self) -> None:
        """Free the chain and its samplers (idempotent)."""
        if self._chain is not None:
            llama_cpp.llama_sampler_free(self._chain)
            self._chain = None
