"""A llama.cpp context for many sequences at once, behind small typed wrappers of llama_cpp's ctypes API.

llama-cpp-python's `Llama` decodes one sequence at a time. This module talks to llama.cpp's C API
directly (through `llama_cpp`'s bindings) so that one `llama_decode` call advances several sequences:
a `TokenBatch` carries tokens of many sequences, and a `MultiSequenceContext` owns the context whose KV
cache keeps one stream per sequence.

Everything here blocks and must run on the one thread that owns the context (see batching.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from typing import Any

import llama_cpp


class DecodeError(Exception):
    """llama_decode failed; `code` is its return value (1: no room left in the KV cache)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode failed with {code}")
        self.code = code


class TokenBatch:
    """A llama_batch: tokens of any sequences, each at its position, some asking for logits."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._batch: Any = llama_cpp.llama_batch_init(capacity, 0, 1)
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def clear(self) -> None:
        """Empty the batch for the next step."""
        self._size = 0
        self._batch.n_tokens = 0

    def add(self, token: int, position: int, seq_id: int, logits: bool) -> int:
        """Append one token; returns its index in the batch (where its logits will be, if asked for)."""
        index = self._size
        if index >= self.capacity:
            raise IndexError(f"the batch holds at most {self.capacity} tokens")
        batch = self._batch
        batch.token[index] = token
        batch.pos[index] = position
        batch.n_seq_id[index] = 1
        batch.seq_id[index][0] = seq_id
        batch.logits[index] = logits
        self._size = index + 1
        batch.n_tokens = self._size
        return index

    @property
    def raw(self) -> Any:
        """The llama_batch struct, for llama_decode."""
        return self._batch

    def close(self) -> None:
        """Free the batch's arrays (idempotent)."""
        if self._batch is not None:
            llama_cpp.llama_batch_free(self._batch)
            self._batch = None


class Vocabulary:
    """What the engine needs of a model's vocabulary: sizes, end-of-generation tokens, token bytes."""

    def __init__(self, model: Any) -> None:
        self._vocab: Any = llama_cpp.llama_model_get_vocab(model)
        self.n_tokens = int(llama_cpp.llama_vocab_n_tokens(self._vocab))
        # Every token that ends generation (EOS, EOT, <|endoftext|>...): ignore_eos must ban all of them,
        # or a model that cannot say EOS says another one and stops early anyway.
        self.eog_tokens: tuple[int, ...] = tuple(
            token for token in range(self.n_tokens) if llama_cpp.llama_vocab_is_eog(self._vocab, token)
        )
        self._eog = frozenset(self.eog_tokens)
        self._buffer = ctypes.create_string_buffer(64)
        self._pieces: dict[int, bytes] = {}

    def is_eog(self, token: int) -> bool:
        """Whether `token` ends generation."""
        return token in self._eog

    def piece(self, token: int) -> bytes:
        """The bytes a generated token stands for (special tokens: none, as in llama-cpp-python)."""
        cached = self._pieces.get(token)
        if cached is not None:
            return cached
        size = llama_cpp.llama_token_to_piece(self._vocab, token, self._buffer, len(self._buffer), 0, False)
        if size < 0:
            self._buffer = ctypes.create_string_buffer(-size)
            size = llama_cpp.llama_token_to_piece(
                self._vocab, token, self._buffer, len(self._buffer), 0, False
            )
        piece = self._buffer.raw[:size]
        self._pieces[token] = piece
        return piece


class MultiSequenceContext:
    """A llama.cpp context on an already loaded model, serving `n_seq` sequences of `n_ctx_seq` tokens each.

    The KV cache is not unified: each sequence has a stream of its own, so a token attends only to its
    own sequence's cells (a unified cache would make every token attend over all sequences' cells, masked)
    and a sequence's numbers do not depend on which others share the batch.
    """

    def __init__(
        self,
        model: Any,
        base_params: Any,
        *,
        n_seq: int,
        n_ctx_seq: int,
        n_batch: int,
        threads: int,
    ) -> None:
        params: Any = llama_cpp.llama_context_params.from_buffer_copy(base_params)
        params.n_ctx = n_ctx_seq * n_seq
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.kv_unified = False
        params.embeddings = False
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model, params)
        if ctx is None:
            raise RuntimeError("llama.cpp could not create a context for batched decoding")
        self._ctx: Any = ctx
        self._memory: Any = llama_cpp.llama_get_memory(ctx)
        self.n_seq = n_seq
        self.n_batch = n_batch
        self.n_ctx_seq = int(llama_cpp.llama_n_ctx_seq(ctx))
        self.threads = threads

    @property
    def raw(self) -> Any:
        """The llama_context pointer, for samplers."""
        return self._ctx

    def set_threads(self, threads: int) -> None:
        """Use `threads` CPU threads for every later decode."""
        llama_cpp.llama_set_n_threads(self._ctx, threads, threads)
        self.threads = threads

    def decode(self, batch: TokenBatch) -> None:
        """Run the model on every token of the batch. Raises DecodeError."""
        code = int(llama_cpp.llama_decode(self._ctx, batch.raw))
        if code != 0:
            raise DecodeError(code)

    def remove(self, seq_id: int, start: int = 0) -> int:
        """Forget a sequence's cells from position `start` on; returns how many leading cells it keeps.

        Removing a whole sequence never fails; keeping a prefix can (recurrent models), and then the
        whole sequence is forgotten and 0 returned.
        """
        if llama_cpp.llama_memory_seq_rm(self._memory, seq_id, start, -1):
            return start
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        return 0

    def copy(self, source: int, destination: int) -> None:
        """Make `destination`'s stream a copy of `source`'s (the data moves at the next decode)."""
        llama_cpp.llama_memory_seq_cp(self._memory, source, destination, -1, -1)

    def last_position(self, seq_id: int) -> int:
        """The highest position held for a sequence, -1 if it holds none."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id))

    def close(self) -> None:
        """Free the context (idempotent); the model stays loaded."""
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


def longest_common_prefix(left: Sequence[int], right: Sequence[int]) -> int:
    """How many leading tokens two token lists share."""
    limit = min(len(left), len(right))
    for index in range(limit):
        if left[index] != right[index]:
            return index
    return limit
