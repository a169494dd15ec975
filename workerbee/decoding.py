"""What a generation is, shared by the scheduler and the answer shapes: sampling parameters, seeds,
pieces of text with their log probabilities, finished choices.

The token loop itself is the scheduler's (scheduler.py); this module only names its inputs and outputs.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]

_LLAMA_DEFAULT_SEED = 0xFFFFFFFF
"""llama.cpp reads this seed as "pick one at random", so it is never passed on."""


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


class TokenIds(int):
    """A count of generated tokens that also names them: the number a chunk carries, and their ids.

    An int, so that whoever only counts tokens counts them as before; `ids` is what a resume needs.
    """

    ids: tuple[int, ...]

    def __new__(cls, ids: tuple[int, ...] | list[int] = ()) -> TokenIds:
        """The count of `ids`, carrying them."""
        self = super().__new__(cls, len(ids))
        self.ids = tuple(ids)
        return self


def token_ids(count: int, ids: list[int] | tuple[int, ...]) -> int:
    """`count` as a TokenIds when `ids` are exactly those tokens, else the bare count."""
    return TokenIds(ids) if len(ids) == count else count


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
    ids: tuple[int, ...] = ()
    """The ids of those tokens, when known (they are, from the scheduler)."""


@dataclass(frozen=True)
class Generation:
    """One finished choice."""

    text: str
    finish_reason: FinishReason
    completion_tokens: int
    logprobs: list[TokenLogprob] | None
    stop_sequence: str | None = None
    """The stop sequence that ended the choice, if one did."""
