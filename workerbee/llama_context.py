"""llama.cpp behind small typed wrappers of llama_cpp's ctypes API: the only module that touches it.

llama-cpp-python's `Llama` decodes one sequence at a time and keeps a KV cache of its own. The engine
uses none of it: this module talks to llama.cpp's C API directly (through `llama_cpp`'s bindings).

- `ModelWeights`: a GGUF loaded once (weights, metadata, tokenizer), shared by every context on it;
- `TokenBatch`: tokens of many sequences for one `llama_decode`;
- `MultiSequenceContext`: the generating context, whose KV cache keeps one stream per sequence, and
  `logits_row` to read a sequence's logits after a decode;
- `EmbeddingContext`: a pooled context that embeds several inputs in one decode;
- `Vocabulary`: end-of-generation tokens and token bytes.

A context blocks and must be used only by the one thread that owns it (see scheduler.py).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np
import numpy.typing as npt
from llama_cpp import _internals, _logger


class DecodeError(Exception):
    """llama_decode failed; `code` is its return value (1: no room left in the KV cache)."""

    def __init__(self, code: int) -> None:
        super().__init__(f"llama_decode failed with {code}")
        self.code = code


class ModelWeights:
    """A GGUF model loaded into memory (memory-mapped): weights, metadata and tokenizer, no context."""

    def __init__(
        self,
        path: Path,
        *,
        n_gpu_layers: int = 0,
        main_gpu: int = 0,
        tensor_split: Sequence[float] | None = None,
    ) -> None:
        # llama.cpp's own log lines only for errors (llama-cpp-python's default prints them all).
        _logger.set_verbose(False)
        params: Any = llama_cpp.llama_model_default_params()
        params.n_gpu_layers = n_gpu_layers
        params.main_gpu = main_gpu
        if tensor_split:
            if len(tensor_split) > llama_cpp.LLAMA_MAX_DEVICES:
                raise ValueError(f"a split over more than {llama_cpp.LLAMA_MAX_DEVICES} devices")
            # Kept on self: llama.cpp reads the array while loading.
            self._split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*tensor_split)
            params.tensor_split = self._split
        self._model: Any = _internals.LlamaModel(path_model=str(path), params=params, verbose=False)
        self.vocab = Vocabulary(self._model.model)
        self.metadata: dict[str, str] = self._model.metadata()
        self.n_embd = int(self._model.n_embd())
        self.bos = int(self._model.token_bos())
        self.eos = int(self._model.token_eos())
        self.add_bos = bool(self._model.add_bos_token())

    @property
    def raw(self) -> Any:
        """The llama_model pointer, for contexts."""
        return self._model.model

    def tokenize(self, text: str, *, add_bos: bool, special: bool = True) -> list[int]:
        """The tokens of `text` (special tokens such as <|im_start|> parsed as such when `special`)."""
        data = text.encode("utf-8")
        room = len(data) + 2
        tokens = (llama_cpp.llama_token * room)()
        count = int(llama_cpp.llama_tokenize(self.vocab.raw, data, len(data), tokens, room, add_bos, special))
        if count < 0:
            room = -count
            tokens = (llama_cpp.llama_token * room)()
            count = int(
                llama_cpp.llama_tokenize(self.vocab.raw, data, len(data), tokens, room, add_bos, special)
            )
        return list(tokens[:count])

    def detokenize(self, tokens: Sequence[int]) -> str:
        """The text of a token list (invalid UTF-8 replaced)."""
        return b"".join(self.vocab.piece(token) for token in tokens).decode("utf-8", errors="replace")

    def token_text(self, token: int) -> str:
        """A token's text as the vocabulary spells it (special tokens included): for chat templates."""
        if token < 0:
            return ""
        return str(self._model.token_get_text(token))

    def close(self) -> None:
        """Free the weights (after every context on them)."""
        self._model.close()


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
        self.raw = self._vocab
        """The llama_vocab pointer, for grammars."""
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
        model: ModelWeights,
        *,
        n_seq: int,
        n_ctx_seq: int,
        n_batch: int,
        threads: int,
    ) -> None:
        params: Any = llama_cpp.llama_context_default_params()
        # Flash attention off, as in llama-cpp-python's default: the numbers its users know.
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_ctx = n_ctx_seq * n_seq
        params.n_seq_max = n_seq
        params.n_batch = n_batch
        params.n_ubatch = n_batch
        params.kv_unified = False
        params.embeddings = False
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model.raw, params)
        if ctx is None:
            raise RuntimeError("llama.cpp could not create a context for batched decoding")
        self._ctx: Any = ctx
        self._memory: Any = llama_cpp.llama_get_memory(ctx)
        self.n_vocab = model.vocab.n_tokens
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

    def logits_row(self, index: int) -> npt.NDArray[np.float32]:
        """The logits of the batch's token at `index` after the last decode (a view: copy to keep it)."""
        pointer = llama_cpp.llama_get_logits_ith(self._ctx, index)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

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

    def save(self, seq_id: int) -> bytes:
        """A sequence's KV state (its cells and positions) as llama.cpp serialises it."""
        size = int(llama_cpp.llama_state_seq_get_size(self._ctx, seq_id))
        buffer = (ctypes.c_uint8 * size)()
        written = int(llama_cpp.llama_state_seq_get_data(self._ctx, buffer, size, seq_id))
        return bytes(memoryview(buffer)[:written])

    def restore(self, data: bytes, seq_id: int) -> bool:
        """Replace a sequence's cells with a state `save` made (of any sequence); False if refused."""
        llama_cpp.llama_memory_seq_rm(self._memory, seq_id, -1, -1)
        buffer = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        return int(llama_cpp.llama_state_seq_set_data(self._ctx, buffer, len(data), seq_id)) > 0

    def last_position(self, seq_id: int) -> int:
        """The highest position held for a sequence, -1 if it holds none."""
        return int(llama_cpp.llama_memory_seq_pos_max(self._memory, seq_id))

    def close(self) -> None:
        """Free the context (idempotent); the model stays loaded."""
        if self._ctx is not None:
            llama_cpp.llama_free(self._ctx)
            self._ctx = None


class EmbeddingContext:
    """A pooled llama.cpp context: each sequence of a decode gives one vector, for up to `n_seq` at once.

    The KV cache is unified and cleared after every decode, so the inputs of one call share its
    `n_ctx` cells. Decoder models declare no pooling: they are mean-pooled.
    """

    def __init__(self, model: ModelWeights, *, n_ctx: int, n_seq: int, threads: int) -> None:
        params: Any = llama_cpp.llama_context_default_params()
        params.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        params.n_ctx = n_ctx
        # A whole input must fit one batch for its pooled vector.
        params.n_batch = n_ctx
        params.n_ubatch = n_ctx
        params.n_seq_max = n_seq
        params.kv_unified = True
        params.embeddings = True
        arch = model.metadata.get("general.architecture", "")
        declared = f"{arch}.pooling_type" in model.metadata
        params.pooling_type = (
            llama_cpp.LLAMA_POOLING_TYPE_UNSPECIFIED if declared else llama_cpp.LLAMA_POOLING_TYPE_MEAN
        )
        params.n_threads = threads
        params.n_threads_batch = threads
        ctx = llama_cpp.llama_init_from_model(model.raw, params)
        if ctx is None:
            raise RuntimeError("llama.cpp could not create an embeddings context")
        self._ctx: Any = ctx
        self._memory: Any = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_seq = n_seq
        self.n_embd = model.n_embd
        self._batch = TokenBatch(self.n_ctx)

    def embed(self, inputs: Sequence[Sequence[int]]) -> list[npt.NDArray[np.float32]]:
        """The pooled vector of each input; together they hold at most n_ctx tokens and n_seq inputs."""
        batch = self._batch
        batch.clear()
        for seq_id, tokens in enumerate(inputs):
            for position, token in enumerate(tokens):
                batch.add(token, position, seq_id, True)
        try:
            code = int(llama_cpp.llama_decode(self._ctx, batch.raw))
            if code != 0:
                raise DecodeError(code)
            vectors = []
            for seq_id in range(len(inputs)):
                pooled = llama_cpp.llama_get_embeddings_seq(self._ctx, seq_id)
                vectors.append(np.array(pooled[: self.n_embd], dtype=np.float32))
            return vectors
        finally:
            llama_cpp.llama_memory_clear(self._memory, True)

    def close(self) -> None:
        """Free the context and its batch (idempotent)."""
        self._batch.close()
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
