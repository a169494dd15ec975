"""Host-RAM prompt cache (`--cache-ram MiB`): KV states of evicted slots, kept so that they come back.

A worker has `--parallel` slots, and a slot's cache lives only until another prompt takes the slot. With
a host cache, the scheduler saves a slot's sequence state (llama.cpp's `llama_state_seq_get_data`, the
KV cells and their positions) before a prompt that shares little with it overwrites it, and restores a
saved state into the slot a newcomer gets when the state shares more with the newcomer's prompt than
any slot does (`llama_state_seq_set_data`). The restored prefix is not decoded again: it counts as
cached. States are kept least recently used first out, within the byte budget; a state is taken out
of RAM when it is restored (the slot holds it then, and it is saved again if evicted again).

Sans-I/O: the scheduler's thread owns it, like the slots; the bytes come from llama_context.py.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import count

from workerbee.llama_context import longest_common_prefix
from workerbee.prefix_cache import Block

MIN_SAVED_TOKENS = 64
"""Tokens a slot must hold beyond what the newcomer keeps before its state is worth saving."""


@dataclass
class SavedState:
    """A sequence's KV state as llama.cpp serialised it, the tokens it holds, and their blocks."""

    tokens: list[int]
    data: bytes
    blocks: list[Block] = field(default_factory=list)


class HostCache:
    """Saved sequence states within `capacity` bytes, least recently used evicted first."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self.saved = 0
        """States saved (for tests and stats)."""
        self.restored = 0
        """States restored into a slot."""
        self._states: OrderedDict[int, SavedState] = OrderedDict()
        self._ids = count()

    def __len__(self) -> int:
        return len(self._states)

    def put(self, state: SavedState) -> bool:
        """Keep a state (dropping the oldest ones to make room, and any it extends); False if too big."""
        size = len(state.data)
        if size > self.capacity:
            return False
        for key, kept in list(self._states.items()):
            if longest_common_prefix(kept.tokens, state.tokens) == len(kept.tokens):
                self._drop(key)  # the new state holds all of it and more
        while self.used + size > self.capacity and self._states:
            self._drop(next(iter(self._states)))
        self._states[next(self._ids)] = state
        self.used += size
        self.saved += 1
        return True

    def best(self, prompt: Sequence[int]) -> tuple[int, int] | None:
        """The key of the state sharing the longest prefix with `prompt`, and how long; None if none."""
        found: tuple[int, int] | None = None
        for key, state in self._states.items():
            shared = longest_common_prefix(state.tokens, prompt)
            if shared > 0 and (found is None or shared > found[1]):
                found = (key, shared)
        return found

    def take(self, key: int) -> SavedState:
        """Remove a state to restore it."""
        state = self._states[key]
        self._drop(key)
        self.restored += 1
        return state

    def blocks(self) -> Iterator[list[Block]]:
        """The blocks of every state kept: what the cache summary says host RAM holds."""
        for state in self._states.values():
            yield state.blocks

    def _drop(self, key: int) -> None:
        state = self._states.pop(key)
        self.used -= len(state.data)
