"""Greedy sampling under a grammar: the narrow check picks what the whole-vocabulary check picks.

The reference applies the grammar to every token of SmolLM2's vocabulary and takes the best logit
left (the lowest id among equals), as llama.cpp's greedy sampler would; the engine's chain checks only
the best tokens first (workerbee/sampling.py). Logits are random rows, so the model's favourite token
is almost never one the grammar allows, and with the digits grammar the allowed one is often far down.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterator

import llama_cpp
import numpy as np
import pytest
from servers import smollm2_path

from workerbee.decoding import Sampling
from workerbee.llama_context import ModelWeights
from workerbee.sampling import GRAMMAR_WIDTHS, SamplerChain

TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)
GRAMMARS = {
    "words": 'root ::= "{\\"answer\\": \\"" [a-z ]+ "\\"}"',
    "digits": 'root ::= "[" [0-9]+ ("," [0-9]+)* "]"',
    "text": "root ::= [a-zA-Z ]+",
}


@pytest.fixture(scope="module")
def weights() -> Iterator[ModelWeights]:
    """SmolLM2's vocabulary."""
    model = ModelWeights(smollm2_path())
    yield model
    model.close()


class WholeVocabulary:
    """The reference: the grammar applied to every token, then the best logit left."""

    def __init__(self, weights: ModelWeights, grammar: str) -> None:
        self.sampler = llama_cpp.llama_sampler_init_grammar(weights.vocab.raw, grammar.encode(), b"root")
        self.data = np.zeros(weights.vocab.n_tokens, dtype=TOKEN_DATA)
        self.array = llama_cpp.llama_token_data_array(
            data=self.data.ctypes.data_as(llama_cpp.llama_token_data_p),
            size=len(self.data),
            selected=-1,
            sorted=False,
        )

    def pick(self, logits: np.ndarray) -> int:
        self.data["id"] = np.arange(len(self.data))
        self.data["logit"] = logits
        self.array.size, self.array.selected, self.array.sorted = len(self.data), -1, False
        llama_cpp.llama_sampler_apply(self.sampler, ctypes.byref(self.array))
        return int(np.argmax(self.data["logit"]))  # the first of the best: the lowest id

    def accept(self, token: int) -> None:
        llama_cpp.llama_sampler_accept(self.sampler, token)

    def close(self) -> None:
        llama_cpp.llama_sampler_free(self.sampler)


def test_greedy_under_a_grammar_picks_what_the_whole_vocabulary_check_picks(weights: ModelWeights) -> None:
    rng = np.random.default_rng(7)
    ranks: list[int] = []
    """How many tokens had a higher logit than each answer."""
    for grammar in GRAMMARS.values():
        chain = SamplerChain(Sampling(temperature=0, grammar=grammar), vocab=weights.vocab, seed=0)
        reference = WholeVocabulary(weights, grammar)
        try:
            for _ in range(40):
                logits = rng.normal(0.0, 3.0, weights.vocab.n_tokens).astype(np.float32)
                logits[rng.integers(0, len(logits), 50)] = logits.max()  # ties at the top, too
                expected = reference.pick(logits.copy())
                assert chain.sample_row(logits.copy()) == expected
                ranks.append(int((logits > logits[expected]).sum()))
                reference.accept(expected)
        finally:
            chain.close()
            reference.close()
    # The answers came from every stage: the first narrow check, the wider one, the whole vocabulary.
    narrow, wide = GRAMMAR_WIDTHS
    assert any(rank < narrow for rank in ranks)
    assert any(narrow <= rank < wide for rank in ranks)
    assert any(rank >= wide for rank in ranks)


def test_a_grammar_check_with_bias_and_penalties_ranks_by_the_changed_logits(weights: ModelWeights) -> None:
    """Logit bias (here pushing one allowed token to the top) counts before the grammar picks."""
    grammar = GRAMMARS["digits"]
    seven = weights.tokenize("7", add_bos=False, special=False)[0]
    sampling = Sampling(temperature=0, grammar=grammar, logit_bias={seven: 100.0}, repeat_penalty=1.3)
    chain = SamplerChain(sampling, vocab=weights.vocab, seed=0)
    try:
        logits = np.random.default_rng(3).normal(0.0, 3.0, weights.vocab.n_tokens).astype(np.float32)
        bracket = weights.tokenize("[", add_bos=False, special=False)[0]
        logits[bracket] = logits.max() + 1
        assert chain.sample_row(logits.copy()) == bracket
        assert chain.sample_row(logits.copy()) == seven
    finally:
        chain.close()
