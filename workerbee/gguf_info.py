"""What a GGUF model file needs in memory: its shape and the bytes of each layer, read from the header only.

The file is opened with `gguf.GGUFReader`, which memory-maps it: tensor data is never read, only the
metadata and the tensor table, so this is cheap even for a 70 GB model (the tokenizer arrays are the slow
part, a few seconds at most).

Split models (``name-00001-of-00003.gguf``, as written by ``llama-gguf-split`` and ``GGUFWriter``): pass
the first part. Its ``split.count`` metadata names the number of parts; the other parts are looked up
next to it under the same prefix and their tensors are added in, like llama.cpp does when loading.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

_BLOCK_TENSOR = re.compile(r"^blk\.(\d+)\.")
_SPLIT_NAME = re.compile(r"^(?P<prefix>.+)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


class GGUFInfoError(Exception):
    """The file is missing, unreadable, truncated or not a GGUF model; the message is one line."""


@dataclass(frozen=True)
class ModelShape:
    """The parts of a GGUF model that decide how much memory it takes and where llama.cpp puts it.

    Byte counts are the sizes of the tensors as stored (quantized), which is also what llama.cpp
    allocates for them. `layer_bytes[i]` covers the tensors named ``blk.{i}.*``.
    """

    architecture: str
    n_layers: int
    n_ctx_train: int  # 0 when the file does not say
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim_k: int
    head_dim_v: int
    layer_bytes: tuple[int, ...]
    output_bytes: int
    embedding_bytes: int
    file_bytes: int
    # Beyond the minimum: the vocabulary size sizes the logits buffer, `tied_embeddings` says that
    # `output_bytes` counts `token_embd.weight` a second time (llama.cpp loads it twice: once on the CPU
    # as the input embedding, once as the output layer), and `other_bytes` keeps the byte accounting
    # complete (rope_freqs, token_embd_norm, ...: small tensors that stay on the CPU side).
    n_vocab: int = 0
    tied_embeddings: bool = False
    other_bytes: int = 0

    @property
    def tensor_bytes(self) -> int:
        """Bytes of all tensors in the file(s), each counted once (the file adds its header on top)."""
        total = sum(self.layer_bytes) + self.output_bytes + self.embedding_bytes + self.other_bytes
        return total - self.embedding_bytes if self.tied_embeddings else total

    def kv_cache_bytes(self, n_ctx: int, n_layers: int | None = None, bytes_per_element: int = 2) -> int:
        """Bytes of the K and V caches for `n_ctx` tokens over `n_layers` layers (default: all).

        llama.cpp's default cache type is f16, hence 2 bytes per element.
        """
        layers = self.n_layers if n_layers is None else n_layers
        if n_ctx < 0 or layers < 0 or bytes_per_element < 1:
            raise ValueError(
                f"kv_cache_bytes needs n_ctx >= 0, n_layers >= 0, bytes_per_element >= 1 "
                f"(got {n_ctx}, {layers}, {bytes_per_element})"
            )
        return n_ctx * layers * self.n_head_kv * (self.head_dim_k + self.head_dim_v) * bytes_per_element


def read_model_shape(path: Path) -> ModelShape:
    """Read the shape and per-layer tensor bytes of the GGUF model at `path` (the first part if split).

    Raises GGUFInfoError, with a one-line message, when the file (or a sibling part) is missing, is not
    a GGUF file, is truncated, or lacks the metadata needed to describe the model.
    """
    path = Path(path)
    reader = _open(path)
    meta = _Metadata(reader, path)

    split_count = meta.int_or("split.count", 1)
    if meta.int_or("split.no", 0) != 0:
        raise GGUFInfoError(
            f"{path}: this is part {meta.int_or('split.no', 0) + 1} of a split model; pass part 1"
        )

    arch = meta.string("general.architecture")
    n_layers = meta.int_required(f"{arch}.block_count")
    n_embd = meta.int_required(f"{arch}.embedding_length")
    n_head = meta.int_required(f"{arch}.attention.head_count")
    n_head_kv = meta.int_or(f"{arch}.attention.head_count_kv", n_head)
    default_head_dim = n_embd // n_head if n_head > 0 else 0
    head_dim_k = meta.int_or(f"{arch}.attention.key_length", default_head_dim)
    head_dim_v = meta.int_or(f"{arch}.attention.value_length", default_head_dim)
    n_ctx_train = meta.int_or(f"{arch}.context_length", 0)
    if n_layers < 1 or n_embd < 1:
        raise GGUFInfoError(f"{path}: implausible model shape ({n_layers} layers, embedding length {n_embd})")

    tensors: list[tuple[str, int, Sequence[int]]] = []
    file_bytes = 0
    for part in _split_parts(path, split_count):
        part_reader = reader if part == path else _open(part)
        tensors.extend(_tensor_table(part_reader, part))
        file_bytes += part.stat().st_size

    layer_bytes = [0] * n_layers
    output_bytes = embedding_bytes = other_bytes = 0
    has_output_weight = False
    n_vocab_from_embd = 0
    for name, n_bytes, dims in tensors:
        block = _BLOCK_TENSOR.match(name)
        if block is not None and int(block.group(1)) < n_layers:
            layer_bytes[int(block.group(1))] += n_bytes
        elif name == "token_embd.weight":
            embedding_bytes += n_bytes
            # ggml dims are innermost first: (n_embd, n_vocab).
            n_vocab_from_embd = int(dims[1]) if len(dims) >= 2 else 0
        elif name.startswith(("output.", "output_norm.")):
            output_bytes += n_bytes
            has_output_weight = has_output_weight or name == "output.weight"
        else:
            # rope_freqs, token_embd_norm, position embeddings, and blocks past block_count (malformed
            # files): counted here so that the byte accounting stays complete.
            other_bytes += n_bytes

    tied = not has_output_weight and embedding_bytes > 0
    if tied:
        output_bytes += embedding_bytes
    n_vocab = (
        meta.int_or(f"{arch}.vocab_size", 0) or n_vocab_from_embd or meta.array_len("tokenizer.ggml.tokens")
    )

    return ModelShape(
        architecture=arch,
        n_layers=n_layers,
        n_ctx_train=n_ctx_train,
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim_k=head_dim_k,
        head_dim_v=head_dim_v,
        layer_bytes=tuple(layer_bytes),
        output_bytes=output_bytes,
        embedding_bytes=embedding_bytes,
        file_bytes=file_bytes,
        n_vocab=n_vocab,
        tied_embeddings=tied,
        other_bytes=other_bytes,
    )


def _open(path: Path) -> Any:
    """Open `path` with GGUFReader, turning every way that can fail into a one-line GGUFInfoError."""
    if not path.exists():
        raise GGUFInfoError(f"GGUF file not found: {path}")
    if not path.is_file():
        raise GGUFInfoError(f"not a regular file: {path}")
    try:
        with path.open("rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise GGUFInfoError(f"{path}: cannot read ({_one_line(e)})") from e
    if magic != b"GGUF":
        raise GGUFInfoError(f"{path}: not a GGUF file (it does not start with the GGUF magic)")
    try:
        return gguf.GGUFReader(path)
    # The parser walks untrusted bytes with numpy views, so a damaged or cut-off file surfaces as whatever
    # ValueError/IndexError/KeyError/OverflowError/UnicodeDecodeError/OSError comes first.
    except Exception as e:
        raise GGUFInfoError(f"{path}: damaged or truncated GGUF file ({_one_line(e)})") from e


def _tensor_table(reader: Any, path: Path) -> list[tuple[str, int, Sequence[int]]]:
    """(name, bytes, ggml dims) of each tensor, after checking that its data lies inside the file."""
    size = path.stat().st_size
    table: list[tuple[str, int, Sequence[int]]] = []
    for tensor in reader.tensors:
        n_bytes = int(tensor.n_bytes)
        if int(tensor.data_offset) + n_bytes > size:
            raise GGUFInfoError(f"{path}: truncated: tensor {tensor.name} ends past the end of the file")
        table.append((str(tensor.name), n_bytes, [int(d) for d in tensor.shape]))
    return table


def _split_parts(first: Path, split_count: int) -> list[Path]:
    """All parts of the model whose first part is `first`, in order; just `first` when not split."""
    if split_count <= 1:
        return [first]
    match = _SPLIT_NAME.match(first.name)
    if match is None:
        raise GGUFInfoError(
            f"{first}: split model of {split_count} parts, but the name does not follow "
            f"NAME-00001-of-{split_count:05d}.gguf, so the other parts cannot be found"
        )
    prefix = match.group("prefix")
    parts = [
        first.with_name(f"{prefix}-{i:05d}-of-{split_count:05d}.gguf") for i in range(1, split_count + 1)
    ]
    missing = [p.name for p in parts if not p.is_file()]
    if missing:
        raise GGUFInfoError(f"{first}: split model is missing part(s) {', '.join(missing)}")
    return parts


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 200 else text[:197] + "..."


class _Metadata:
    """Typed access to the key/value metadata of one GGUFReader."""

    def __init__(self, reader: Any, path: Path) -> None:
        self._fields: dict[str, Any] = dict(reader.fields)
        self._path = path

    def _scalar(self, key: str) -> Any:
        field = self._fields.get(key)
        if field is None or not field.types:
            return None
        if field.types[0] == gguf.GGUFValueType.STRING:
            return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace")
        if field.types[0] == gguf.GGUFValueType.ARRAY:
            if len(field.types) < 2 or field.types[1] == gguf.GGUFValueType.STRING or not field.data:
                return None
            # Per-layer arrays (e.g. head_count_kv of hybrid models): the largest layer bounds the memory.
            return max(field.parts[i].tolist()[0] for i in field.data)
        return field.parts[field.data[0]].tolist()[0]

    def string(self, key: str) -> str:
        value = self._scalar(key)
        if not isinstance(value, str) or not value:
            raise GGUFInfoError(f"{self._path}: GGUF metadata lacks {key}")
        return value

    def int_required(self, key: str) -> int:
        if self._scalar(key) is None:
            raise GGUFInfoError(f"{self._path}: GGUF metadata lacks {key}")
        return self.int_or(key, 0)

    def int_or(self, key: str, default: int) -> int:
        value = self._scalar(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise GGUFInfoError(f"{self._path}: GGUF metadata {key} is not an integer ({value!r})")
        return value

    def array_len(self, key: str) -> int:
        field = self._fields.get(key)
        if field is None or not field.types or field.types[0] != gguf.GGUFValueType.ARRAY:
            return 0
        return len(field.data)
