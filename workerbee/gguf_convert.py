"""GGUF rewrites for training: a base model dequantized to F32, and a trained model's metadata restored.

Only F32 tensors train in llama.cpp, so a quantized base is dequantized first (a Q4_1 base would train
only its norms). `llama_model_save_to_file` drops `general.*` and `tokenizer.chat_template` and writes the
training context as the context length, so the trained file gets its base's metadata back.

Both are plain file-to-file copies with the `gguf` package; they block, and run in the training process.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import gguf
import numpy as np

_ARCHITECTURE = "general.architecture"


def _architecture(reader: gguf.GGUFReader) -> str:
    return str(reader.fields[_ARCHITECTURE].contents())


Value = tuple[Any, gguf.GGUFValueType, gguf.GGUFValueType | None]
"""A metadata value, its type, and its elements' type if it is an array."""


_F32: Value = (int(gguf.LlamaFileType.ALL_F32), gguf.GGUFValueType.UINT32, None)
"""general.file_type of a file whose tensors are all F32."""


def _value(field: gguf.ReaderField) -> Value:
    value_type = field.types[0]
    sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
    return field.contents(), value_type, sub_type


def _copy(
    reader: gguf.GGUFReader,
    destination: Path,
    *,
    metadata: gguf.GGUFReader | None = None,
    overrides: dict[str, Value] | None = None,
    tensor: Callable[[gguf.ReaderTensor], np.ndarray[Any, Any]] | None = None,
) -> None:
    """Write `reader`'s tensors (converted by `tensor`) to `destination`, with the metadata of `metadata`
    (default: `reader`) and `overrides`."""
    metadata = metadata or reader
    writer = gguf.GGUFWriter(destination, _architecture(metadata))
    fields = {name: _value(field) for name, field in metadata.fields.items()}
    fields.update(overrides or {})
    for name, (value, value_type, sub_type) in fields.items():
        if name == _ARCHITECTURE or name.startswith("GGUF."):
            continue
        writer.add_key_value(name, value, value_type, sub_type=sub_type)
    for item in reader.tensors:
        if tensor is None:
            writer.add_tensor_info(
                item.name, item.data.shape, item.data.dtype, item.data.nbytes, item.tensor_type
            )
        else:
            converted = tensor(item)
            writer.add_tensor_info(item.name, converted.shape, converted.dtype, converted.nbytes)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for item in reader.tensors:
        writer.write_tensor_data(item.data if tensor is None else tensor(item))
    writer.close()


def _to_f32(item: gguf.ReaderTensor) -> np.ndarray[Any, Any]:
    if item.tensor_type == gguf.GGMLQuantizationType.F32:
        return np.asarray(item.data)
    return np.asarray(gguf.quants.dequantize(item.data, item.tensor_type), dtype=np.float32)


def all_f32(path: Path) -> bool:
    """Whether every tensor of a GGUF is F32 already (nothing to dequantize)."""
    reader = gguf.GGUFReader(path)
    return all(item.tensor_type == gguf.GGMLQuantizationType.F32 for item in reader.tensors)


def dequantize(source: Path, destination: Path) -> None:
    """Write `source` with every tensor in F32, its metadata unchanged but for the file type."""
    reader = gguf.GGUFReader(source)
    _copy(reader, destination, overrides={"general.file_type": _F32}, tensor=_to_f32)


def restore_metadata(trained: Path, base: Path, destination: Path) -> None:
    """Write the tensors of `trained` (F32) with the whole metadata of its base.

    What `llama_model_save_to_file` writes instead is not kept at all: it drops `general.*` and the
    chat template, writes the training context as the context length, and adds every hyperparameter
    llama.cpp knows of with its default, some of which (token ids) the base never had.
    """
    trained_reader = gguf.GGUFReader(trained)
    base_reader = gguf.GGUFReader(base)
    shapes = {item.name: tuple(item.shape) for item in trained_reader.tensors}
    if shapes != {item.name: tuple(item.shape) for item in base_reader.tensors}:
        raise ValueError(f"{trained} does not hold the tensors of {base}")
    _copy(trained_reader, destination, metadata=base_reader, overrides={"general.file_type": _F32})
