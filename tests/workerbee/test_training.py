"""The training traps, each guarded: the opt-params layout, special tokens, window sizes, F32 dequantization,
the base's metadata restored, and models too big refused by name."""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import gguf
import llama_cpp
import numpy as np
import openai
import pytest
from fake_worker import FakeWorker
from servers import QueenServer, eventually, smollm2_path

from protocol import ErrorCode, Job, Register, TrainingCapability
from queenbee.settings import QueenSettings
from workerbee import gguf_convert
from workerbee.errors import EngineError
from workerbee.trainer import OPT_PARAMS_SIZE, WINDOW_MULTIPLE, OptParams, TrainingSpec, windows
from workerbee.training import (
    BYTES_PER_PARAMETER,
    TrainedModel,
    check_fits,
    downloader,
    parameter_count,
    trained_model,
    trained_models,
    uploader,
)


def test_our_opt_params_match_llama_h_and_the_binding_does_not() -> None:
    """llama.h's struct ends with optimizer_type (48 bytes); llama-cpp-python's stale one is 40 bytes."""
    assert ctypes.sizeof(OptParams) == OPT_PARAMS_SIZE == 48
    assert OptParams.optimizer_type.offset == 40  # type: ignore[attr-defined]
    assert ctypes.sizeof(llama_cpp.llama_opt_params) == 40  # if this changes, the binding was fixed upstream
    header = Path(llama_cpp.__file__).parent.parent / "include" / "llama.h"
    text = header.read_text()
    struct = text[text.index("struct llama_opt_params {") :]
    assert "enum ggml_opt_optimizer_type optimizer_type;" in struct[: struct.index("};")]


def test_windows_are_the_context_long_with_labels_one_token_ahead() -> None:
    """Each window has n_ctx inputs and the next n_ctx tokens as labels; a short stream is repeated."""
    stream = list(range(600))
    cut = windows(stream, 256)
    assert [len(inputs) for inputs, _ in cut] == [256, 256, 256]
    assert all(labels == [token + 1 for token in inputs] for inputs, labels in cut)
    assert [inputs[0] for inputs, _ in cut] == [0, 128, 256]
    short = windows([7, 8, 9], 256)
    assert len(short) == 1
    assert short[0][0][:4] == [7, 8, 9, 7]
    assert windows([], 256) == []


def test_the_training_context_must_be_a_multiple_of_256() -> None:
    """Other sizes hit a graph-size assert in llama.cpp, so the spec refuses them before it runs."""
    base = {
        "base": "m.gguf",
        "work_dir": "w",
        "output": "o.gguf",
        "training": [[{"role": "user", "content": "x"}]],
        "n_epochs": 1,
        "learning_rate": 1e-4,
        "seed": 0,
        "threads": 1,
    }
    assert TrainingSpec.model_validate({**base, "n_ctx": 512}).n_ctx == WINDOW_MULTIPLE * 2
    for size in (128, 300):
        with pytest.raises(ValueError, match="n_ctx"):
            TrainingSpec.model_validate({**base, "n_ctx": size})


def test_chat_markers_are_one_token_each() -> None:
    """Tokenized with special tokens parsed, as when serving: <|im_start|> is one token, not seven."""
    params = llama_cpp.llama_model_default_params()
    params.vocab_only = True
    model = llama_cpp.llama_model_load_from_file(str(smollm2_path()).encode(), params)
    vocab = llama_cpp.llama_model_get_vocab(model)
    text = b"<|im_start|>user\nHi<|im_end|>\n"
    buffer = (llama_cpp.llama_token * 64)()
    special = llama_cpp.llama_tokenize(vocab, text, len(text), buffer, 64, False, True)
    plain = llama_cpp.llama_tokenize(vocab, text, len(text), buffer, 64, False, False)
    llama_cpp.llama_model_free(model)
    assert special == 6  # <|im_start|> user \n Hi <|im_end|> \n
    assert plain > special + 10


def _tiny_base(path: Path) -> dict[str, np.ndarray]:
    """A small GGUF with a base's metadata and quantized tensors (what a hub model looks like)."""
    rng = np.random.default_rng(0)
    tensors = {
        "blk.0.attn_q.weight": rng.standard_normal((64, 128)).astype(np.float32),
        "blk.0.ffn_up.weight": rng.standard_normal((32, 256)).astype(np.float32),
        "output_norm.weight": rng.standard_normal(128).astype(np.float32),
    }
    kinds = {
        "blk.0.attn_q.weight": gguf.GGMLQuantizationType.Q4_1,
        "blk.0.ffn_up.weight": gguf.GGMLQuantizationType.Q8_0,
    }
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("Tiny Base")
    writer.add_context_length(8192)
    writer.add_chat_template("{{ messages }}")
    writer.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q4_1))
    for name, values in tensors.items():
        kind = kinds.get(name)
        if kind is None:
            writer.add_tensor(name, values)
        else:
            writer.add_tensor(name, gguf.quants.quantize(values, kind), raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def test_dequantized_then_restored_keeps_the_base_metadata(tmp_path: Path) -> None:
    """Every tensor is F32 after dequantizing (the values the quantized ones stand for); a trained file
    gets back the chat template, general.* and the context length that llama_model_save_to_file drops or
    rewrites, and loses the defaults it adds."""
    base = tmp_path / "base.gguf"
    original = _tiny_base(base)
    f32 = tmp_path / "f32.gguf"
    gguf_convert.dequantize(base, f32)
    reader = gguf.GGUFReader(f32)
    assert {tensor.tensor_type for tensor in reader.tensors} == {gguf.GGMLQuantizationType.F32}
    assert reader.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    source = gguf.GGUFReader(base)
    for tensor in source.tensors:
        again = next(item for item in reader.tensors if item.name == tensor.name)
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        assert np.array_equal(np.asarray(again.data), expected.reshape(np.asarray(again.data).shape))
        assert np.abs(np.asarray(again.data) - original[tensor.name]).max() < 0.5  # Q4_1 is coarse
    assert parameter_count(base) == 64 * 128 + 32 * 256 + 128

    # What llama_model_save_to_file writes: no template, no general.name, the training context, defaults.
    saved = tmp_path / "saved.gguf"
    writer = gguf.GGUFWriter(saved, "llama")
    writer.add_context_length(256)
    writer.add_uint32("tokenizer.ggml.eot_token_id", 0)
    for tensor in reader.tensors:
        writer.add_tensor(tensor.name, np.asarray(tensor.data) + 1.0)  # "trained"
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    restored = tmp_path / "restored.gguf"
    gguf_convert.restore_metadata(saved, base, restored)
    result = gguf.GGUFReader(restored)
    for key in ("tokenizer.chat_template", "general.name", "llama.context_length"):
        assert result.fields[key].contents() == source.fields[key].contents(), key
    assert "tokenizer.ggml.eot_token_id" not in result.fields
    assert result.fields["general.file_type"].contents() == int(gguf.LlamaFileType.ALL_F32)
    trained = {tensor.name: np.asarray(tensor.data) for tensor in gguf.GGUFReader(saved).tensors}
    assert all(np.array_equal(np.asarray(tensor.data), trained[tensor.name]) for tensor in result.tensors)
    with pytest.raises(ValueError, match="does not hold the tensors"):
        gguf_convert.restore_metadata(saved, smollm2_path(), tmp_path / "wrong.gguf")


def test_a_model_too_big_is_refused_naming_the_limit() -> None:
    """7B needs over 100 GB for full fine-tuning: the message says how much, and what this worker has."""
    with pytest.raises(EngineError) as memory:
        check_fits(7_000_000_000, 10**12, memory_free=16_000)
    assert memory.value.code == ErrorCode.INVALID_REQUEST
    needed = int(7e9 * BYTES_PER_PARAMETER / 2**20)
    assert f"needs about {needed} MiB" in memory.value.message
    assert "16000 MiB free" in memory.value.message
    with pytest.raises(EngineError) as size:
        check_fits(7_000_000_000, 3_000_000_000, memory_free=10**7)
    assert "at most 3.00 billion (--train-max-parameters)" in size.value.message
    check_fits(135_000_000, 3_000_000_000, memory_free=4000)


def _losses(spec: TrainingSpec, folder: Path) -> list[float]:
    """Run the trainer process on `spec`; the per-step training losses it reports."""
    spec_file = folder / "spec.json"
    spec_file.write_text(spec.model_dump_json())
    process = subprocess.run(
        [sys.executable, "-m", "workerbee.trainer", str(spec_file)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert process.returncode == 0, process.stdout[-2000:] + process.stderr[-2000:]
    events = [json.loads(line) for line in process.stdout.splitlines() if line.startswith("{")]
    assert events[-1]["type"] == "done"
    return [event["train_loss"] for event in events if event["type"] == "metrics"]


def test_the_same_seed_gives_the_same_losses(tmp_path: Path) -> None:
    """Two runs with one seed on the real model shuffle the windows alike and report identical losses."""
    base = tmp_path / "f32.gguf"
    gguf_convert.dequantize(smollm2_path(), base)  # once: the trainer takes an F32 base as it is
    chats = [
        [{"role": "user", "content": f"Question {n}?"}, {"role": "assistant", "content": f"Answer {n}."}]
        for n in range(12)
    ]
    spec = TrainingSpec(
        base=base,
        work_dir=tmp_path / "work",
        output=None,
        training=chats,
        n_epochs=1,
        learning_rate=1e-4,
        seed=11,
        n_ctx=256,
        threads=2,
    )
    first = _losses(spec, tmp_path)
    assert len(first) == 2
    assert _losses(spec, tmp_path) == first


def test_fine_tuned_models_in_the_train_dir_are_found_again(tmp_path: Path) -> None:
    """A restarted --train worker serves again what it trained: each GGUF's description beside it."""
    digest = "ef" * 32
    (tmp_path / f"{digest}.gguf").write_bytes(b"GGUF" + bytes(60))
    model = TrainedModel(id="ft:base:key-1:x:12345678", base="base", n_ctx=2048, sha256=digest)
    trained_model(tmp_path / f"{digest}.gguf").write_text(model.model_dump_json())
    (tmp_path / "broken.json").write_text("{not json")
    (tmp_path / f"{'00' * 32}.json").write_text(model.model_dump_json())  # its GGUF is gone
    [config] = trained_models(tmp_path)
    assert (config.id, config.path, config.n_ctx, config.sha256, config.size_bytes) == (
        model.id,
        tmp_path / f"{digest}.gguf",
        2048,
        digest,
        64,
    )


async def test_a_model_goes_to_the_queen_and_back(tmp_path: Path) -> None:
    """The worker's uploader and downloader against a real queen: the bytes come back, a file whose hash
    is not the one asked for is not kept."""

    class Trainer(FakeWorker):
        def registration(self) -> Register:
            capability = TrainingCapability(methods=["full"], max_parameters=10**9, memory_free=4096)
            return super().registration().model_copy(update={"training": capability})

    async def hang(worker: FakeWorker, job: Job) -> None:
        del worker, job

    queen = QueenServer(QueenSettings(db=tmp_path / "queen.db")).start()
    try:
        worker = await Trainer(queen.worker_url, sha256="ab" * 32, behaviour=hang).connect()
        files = tmp_path / "chats.jsonl"
        files.write_text(json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n")
        async with openai.AsyncOpenAI(base_url=queen.openai_url, api_key="x", max_retries=0) as sdk:
            uploaded = await sdk.files.create(file=files, purpose="fine-tune")
            await sdk.fine_tuning.jobs.create(model="fake-model", training_file=uploaded.id)
        await eventually(lambda: bool(worker.jobs))
        model = tmp_path / "model.gguf"
        model.write_bytes(b"GGUF" + bytes(range(256)) * 4096)
        digest = hashlib.sha256(model.read_bytes()).hexdigest()
        await uploader(queen.worker_url, "")(model, digest)
        back = tmp_path / "back" / "model.gguf"
        back.parent.mkdir()
        await downloader(queen.worker_url, "")(digest, back)
        assert back.read_bytes() == model.read_bytes()
        with pytest.raises(EngineError):
            await downloader(queen.worker_url, "")("cd" * 32, tmp_path / "back" / "missing.gguf")
        assert sorted(path.name for path in back.parent.iterdir()) == ["model.gguf"]
        await worker.close()
    finally:
        queen.stop()
