"""Full fine-tuning of a GGUF model with llama.cpp's training API, run inside the training subprocess.

`python -m workerbee.trainer SPEC` reads a `TrainingSpec` (JSON), trains, and writes one JSON object a
line to stdout: `message` and `metrics` events (protocol.training.TrainingEvent) as it goes, a
`metrics` one after every optimizer step, then `done` (or `error`, and a non-zero exit).
It runs in a process of its own because a failed `GGML_ASSERT` aborts the whole process, and so that
cancelling is a kill.

The traps, each guarded here:
- llama-cpp-python's `llama_opt_params` binding is stale (40 bytes, without `optimizer_type`): the
  struct is bound here, and its size checked against the C layout (48 bytes on 64-bit).
- Only F32 tensors train: the base is dequantized first (gguf_convert.dequantize).
- Context, batch and micro-batch are equal and a multiple of 256 (anything else hits a graph-size
  assert), so one optimizer step is one window of `n_ctx` tokens.
- Chats are tokenized with special tokens parsed: `<|im_start|>` is one token, as when serving.
- The trained file gets back its base's metadata (gguf_convert.restore_metadata) and is requantized to
  Q8_0 (Q4_1 would round the updates away).
"""

from __future__ import annotations

import ctypes
import json
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from pydantic import BaseModel, ConfigDict, Field

WINDOW_MULTIPLE: Final = 256
"""Training contexts are a multiple of this many tokens (llama.cpp's graph sizes assume it)."""

OPT_PARAMS_SIZE: Final = 48
"""sizeof(struct llama_opt_params) in llama.h on a 64-bit platform."""

_OPTIMIZER_ADAMW: Final = 0
_LOAD_MODE_NONE: Final = 0
_GGML_TYPE_F32: Final = 0
_GGML_TYPE_I32: Final = 26
_FTYPE_Q8_0: Final = 7


class TrainingSpec(BaseModel):
    """What the training process is asked to do; written as JSON by the worker."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    base: Path = Field(description="The base model's GGUF file (any quantization).")
    work_dir: Path = Field(description="A directory for the intermediate files; the caller removes it.")
    output: Path | None = Field(
        description="Where the trained Q8_0 GGUF goes; None: train and report the losses, keep nothing."
    )
    training: list[list[dict[str, Any]]] = Field(description="Training chats, each a list of messages.")
    validation: list[list[dict[str, Any]]] = Field(default_factory=list)
    n_epochs: int = Field(ge=1)
    learning_rate: float = Field(gt=0)
    seed: int
    n_ctx: int = Field(ge=WINDOW_MULTIPLE, multiple_of=WINDOW_MULTIPLE)
    threads: int = Field(ge=1)


class OptimizerParams(ctypes.Structure):
    """struct ggml_opt_optimizer_params: AdamW's then SGD's parameters."""

    _fields_ = [
        ("adamw_alpha", ctypes.c_float),
        ("adamw_beta1", ctypes.c_float),
        ("adamw_beta2", ctypes.c_float),
        ("adamw_eps", ctypes.c_float),
        ("adamw_wd", ctypes.c_float),
        ("sgd_alpha", ctypes.c_float),
        ("sgd_wd", ctypes.c_float),
    ]


class OptParams(ctypes.Structure):
    """struct llama_opt_params as llama.h declares it (llama-cpp-python's binding lacks `optimizer_type`).

    The two callbacks are C functions of libllama/libggml, passed as plain pointers: ctypes callbacks
    cannot return a struct, and `ggml_opt_get_constant_optimizer_params` returns the one we point at.
    """

    _fields_ = [
        ("n_ctx_train", ctypes.c_uint32),
        ("param_filter", ctypes.c_void_p),
        ("param_filter_ud", ctypes.c_void_p),
        ("get_opt_pars", ctypes.c_void_p),
        ("get_opt_pars_ud", ctypes.c_void_p),
        ("optimizer_type", ctypes.c_int),
    ]


EPOCH_CALLBACK = ctypes.CFUNCTYPE(
    None,
    ctypes.c_bool,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_void_p,
    ctypes.c_int64,
    ctypes.c_int64,
    ctypes.c_int64,
)
"""ggml_opt_epoch_callback: (train, opt_ctx, dataset, result, ibatch, ibatch_max, t_start_us)."""


def check_opt_params_layout() -> None:
    """Refuse to train if our struct does not match the C layout (a changed llama.h)."""
    if ctypes.sizeof(ctypes.c_void_p) == 8 and ctypes.sizeof(OptParams) != OPT_PARAMS_SIZE:
        raise RuntimeError(
            f"llama_opt_params is {ctypes.sizeof(OptParams)} bytes here, llama.h says {OPT_PARAMS_SIZE}"
        )


def windows(tokens: list[int], n_ctx: int) -> list[tuple[list[int], list[int]]]:
    """(inputs, labels) windows of `n_ctx` tokens over a token stream, labels one token ahead.

    Windows overlap by half, as llama.cpp's finetune example cuts them; a stream too short for one
    window is repeated until it fills one.
    """
    if not tokens:
        return []
    stream = list(tokens)
    while len(stream) < n_ctx + 1:
        stream += tokens
    stride = n_ctx // 2
    count = max(1, (len(stream) - n_ctx - 1) // stride + 1)
    return [
        (stream[start : start + n_ctx], stream[start + 1 : start + n_ctx + 1])
        for start in (index * stride for index in range(count))
    ]


@dataclass
class _Run:
    """What the epoch callback reports from, between C calls."""

    epoch: int
    steps_per_epoch: int
    total_steps: int
    started: float
    valid_loss: float | None = None
    train_loss_sum: float = 0.0
    held: dict[str, Any] | None = None
    """An epoch's last step, held back until the validation loss after it is known."""


def emit(event: dict[str, Any]) -> None:
    """One event line on stdout, flushed at once (the worker reads it as it comes)."""
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


def _result_loss(lib: Any, result: int) -> float:
    loss = ctypes.c_double()
    unc = ctypes.c_double()
    lib.ggml_opt_result_loss(ctypes.c_void_p(result), ctypes.byref(loss), ctypes.byref(unc))
    return float(loss.value)


def train(spec: TrainingSpec) -> None:
    """Train `spec.base` on the chats and write the result to `spec.output`."""
    import llama_cpp
    from llama_cpp import llama_chat_format

    from workerbee import gguf_convert

    check_opt_params_layout()
    lib = llama_cpp.llama_cpp._lib
    lib.ggml_opt_result_init.restype = ctypes.c_void_p
    lib.ggml_opt_dataset_init.restype = ctypes.c_void_p
    lib.ggml_opt_dataset_init.argtypes = [ctypes.c_int, ctypes.c_int] + [ctypes.c_int64] * 4
    lib.ggml_opt_dataset_data.restype = ctypes.c_void_p
    lib.ggml_opt_dataset_labels.restype = ctypes.c_void_p
    lib.ggml_get_data.restype = ctypes.c_void_p
    lib.llama_opt_init.argtypes = [ctypes.c_void_p, ctypes.c_void_p, OptParams]
    lib.llama_opt_epoch.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int64,
        EPOCH_CALLBACK,
        EPOCH_CALLBACK,
    ]

    spec.work_dir.mkdir(parents=True, exist_ok=True)
    f32_base = spec.base
    if not gguf_convert.all_f32(spec.base):
        f32_base = spec.work_dir / "base-f32.gguf"
        emit({"type": "message", "message": "Dequantizing the base model to F32."})
        gguf_convert.dequantize(spec.base, f32_base)

    llama_cpp.llama_backend_init()
    model_params = llama_cpp.llama_model_default_params()
    model_params.load_mode = _LOAD_MODE_NONE
    model = llama_cpp.llama_model_load_from_file(str(f32_base).encode(), model_params)
    if not model:
        raise RuntimeError("llama.cpp could not load the dequantized base model")
    vocab = llama_cpp.llama_model_get_vocab(model)

    def tokenize(text: str) -> list[int]:
        data = text.encode()
        room = len(data) + 8
        buffer = (llama_cpp.llama_token * room)()
        count = llama_cpp.llama_tokenize(vocab, data, len(data), buffer, room, False, True)
        return list(buffer[:count])

    def token_text(token: int) -> str:
        return "" if token < 0 else llama_cpp.llama_vocab_get_text(vocab, token).decode(errors="replace")

    template = _metadata(llama_cpp, model, "tokenizer.chat_template") or _CHATML
    formatter: Any = llama_chat_format.Jinja2ChatFormatter(
        template=template,
        eos_token=token_text(llama_cpp.llama_vocab_eos(vocab)),
        bos_token=token_text(llama_cpp.llama_vocab_bos(vocab)),
        add_generation_prompt=False,
    )

    def stream(chats: list[list[dict[str, Any]]]) -> list[int]:
        tokens: list[int] = []
        for messages in chats:
            rendered = formatter(messages=messages)
            tokens += tokenize(rendered.prompt)
        return tokens

    rng = random.Random(spec.seed)
    train_windows = windows(stream(spec.training), spec.n_ctx)
    valid_windows = windows(stream(spec.validation), spec.n_ctx)
    trained_tokens = len(train_windows) * spec.n_ctx * spec.n_epochs

    context_params = llama_cpp.llama_context_default_params()
    context_params.n_ctx = spec.n_ctx
    context_params.n_batch = spec.n_ctx
    context_params.n_ubatch = spec.n_ctx
    context_params.n_threads = spec.threads
    context_params.n_threads_batch = spec.threads
    context_params.type_k = _GGML_TYPE_F32
    context_params.type_v = _GGML_TYPE_F32
    context = llama_cpp.llama_init_from_model(model, context_params)
    if not context:
        raise RuntimeError("llama.cpp could not make a training context")

    optimizer = OptimizerParams(spec.learning_rate, 0.9, 0.999, 1e-8, 0.0, spec.learning_rate, 0.0)
    opt_params = OptParams(
        n_ctx_train=spec.n_ctx,
        param_filter=ctypes.cast(lib.llama_opt_param_filter_all, ctypes.c_void_p).value,
        param_filter_ud=None,
        get_opt_pars=ctypes.cast(lib.ggml_opt_get_constant_optimizer_params, ctypes.c_void_p).value,
        get_opt_pars_ud=ctypes.cast(ctypes.pointer(optimizer), ctypes.c_void_p).value,
        optimizer_type=_OPTIMIZER_ADAMW,
    )
    lib.llama_opt_init(context, model, opt_params)

    run = _Run(
        epoch=0,
        steps_per_epoch=len(train_windows),
        total_steps=len(train_windows) * spec.n_epochs,
        started=time.monotonic(),
    )

    def on_train(
        _train: bool, _ctx: int, _dataset: int, result: int, ibatch: int, _max: int, _t: int
    ) -> None:
        mean = _result_loss(lib, result)
        step_loss = mean * ibatch - run.train_loss_sum
        run.train_loss_sum = mean * ibatch
        event = {
            "type": "metrics",
            "step": run.epoch * run.steps_per_epoch + int(ibatch),
            "total_steps": run.total_steps,
            "epoch": run.epoch + 1,
            "train_loss": step_loss,
            "valid_loss": None,
        }
        if valid_windows and ibatch == run.steps_per_epoch:
            run.held = event
        else:
            emit(event)

    def on_eval(
        _train: bool, _ctx: int, _dataset: int, result: int, _ibatch: int, _max: int, _t: int
    ) -> None:
        run.valid_loss = _result_loss(lib, result)

    train_callback = EPOCH_CALLBACK(on_train)
    eval_callback = EPOCH_CALLBACK(on_eval)
    result_train = lib.ggml_opt_result_init()
    result_eval = lib.ggml_opt_result_init()
    emit(
        {
            "type": "message",
            "message": f"Training {len(train_windows)} windows of {spec.n_ctx} tokens an epoch.",
        }
    )
    for epoch in range(spec.n_epochs):
        run.epoch = epoch
        run.train_loss_sum = 0.0
        order = list(train_windows)
        rng.shuffle(order)
        everything = order + valid_windows
        dataset = lib.ggml_opt_dataset_init(
            _GGML_TYPE_I32, _GGML_TYPE_I32, spec.n_ctx, spec.n_ctx, len(everything), 1
        )
        _fill(lib, dataset, everything, spec.n_ctx)
        lib.llama_opt_epoch(
            context, dataset, result_train, result_eval, len(order), train_callback, eval_callback
        )
        lib.ggml_opt_result_reset(ctypes.c_void_p(result_train))
        lib.ggml_opt_result_reset(ctypes.c_void_p(result_eval))
        lib.ggml_opt_dataset_free(ctypes.c_void_p(dataset))
        if run.held is not None:
            emit({**run.held, "valid_loss": run.valid_loss})
            run.held = None

    if spec.output is None:
        emit({"type": "done", "trained_tokens": trained_tokens, "output": None})
        return
    emit({"type": "message", "message": "Saving the trained model as Q8_0."})
    trained_f32 = spec.work_dir / "trained-f32.gguf"
    restored = spec.work_dir / "trained-restored.gguf"
    llama_cpp.llama_model_save_to_file(model, str(trained_f32).encode())
    llama_cpp.llama_free(context)
    llama_cpp.llama_model_free(model)
    if f32_base != spec.base:
        f32_base.unlink()
    gguf_convert.restore_metadata(trained_f32, spec.base, restored)
    trained_f32.unlink()
    quantize = llama_cpp.llama_model_quantize_default_params()
    quantize.ftype = _FTYPE_Q8_0
    quantize.nthread = spec.threads
    status = llama_cpp.llama_model_quantize(
        str(restored).encode(), str(spec.output).encode(), ctypes.byref(quantize)
    )
    restored.unlink()
    if status != 0:
        raise RuntimeError(f"llama.cpp could not quantize the trained model (status {status})")
    emit({"type": "done", "trained_tokens": trained_tokens, "output": str(spec.output)})


_CHATML: Final = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] "
    "+ '<|im_end|>' + '\\n' }}{% endfor %}"
)


def _metadata(llama_cpp: Any, model: Any, key: str) -> str | None:
    size = llama_cpp.llama_model_meta_val_str(model, key.encode(), None, 0)
    if size < 0:
        return None
    buffer = ctypes.create_string_buffer(size + 1)
    llama_cpp.llama_model_meta_val_str(model, key.encode(), buffer, size + 1)
    return buffer.value.decode(errors="replace")


def _fill(lib: Any, dataset: int, rows: list[tuple[list[int], list[int]]], n_ctx: int) -> None:
    """Copy the windows into the dataset's data and labels tensors (int32, `n_ctx` per datapoint)."""
    data = lib.ggml_get_data(ctypes.c_void_p(lib.ggml_opt_dataset_data(ctypes.c_void_p(dataset))))
    labels = lib.ggml_get_data(ctypes.c_void_p(lib.ggml_opt_dataset_labels(ctypes.c_void_p(dataset))))
    for index, (inputs, targets) in enumerate(rows):
        offset = index * n_ctx * 4
        ctypes.memmove(data + offset, (ctypes.c_int32 * n_ctx)(*inputs), n_ctx * 4)
        ctypes.memmove(labels + offset, (ctypes.c_int32 * n_ctx)(*targets), n_ctx * 4)


def main(argv: list[str] | None = None) -> int:
    """Train as the spec file in argv[0] says; exit 0 after `done`, 1 after `error`."""
    args = sys.argv[1:] if argv is None else argv
    spec = TrainingSpec.model_validate_json(Path(args[0]).read_text())
    try:
        train(spec)
    except Exception as exc:
        emit({"type": "error", "message": str(exc)})
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
