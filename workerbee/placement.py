"""Layer placement: how many layers of a model llama.cpp should offload, and how to split them over GPUs.

`plan_placement` is pure: it takes a `ModelShape` (from `workerbee.gguf_info`), the free memory of each
GPU and the wanted context size, and returns the `n_gpu_layers`, `tensor_split` and `main_gpu` to load the
model with, plus the memory estimate behind them. It follows llama.cpp's layer split mode
(``--split-mode layer``, the default):

* ``n_gpu_layers = k`` offloads the *last* k repeating layers; ``n_gpu_layers = n_layers + 1`` also
  offloads the output layer (output norm + output matrix, or a GPU copy of the token embedding when the
  model ties them). llama.cpp counts the output layer the same way ("offloaded 31/31 layers" for a
  30-layer model). The token embedding itself always stays on the CPU.
* The offloaded units (layers, then the output layer) go to the GPUs in device order, in contiguous runs
  sized by ``tensor_split``. The split returned here is the number of units per GPU, so llama.cpp's
  rounding reproduces it exactly.
* Each offloaded layer carries its share of the KV cache (f16 K and V for ``n_ctx`` tokens).
* Each GPU that gets at least one unit also needs a compute buffer; see `estimate_compute_buffer_bytes`.

Memory that is free before loading is not all usable: the CUDA context, cuBLAS workspaces and
fragmentation take a share, hence the safety fraction and margin.

GPUs are identified by `GpuMemory.index`, which must be llama.cpp's device ordinal; `tensor_split` and
`estimated_gpu_bytes_per_gpu` list the GPUs in index order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from workerbee.gguf_info import ModelShape

MIB = 2**20
GIB = 2**30

N_UBATCH = 512
"""llama.cpp's default physical batch size: the most tokens one compute graph holds."""

COMPUTE_BUFFER_FLOOR_BYTES = 64 * MIB
"""The least compute buffer assumed per GPU; small models still pay for graph and backend scratch space."""

_ACTIVATION_ROWS = 8
"""How many n_embd-wide f32 rows per token the graph keeps alive at once (residual, norm, Q/K/V, FFN)."""


class PlacementError(ValueError):
    """The model cannot be placed as asked; the message is one line and says why.

    Either the arguments are invalid (n_ctx, overrides, GPU inventory) or the model fits neither on the
    GPUs nor in system memory, in which case the message gives what it needs and what there is. It is a
    ValueError so that callers validating settings can treat both alike.
    """


@dataclass(frozen=True)
class GpuMemory:
    """One GPU as llama.cpp will see it: `index` is its llama.cpp device ordinal."""

    index: int
    name: str
    free_bytes: int


@dataclass(frozen=True)
class PlacementOverrides:
    """Operator settings that win over the planner (the llama.cpp flags of the same name)."""

    n_gpu_layers: int | None = None  # --gpu-layers; -1 = all, including the output layer
    tensor_split: tuple[float, ...] | None = None  # --tensor-split, one entry per GPU in index order
    main_gpu: int | None = None  # --main-gpu, a GpuMemory.index


@dataclass(frozen=True)
class Placement:
    """The llama.cpp load parameters chosen for a model, and the memory estimate behind them.

    `n_gpu_layers` uses llama.cpp's counting: 0..n_layers repeating layers, n_layers + 1 = all of them
    plus the output layer. `tensor_split` is None on CPU-only and single-GPU placements (unless one was
    given as an override); otherwise it holds the number of offloaded units per GPU in index order.
    """

    n_gpu_layers: int
    tensor_split: tuple[float, ...] | None
    main_gpu: int
    n_ctx: int
    estimated_gpu_bytes: int
    estimated_gpu_bytes_per_gpu: tuple[int, ...]
    reason: str


def estimate_compute_buffer_bytes(shape: ModelShape, n_ctx: int, *, holds_output: bool = False) -> int:
    """Estimate llama.cpp's compute buffer on one GPU that runs layers of `shape` at context `n_ctx`.

    The graph is reserved for a worst-case batch of ``min(N_UBATCH, n_ctx)`` tokens:

    * attention scores, f32, for every head at once: ``n_ctx * tokens * n_head * 4``. This assumes
      flash attention is off (llama-cpp-python's default); with it on, the real buffer is smaller;
    * activations: ``_ACTIVATION_ROWS`` f32 rows of ``n_embd`` per token;
    * on the GPU that holds the output layer, the logits: ``tokens * n_vocab * 4``.

    with a floor of `COMPUTE_BUFFER_FLOOR_BYTES`. ggml reuses memory between graph nodes, so the sum
    overestimates a little, which is the safe direction.
    """
    tokens = min(N_UBATCH, n_ctx)
    scores = n_ctx * tokens * shape.n_head * 4
    activations = _ACTIVATION_ROWS * tokens * shape.n_embd * 4
    logits = tokens * shape.n_vocab * 4 if holds_output else 0
    return max(COMPUTE_BUFFER_FLOOR_BYTES, scores + activations + logits)


def plan_placement(
    shape: ModelShape,
    gpus: Sequence[GpuMemory],
    n_ctx: int,
    overrides: PlacementOverrides = PlacementOverrides(),
    *,
    safety_margin_bytes: int = 512 * MIB,
    safety_fraction: float = 0.9,
    system_memory_bytes: int | None = None,
    kv_sequences: int = 1,
) -> Placement:
    """Choose n_gpu_layers, tensor_split and main_gpu for loading `shape` with context `n_ctx` on `gpus`.

    `kv_sequences` is how many full-length KV caches the worker keeps per layer: its llama.cpp context,
    plus one per sequence of the batching context (--parallel), plus the embedding context if any.

    Each GPU can use ``max(0, free_bytes * safety_fraction - safety_margin_bytes)``. Without overrides,
    the planner offloads as many layers as fit (all of them plus the output layer if possible), spreading
    them over the GPUs in proportion to their usable memory, or packing them greedily in device order when
    memory is tight. A model that only partly fits gets a partial offload; one that fits on no GPU runs
    on the CPU.

    Overrides win: an explicit n_gpu_layers (-1 = all, values above n_layers + 1 are clamped as llama.cpp
    does) is used even when the estimate says it will not fit (the reason says so), an explicit
    tensor_split decides which GPU takes which layers, and main_gpu picks the main GPU. On a machine
    without GPUs an n_gpu_layers override is ignored, as llama.cpp ignores it.

    Raises PlacementError for bad arguments: n_ctx below 1 or above the model's training context (the model
    was not trained for longer contexts, and a clamped context would surprise the caller more than a
    refusal), a tensor_split that does not have one non-negative entry per GPU or is all zeros, a
    main_gpu that is not one of the GPUs, an n_gpu_layers below -1; and when
    `system_memory_bytes` is given and the part of the model left on the CPU does not fit in it.
    """
    _check_arguments(shape, gpus, n_ctx, safety_margin_bytes, safety_fraction, system_memory_bytes)
    if kv_sequences < 1:
        raise PlacementError(f"kv_sequences must be at least 1, not {kv_sequences}")
    if kv_sequences > 1:
        # KV bytes are linear in the KV head count, and nothing else here reads it: scaling it is how
        # every KV estimate below comes to count all the caches.
        shape = replace(shape, n_head_kv=shape.n_head_kv * kv_sequences)
    ordered = sorted(gpus, key=lambda g: g.index)
    split_override = _checked_split(overrides.tensor_split, len(ordered))
    main_gpu = _checked_main_gpu(overrides.main_gpu, ordered)
    ngl_override = _checked_n_gpu_layers(overrides.n_gpu_layers, shape.n_layers)
    usable = [max(0, int(g.free_bytes * safety_fraction) - safety_margin_bytes) for g in ordered]

    if not ordered:
        ignored = "" if ngl_override in (None, 0) else f" (ignoring n_gpu_layers={overrides.n_gpu_layers})"
        plan = _Plan(0, (), (), fits=True)
        return _finish(shape, n_ctx, plan, None, 0, f"CPU only: no GPU{ignored}", system_memory_bytes, usable)

    if ngl_override is not None:
        plan = _plan_for(shape, n_ctx, ngl_override, usable, split_override, best_effort=True)
        reason = _override_reason(shape, plan, usable)
    else:
        plan = _best_plan(shape, n_ctx, usable, split_override)
        reason = _auto_reason(shape, n_ctx, plan, ordered, usable)
        if split_override is not None and plan.n_gpu_layers > 0:
            reason += ", with the requested tensor_split"

    if plan.n_gpu_layers == 0 or split_override is not None:
        split = split_override
    elif len(ordered) > 1:
        split = tuple(float(c) for c in plan.counts)
    else:
        split = None
    return _finish(shape, n_ctx, plan, split, main_gpu, reason, system_memory_bytes, usable)


@dataclass(frozen=True)
class _Plan:
    """One candidate: n_gpu_layers, offloaded units per GPU, bytes per GPU, and whether that fits."""

    n_gpu_layers: int
    counts: tuple[int, ...]
    per_gpu: tuple[int, ...]
    fits: bool


def _best_plan(shape: ModelShape, n_ctx: int, usable: list[int], split: tuple[float, ...] | None) -> _Plan:
    # Trying every count from the top (at most a few hundred cheap checks) finds the most that fits even
    # where a fixed tensor_split rounds unevenly; 0 always fits.
    for n_gpu_layers in range(shape.n_layers + 1, -1, -1):
        plan = _plan_for(shape, n_ctx, n_gpu_layers, usable, split, best_effort=False)
        if plan.fits:
            return plan
    raise AssertionError("unreachable: offloading nothing always fits")


def _plan_for(
    shape: ModelShape,
    n_ctx: int,
    n_gpu_layers: int,
    usable: list[int],
    split: tuple[float, ...] | None,
    *,
    best_effort: bool,
) -> _Plan:
    """Spread `n_gpu_layers` over the GPUs: by `split` if given, else so that it fits if it can.

    With `best_effort`, a count that fits nowhere is still spread (in proportion to usable memory) so
    the caller gets an estimate; otherwise the plan comes back with fits=False.
    """
    costs = _unit_costs(shape, n_ctx, n_gpu_layers)
    with_output = n_gpu_layers > shape.n_layers
    if split is not None:
        counts = _llama_cpp_counts(len(costs), split)
    else:
        found = _proportional_counts(shape, n_ctx, costs, usable, with_output)
        if found is None:
            found = _greedy_counts(shape, n_ctx, costs, usable, with_output)
        if found is None:
            if not best_effort:
                return _Plan(n_gpu_layers, (), (), fits=False)
            found = _spread(len(costs), [*usable] if any(usable) else [1] * len(usable))
        counts = found
    per_gpu = _per_gpu_bytes(shape, n_ctx, costs, counts, with_output)
    fits = all(need <= room for need, room in zip(per_gpu, usable, strict=True))
    return _Plan(n_gpu_layers, counts, per_gpu, fits)


def _unit_costs(shape: ModelShape, n_ctx: int, n_gpu_layers: int) -> list[int]:
    """Bytes of each offloaded unit in llama.cpp's order: the last layers, then the output layer."""
    kv_per_layer = shape.kv_cache_bytes(n_ctx, 1)
    k = min(n_gpu_layers, shape.n_layers)
    costs = [b + kv_per_layer for b in shape.layer_bytes[shape.n_layers - k :]]
    if n_gpu_layers > shape.n_layers:
        costs.append(shape.output_bytes)
    return costs


def _per_gpu_bytes(
    shape: ModelShape, n_ctx: int, costs: list[int], counts: Sequence[int], with_output: bool
) -> tuple[int, ...]:
    """GPU bytes when GPU i takes the next `counts[i]` units; a GPU with no unit needs nothing."""
    out: list[int] = []
    start = 0
    for count in counts:
        end = start + count
        if count == 0:
            out.append(0)
        else:
            holds_output = with_output and end == len(costs)
            out.append(
                sum(costs[start:end]) + estimate_compute_buffer_bytes(shape, n_ctx, holds_output=holds_output)
            )
        start = end
    return tuple(out)


def _proportional_counts(
    shape: ModelShape, n_ctx: int, costs: list[int], usable: list[int], with_output: bool
) -> tuple[int, ...] | None:
    """Units per GPU in proportion to the room each GPU has after its compute buffer, if that fits.

    Proportional spreading leaves every GPU the same share of headroom, which is what one wants when the
    model fits with room to spare.
    """
    buffer = estimate_compute_buffer_bytes(shape, n_ctx)
    room = [max(0, u - buffer) for u in usable]
    if not costs or sum(room) == 0:
        return None
    counts = _spread(len(costs), room)
    per_gpu = _per_gpu_bytes(shape, n_ctx, costs, counts, with_output)
    fits = all(need <= have for need, have in zip(per_gpu, usable, strict=True))
    return counts if fits else None


def _greedy_counts(
    shape: ModelShape, n_ctx: int, costs: list[int], usable: list[int], with_output: bool
) -> tuple[int, ...] | None:
    """Fill GPUs in device order, each with as many of the next units as it holds; None if some are left.

    Because units go to GPUs in contiguous runs in device order, taking as many as possible on each GPU
    covers the most units, so if this fails no split fits.
    """
    counts: list[int] = []
    start = 0
    for room in usable:
        taken = 0
        weights = 0
        while start + taken < len(costs):
            holds_output = with_output and start + taken == len(costs) - 1
            need = weights + costs[start + taken]
            if need + estimate_compute_buffer_bytes(shape, n_ctx, holds_output=holds_output) > room:
                break
            weights = need
            taken += 1
        counts.append(taken)
        start += taken
    return tuple(counts) if start == len(costs) else None


def _spread(total: int, weights: Sequence[int]) -> tuple[int, ...]:
    """Split `total` into integers proportional to `weights` (largest remainder, ties to lower index)."""
    weight_sum = sum(weights)
    if weight_sum == 0 or total == 0:
        return tuple(0 for _ in weights)
    shares = [total * w // weight_sum for w in weights]
    remainders = sorted(range(len(weights)), key=lambda i: (-(total * weights[i] % weight_sum), i))
    for i in remainders[: total - sum(shares)]:
        shares[i] += 1
    return tuple(shares)


def _llama_cpp_counts(n_units: int, split: tuple[float, ...]) -> tuple[int, ...]:
    """Units per GPU as llama.cpp assigns them for `split`: unit u goes to the first GPU whose cumulative
    share of the split exceeds u / n_units (llama_model::load_tensors, layer split mode)."""
    total = sum(split)
    cumulative: list[float] = []
    running = 0.0
    for share in split:
        running += share
        cumulative.append(running / total)
    counts = [0] * len(split)
    for unit in range(n_units):
        position = unit / n_units
        gpu = next((i for i, c in enumerate(cumulative) if c > position), len(split) - 1)
        counts[gpu] += 1
    return tuple(counts)


def _finish(
    shape: ModelShape,
    n_ctx: int,
    plan: _Plan,
    split: tuple[float, ...] | None,
    main_gpu: int,
    reason: str,
    system_memory_bytes: int | None,
    usable: list[int],
) -> Placement:
    """Check that what stays on the CPU fits in system memory, then build the Placement."""
    if system_memory_bytes is not None:
        cpu_bytes = _cpu_bytes(shape, n_ctx, plan.n_gpu_layers)
        if cpu_bytes > system_memory_bytes:
            whole = _cpu_bytes(shape, n_ctx, 0)
            if plan.n_gpu_layers == 0:
                gpu_side = (
                    f"no layer fits on the GPUs ({_human(sum(usable))} usable)"
                    if usable
                    else "there is no GPU"
                )
                raise PlacementError(
                    f"model does not fit: it needs {_human(whole)} (weights + KV cache for n_ctx={n_ctx}), "
                    f"{gpu_side}, and system memory has {_human(system_memory_bytes)}"
                )
            raise PlacementError(
                f"model does not fit: it needs {_human(whole)} (weights + KV cache for n_ctx={n_ctx}); "
                f"{min(plan.n_gpu_layers, shape.n_layers)}/{shape.n_layers} layers fit on the GPUs "
                f"({_human(sum(usable))} usable), "
                f"the remaining {_human(cpu_bytes)} exceed the {_human(system_memory_bytes)} of system memory"
            )
    per_gpu = plan.per_gpu or tuple(0 for _ in usable)
    return Placement(
        n_gpu_layers=plan.n_gpu_layers,
        tensor_split=split,
        main_gpu=main_gpu,
        n_ctx=n_ctx,
        estimated_gpu_bytes=sum(per_gpu),
        estimated_gpu_bytes_per_gpu=per_gpu,
        reason=reason,
    )


def _cpu_bytes(shape: ModelShape, n_ctx: int, n_gpu_layers: int) -> int:
    """Bytes left in system memory: the embedding, the layers not offloaded with their KV cache, and the
    output layer unless it is offloaded (a tied output layer is the embedding itself on the CPU)."""
    on_cpu = shape.n_layers - min(n_gpu_layers, shape.n_layers)
    total = shape.embedding_bytes + shape.other_bytes
    total += sum(shape.layer_bytes[:on_cpu]) + shape.kv_cache_bytes(n_ctx, on_cpu)
    if n_gpu_layers <= shape.n_layers:
        total += shape.output_bytes - (shape.embedding_bytes if shape.tied_embeddings else 0)
    return total


def _auto_reason(
    shape: ModelShape, n_ctx: int, plan: _Plan, gpus: Sequence[GpuMemory], usable: list[int]
) -> str:
    n = shape.n_layers
    where = _gpus_word(plan.counts, len(gpus))
    room = f"{_human(sum(usable))} usable of {_human(sum(g.free_bytes for g in gpus))} free"
    needs = f"needs {_human(sum(plan.per_gpu))}; {room}"
    if plan.n_gpu_layers > n:
        return f"all {n} layers and the output layer fit on {where} ({needs})"
    if plan.n_gpu_layers == n:
        return f"all {n} layers fit on {where}, the output layer stays on the CPU ({needs})"
    if plan.n_gpu_layers == 0:
        one = min(_unit_costs(shape, n_ctx, 1)) + estimate_compute_buffer_bytes(shape, n_ctx)
        return (
            f"CPU only: no layer fits on {_gpus_word((), len(gpus))} (one layer needs {_human(one)}; {room})"
        )
    everything = sum(_unit_costs(shape, n_ctx, n + 1))
    everything += estimate_compute_buffer_bytes(shape, n_ctx, holds_output=True)
    return f"{plan.n_gpu_layers}/{n} layers fit on {where} (all layers need {_human(everything)}; {room})"


def _override_reason(shape: ModelShape, plan: _Plan, usable: list[int]) -> str:
    if plan.n_gpu_layers == 0:
        return "CPU only: n_gpu_layers=0 requested"
    layers = min(plan.n_gpu_layers, shape.n_layers)
    output = " and the output layer" if plan.n_gpu_layers > shape.n_layers else ""
    verdict = "" if plan.fits else ", may not fit"
    return (
        f"{layers}/{shape.n_layers} layers{output} on {_gpus_word(plan.counts, len(usable))} as requested "
        f"(needs {_human(sum(plan.per_gpu))}; {_human(sum(usable))} usable{verdict})"
    )


def _gpus_word(counts: Sequence[int], n_gpus: int) -> str:
    used = sum(1 for c in counts if c > 0) or n_gpus
    return "1 GPU" if used == 1 else f"{used} GPUs"


def _human(n_bytes: int) -> str:
    if n_bytes >= GIB:
        return f"{n_bytes / GIB:.1f} GiB"
    if n_bytes >= MIB:
        return f"{n_bytes / MIB:.1f} MiB"
    if n_bytes >= 1024:
        return f"{n_bytes / 1024:.1f} KiB"
    return f"{n_bytes} B"


def _check_arguments(
    shape: ModelShape,
    gpus: Sequence[GpuMemory],
    n_ctx: int,
    safety_margin_bytes: int,
    safety_fraction: float,
    system_memory_bytes: int | None,
) -> None:
    if shape.n_layers < 1 or len(shape.layer_bytes) != shape.n_layers:
        raise PlacementError(
            f"model shape has {shape.n_layers} layers but {len(shape.layer_bytes)} layer sizes"
        )
    if n_ctx < 1:
        raise PlacementError(f"n_ctx must be at least 1, got {n_ctx}")
    if 0 < shape.n_ctx_train < n_ctx:
        raise PlacementError(
            f"n_ctx {n_ctx} exceeds the {shape.n_ctx_train} tokens the model was trained for; "
            f"ask for at most {shape.n_ctx_train}"
        )
    if not 0 < safety_fraction <= 1:
        raise PlacementError(f"safety_fraction must be in (0, 1], got {safety_fraction}")
    if safety_margin_bytes < 0:
        raise PlacementError(f"safety_margin_bytes must not be negative, got {safety_margin_bytes}")
    if system_memory_bytes is not None and system_memory_bytes < 0:
        raise PlacementError(f"system_memory_bytes must not be negative, got {system_memory_bytes}")
    indices = [g.index for g in gpus]
    if len(set(indices)) != len(indices):
        raise PlacementError(f"GPU indices must be unique, got {indices}")
    negative = [g.index for g in gpus if g.free_bytes < 0]
    if negative:
        raise PlacementError(f"GPU(s) {negative} report negative free memory")


def _checked_split(split: tuple[float, ...] | None, n_gpus: int) -> tuple[float, ...] | None:
    if split is None:
        return None
    if len(split) != n_gpus:
        raise PlacementError(f"tensor_split has {len(split)} entries but there are {n_gpus} GPUs")
    if any(not math.isfinite(s) or s < 0 for s in split):
        raise PlacementError(f"tensor_split entries must be finite and non-negative, got {split}")
    if sum(split) <= 0:
        raise PlacementError(f"tensor_split must give some GPU a share, got {split}")
    return tuple(float(s) for s in split)


def _checked_main_gpu(main_gpu: int | None, gpus: Sequence[GpuMemory]) -> int:
    if main_gpu is not None:
        if main_gpu not in {g.index for g in gpus}:
            known = ", ".join(str(g.index) for g in gpus) or "none"
            raise PlacementError(f"main_gpu {main_gpu} is not one of the GPUs (indices: {known})")
        return main_gpu
    if not gpus:
        return 0
    # Most free memory wins; on a tie, the lower index, as llama.cpp would default to.
    return max(gpus, key=lambda g: (g.free_bytes, -g.index)).index


def _checked_n_gpu_layers(n_gpu_layers: int | None, n_layers: int) -> int | None:
    if n_gpu_layers is None:
        return None
    if n_gpu_layers < -1:
        raise PlacementError(f"n_gpu_layers must be -1 (all) or at least 0, got {n_gpu_layers}")
    if n_gpu_layers == -1:
        return n_layers + 1
    return min(n_gpu_layers, n_layers + 1)
