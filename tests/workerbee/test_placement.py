"""plan_placement on made-up GPU inventories and made-up model shapes."""

from __future__ import annotations

import dataclasses

import pytest

from workerbee.gguf_info import ModelShape
from workerbee.placement import (
    COMPUTE_BUFFER_FLOOR_BYTES,
    N_UBATCH,
    GpuMemory,
    Placement,
    PlacementError,
    PlacementOverrides,
    estimate_compute_buffer_bytes,
    plan_placement,
)

MIB = 2**20
GIB = 2**30


def shape_7b(**changes: object) -> ModelShape:
    """A Llama-2-7B-like Q4 model: 32 layers of 200 MiB, 32 heads, 4096 wide, untied 128 MiB output."""
    shape = ModelShape(
        architecture="llama",
        n_layers=32,
        n_ctx_train=32768,
        n_embd=4096,
        n_head=32,
        n_head_kv=8,
        head_dim_k=128,
        head_dim_v=128,
        layer_bytes=(200 * MIB,) * 32,
        output_bytes=128 * MIB,
        embedding_bytes=100 * MIB,
        file_bytes=32 * 200 * MIB + 228 * MIB + 5 * MIB,
        n_vocab=32000,
    )
    return dataclasses.replace(shape, **changes)  # type: ignore[arg-type]


def gpu(index: int, free_gib: float, name: str = "RTX") -> GpuMemory:
    """A GPU with `free_gib` GiB free."""
    return GpuMemory(index=index, name=f"{name} {index}", free_bytes=int(free_gib * GIB))


def usable(free_bytes: int) -> int:
    """Usable bytes under the default safety fraction and margin."""
    return max(0, int(free_bytes * 0.9) - 512 * MIB)


def layer_cost(shape: ModelShape, n_ctx: int) -> int:
    """One offloaded layer: weights plus its share of the KV cache."""
    return shape.layer_bytes[0] + shape.kv_cache_bytes(n_ctx, 1)


def full_offload_bytes(shape: ModelShape, n_ctx: int) -> int:
    """Everything on one GPU: all layers, KV cache, output layer and a compute buffer with the logits."""
    return (
        sum(shape.layer_bytes)
        + shape.kv_cache_bytes(n_ctx)
        + shape.output_bytes
        + estimate_compute_buffer_bytes(shape, n_ctx, holds_output=True)
    )


def assert_within_budget(placement: Placement, gpus: list[GpuMemory]) -> None:
    """Each GPU's estimate stays within its usable memory and the totals add up."""
    ordered = sorted(gpus, key=lambda g: g.index)
    assert len(placement.estimated_gpu_bytes_per_gpu) == len(ordered)
    for need, g in zip(placement.estimated_gpu_bytes_per_gpu, ordered, strict=True):
        assert need <= usable(g.free_bytes)
    assert placement.estimated_gpu_bytes == sum(placement.estimated_gpu_bytes_per_gpu)


def test_one_small_gpu_gets_a_partial_offload() -> None:
    """A 4 GiB GPU takes as many whole layers as fit after the compute buffer, no more."""
    shape, n_ctx = shape_7b(), 4096
    gpus = [gpu(0, 4)]
    placement = plan_placement(shape, gpus, n_ctx)
    buffer = estimate_compute_buffer_bytes(shape, n_ctx)
    expected = (usable(4 * GIB) - buffer) // layer_cost(shape, n_ctx)
    assert 0 < expected < 32
    assert placement.n_gpu_layers == expected
    assert placement.estimated_gpu_bytes == expected * layer_cost(shape, n_ctx) + buffer
    assert placement.tensor_split is None
    assert placement.main_gpu == 0
    assert placement.n_ctx == n_ctx
    assert placement.reason.startswith(f"{expected}/32 layers fit on 1 GPU")
    assert "GiB" in placement.reason
    assert_within_budget(placement, gpus)


def test_one_big_gpu_takes_all_layers_and_the_output_layer() -> None:
    """A 24 GiB GPU holds everything; n_gpu_layers counts the output layer as llama.cpp does."""
    shape, n_ctx = shape_7b(), 4096
    placement = plan_placement(shape, [gpu(0, 24)], n_ctx)
    assert placement.n_gpu_layers == 33
    assert placement.estimated_gpu_bytes == full_offload_bytes(shape, n_ctx)
    assert placement.estimated_gpu_bytes_per_gpu == (placement.estimated_gpu_bytes,)
    assert placement.tensor_split is None
    assert placement.reason.startswith("all 32 layers and the output layer fit on 1 GPU")


def test_all_layers_but_not_the_output_layer() -> None:
    """When the repeating layers fit but the output layer and logits do not, the output stays on the CPU."""
    shape, n_ctx = shape_7b(), 4096
    all_layers = 32 * layer_cost(shape, n_ctx) + estimate_compute_buffer_bytes(shape, n_ctx)
    free = int((all_layers + 512 * MIB + 10 * MIB) / 0.9) + 1
    assert full_offload_bytes(shape, n_ctx) > usable(free) >= all_layers
    placement = plan_placement(shape, [GpuMemory(0, "exact", free)], n_ctx)
    assert placement.n_gpu_layers == 32
    assert placement.estimated_gpu_bytes == all_layers
    assert "output layer stays on the CPU" in placement.reason


def test_two_unequal_gpus_split_in_proportion_with_the_bigger_as_main() -> None:
    """Layers spread in proportion to usable memory; main_gpu is the GPU with the most of it."""
    shape, n_ctx = shape_7b(), 4096
    gpus = [gpu(0, 8), gpu(1, 16)]
    placement = plan_placement(shape, gpus, n_ctx)
    assert placement.n_gpu_layers == 33
    assert placement.main_gpu == 1
    assert placement.tensor_split is not None
    small, big = placement.tensor_split
    assert small + big == 33
    buffer = estimate_compute_buffer_bytes(shape, n_ctx)
    room = [usable(8 * GIB) - buffer, usable(16 * GIB) - buffer]
    assert abs(small - 33 * room[0] / sum(room)) <= 1
    assert big > small
    assert placement.reason.startswith("all 32 layers and the output layer fit on 2 GPUs")
    assert_within_budget(placement, gpus)


def test_gpus_are_reported_in_index_order_whatever_the_input_order() -> None:
    """tensor_split and per-GPU estimates follow GpuMemory.index, not the order of the list."""
    shape = shape_7b()
    forward = plan_placement(shape, [gpu(0, 8), gpu(1, 16)], 4096)
    backward = plan_placement(shape, [gpu(1, 16), gpu(0, 8)], 4096)
    assert backward == forward


def test_two_gpus_too_small_together_are_packed_and_partially_offloaded() -> None:
    """Two small GPUs both fill up; the split says how many layers each took."""
    shape, n_ctx = shape_7b(), 4096
    gpus = [gpu(0, 3), gpu(1, 2.5)]
    placement = plan_placement(shape, gpus, n_ctx)
    buffer = estimate_compute_buffer_bytes(shape, n_ctx)
    per_gpu = [(usable(g.free_bytes) - buffer) // layer_cost(shape, n_ctx) for g in gpus]
    assert placement.n_gpu_layers == sum(per_gpu) < 32
    assert placement.tensor_split == tuple(float(n) for n in per_gpu)
    assert placement.main_gpu == 0
    assert f"{sum(per_gpu)}/32 layers fit on 2 GPUs" in placement.reason
    assert_within_budget(placement, gpus)


def test_planned_split_replays_to_the_same_estimate() -> None:
    """Feeding the plan back as overrides (as llama.cpp will apply it) gives the same per-GPU bytes."""
    shape, n_ctx = shape_7b(), 8192
    for gpus in ([gpu(0, 8), gpu(1, 16)], [gpu(0, 3), gpu(1, 2.5)], [gpu(0, 6), gpu(1, 6), gpu(2, 1.5)]):
        plan = plan_placement(shape, gpus, n_ctx)
        replay = plan_placement(
            shape,
            gpus,
            n_ctx,
            PlacementOverrides(n_gpu_layers=plan.n_gpu_layers, tensor_split=plan.tensor_split),
        )
        assert replay.estimated_gpu_bytes_per_gpu == plan.estimated_gpu_bytes_per_gpu


def test_the_last_layers_are_the_ones_offloaded() -> None:
    """llama.cpp offloads the last n_gpu_layers layers, so their sizes are the ones that count."""
    sizes = tuple((i + 1) * 100 * MIB for i in range(8))
    shape = shape_7b(n_layers=8, layer_bytes=sizes)
    n_ctx = 2048
    placement = plan_placement(shape, [gpu(0, 4)], n_ctx)
    buffer = estimate_compute_buffer_bytes(shape, n_ctx)
    k = placement.n_gpu_layers
    assert 0 < k < 8
    kv = shape.kv_cache_bytes(n_ctx, 1)
    assert placement.estimated_gpu_bytes == sum(sizes[8 - k :]) + k * kv + buffer
    assert sum(sizes[8 - k - 1 :]) + (k + 1) * kv + buffer > usable(4 * GIB)


def test_model_larger_than_all_gpus_is_partially_offloaded_when_ram_allows() -> None:
    """A 55 GiB model on two 24 GiB GPUs offloads what fits; the rest stays in ample system memory."""
    shape = shape_7b(n_layers=80, layer_bytes=(700 * MIB,) * 80, n_embd=8192, n_head=64)
    gpus = [gpu(0, 24), gpu(1, 24)]
    placement = plan_placement(shape, gpus, 4096, system_memory_bytes=64 * GIB)
    assert 0 < placement.n_gpu_layers < 80
    assert placement.tensor_split is not None
    assert sum(placement.tensor_split) == placement.n_gpu_layers
    assert_within_budget(placement, gpus)
    # Without a figure for system memory the planner does not second-guess it.
    assert plan_placement(shape, gpus, 4096) == placement


def test_model_larger_than_gpus_and_ram_is_refused() -> None:
    """When the CPU remainder does not fit in system memory either, the error gives both amounts."""
    shape = shape_7b(n_layers=80, layer_bytes=(700 * MIB,) * 80, n_embd=8192, n_head=64)
    with pytest.raises(PlacementError, match=r"needs [\d.]+ GiB .*GPUs \([\d.]+ GiB usable\).*system memory"):
        plan_placement(shape, [gpu(0, 24)], 4096, system_memory_bytes=8 * GIB)


def test_no_layer_fits_on_a_tiny_gpu_so_the_model_runs_on_the_cpu() -> None:
    """A GPU too small for one layer plus the compute buffer leaves the model on the CPU, if RAM holds it."""
    shape = shape_7b()
    placement = plan_placement(shape, [gpu(0, 0.5)], 4096, system_memory_bytes=32 * GIB)
    assert placement.n_gpu_layers == 0
    assert placement.estimated_gpu_bytes_per_gpu == (0,)
    assert placement.tensor_split is None
    assert placement.reason.startswith("CPU only: no layer fits on 1 GPU")


def test_model_fitting_neither_gpu_nor_ram_is_refused() -> None:
    """No layer on the GPU and too little RAM: PlacementError in human units, needs vs has."""
    shape = shape_7b()
    with pytest.raises(PlacementError) as caught:
        plan_placement(shape, [gpu(0, 0.5)], 4096, system_memory_bytes=2 * GIB)
    message = str(caught.value)
    assert "\n" not in message
    assert "needs 7.0 GiB" in message
    assert "2.0 GiB" in message
    assert "no layer fits" in message


def test_no_gpu_means_cpu_only() -> None:
    """A machine without GPUs gets 0 layers and a reason that says so."""
    placement = plan_placement(shape_7b(), [], 4096)
    assert placement == Placement(
        n_gpu_layers=0,
        tensor_split=None,
        main_gpu=0,
        n_ctx=4096,
        estimated_gpu_bytes=0,
        estimated_gpu_bytes_per_gpu=(),
        reason="CPU only: no GPU",
    )


def test_no_gpu_and_too_little_ram_is_refused() -> None:
    """CPU only, the weights and KV cache must fit in system memory."""
    shape = shape_7b()
    needed = sum(shape.layer_bytes) + shape.output_bytes + shape.embedding_bytes + shape.kv_cache_bytes(4096)
    assert plan_placement(shape, [], 4096, system_memory_bytes=needed).n_gpu_layers == 0
    with pytest.raises(
        PlacementError, match=r"needs 7\.0 GiB .*, there is no GPU, and system memory has 7\.0 GiB"
    ):
        plan_placement(shape, [], 4096, system_memory_bytes=needed - 1)


def test_no_gpu_ignores_a_gpu_layers_override() -> None:
    """llama.cpp ignores --gpu-layers without a GPU; so does the planner, and it says so."""
    placement = plan_placement(shape_7b(), [], 4096, PlacementOverrides(n_gpu_layers=-1))
    assert placement.n_gpu_layers == 0
    assert placement.reason == "CPU only: no GPU (ignoring n_gpu_layers=-1)"


def test_longer_context_means_fewer_layers() -> None:
    """More context means a bigger KV cache and compute buffer, so never more layers."""
    shape = shape_7b()
    gpus = [gpu(0, 6), gpu(1, 4)]
    layers = [
        plan_placement(shape, gpus, n_ctx).n_gpu_layers for n_ctx in (512, 2048, 4096, 8192, 16384, 32768)
    ]
    assert layers == sorted(layers, reverse=True)
    assert layers[0] > layers[-1]


def test_more_kv_caches_mean_fewer_layers() -> None:
    """Each extra full-length KV cache (--parallel sequences, an embedding context) leaves less room."""
    shape = shape_7b()
    gpus = [gpu(0, 6), gpu(1, 4)]
    layers = [plan_placement(shape, gpus, 4096, kv_sequences=k).n_gpu_layers for k in (1, 2, 5, 9)]
    assert layers == sorted(layers, reverse=True)
    assert layers[0] > layers[-1]
    one = plan_placement(shape, [gpu(0, 80)], 4096)
    nine = plan_placement(shape, [gpu(0, 80)], 4096, kv_sequences=9)
    assert nine.estimated_gpu_bytes - one.estimated_gpu_bytes == 8 * shape.kv_cache_bytes(4096)
    with pytest.raises(PlacementError):
        plan_placement(shape, gpus, 4096, kv_sequences=0)


def test_override_n_gpu_layers_wins() -> None:
    """An explicit layer count is used as is, even when the estimate says it will not fit."""
    shape, gpus = shape_7b(), [gpu(0, 4)]
    fewer = plan_placement(shape, gpus, 4096, PlacementOverrides(n_gpu_layers=5))
    assert fewer.n_gpu_layers == 5
    assert fewer.reason.startswith("5/32 layers on 1 GPU as requested")
    more = plan_placement(shape, gpus, 4096, PlacementOverrides(n_gpu_layers=-1))
    assert more.n_gpu_layers == 33
    assert more.estimated_gpu_bytes == full_offload_bytes(shape, 4096)
    assert more.reason.endswith("may not fit)")
    assert plan_placement(shape, gpus, 4096, PlacementOverrides(n_gpu_layers=999)).n_gpu_layers == 33
    cpu = plan_placement(shape, gpus, 4096, PlacementOverrides(n_gpu_layers=0))
    assert (cpu.n_gpu_layers, cpu.estimated_gpu_bytes, cpu.reason) == (
        0,
        0,
        "CPU only: n_gpu_layers=0 requested",
    )


def test_override_tensor_split_and_main_gpu_win() -> None:
    """A given split decides which GPU takes which layers, the way llama.cpp rounds it."""
    shape, n_ctx = shape_7b(), 4096
    gpus = [gpu(0, 24), gpu(1, 24)]
    overrides = PlacementOverrides(tensor_split=(1.0, 1.0), main_gpu=1)
    placement = plan_placement(shape, gpus, n_ctx, overrides)
    assert placement.n_gpu_layers == 33
    assert placement.tensor_split == (1.0, 1.0)
    assert placement.main_gpu == 1
    # 33 units (32 layers + output) halved: units 0..16 go to GPU 0, 17..32 (with the output) to GPU 1.
    cost, buffer = layer_cost(shape, n_ctx), estimate_compute_buffer_bytes(shape, n_ctx)
    assert placement.estimated_gpu_bytes_per_gpu == (
        17 * cost + buffer,
        15 * cost + shape.output_bytes + estimate_compute_buffer_bytes(shape, n_ctx, holds_output=True),
    )


def test_override_split_that_starves_a_gpu_limits_the_layers() -> None:
    """With a fixed split, the planner lowers n_gpu_layers until the GPU with too big a share fits."""
    shape, n_ctx = shape_7b(), 4096
    gpus = [gpu(0, 4), gpu(1, 24)]
    even = plan_placement(shape, gpus, n_ctx, PlacementOverrides(tensor_split=(1.0, 1.0)))
    own = plan_placement(shape, gpus, n_ctx)
    assert even.n_gpu_layers < own.n_gpu_layers == 33
    assert even.reason.endswith(", with the requested tensor_split")
    assert_within_budget(even, gpus)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (PlacementOverrides(tensor_split=(1.0,)), "tensor_split has 1 entries but there are 2 GPUs"),
        (PlacementOverrides(tensor_split=(1.0, -1.0)), "finite and non-negative"),
        (PlacementOverrides(tensor_split=(1.0, float("nan"))), "finite and non-negative"),
        (PlacementOverrides(tensor_split=(0.0, 0.0)), "must give some GPU a share"),
        (PlacementOverrides(main_gpu=2), r"main_gpu 2 is not one of the GPUs \(indices: 0, 1\)"),
        (PlacementOverrides(main_gpu=-1), "main_gpu -1 is not one of the GPUs"),
        (PlacementOverrides(n_gpu_layers=-2), "n_gpu_layers must be -1"),
    ],
)
def test_invalid_overrides_are_refused(overrides: PlacementOverrides, message: str) -> None:
    """Bad overrides raise PlacementError (a ValueError) that names the problem."""
    with pytest.raises(PlacementError, match=message):
        plan_placement(shape_7b(), [gpu(0, 8), gpu(1, 8)], 4096, overrides)


def test_overrides_naming_gpus_on_a_machine_without_any_are_refused() -> None:
    """A split or a main GPU cannot refer to GPUs that are not there."""
    with pytest.raises(ValueError, match="tensor_split has 1 entries but there are 0 GPUs"):
        plan_placement(shape_7b(), [], 4096, PlacementOverrides(tensor_split=(1.0,)))
    with pytest.raises(ValueError, match=r"main_gpu 0 is not one of the GPUs \(indices: none\)"):
        plan_placement(shape_7b(), [], 4096, PlacementOverrides(main_gpu=0))


@pytest.mark.parametrize(
    ("n_ctx", "message"),
    [(0, "n_ctx must be at least 1"), (32769, "exceeds the 32768 tokens the model was trained for")],
)
def test_n_ctx_out_of_range_is_refused(n_ctx: int, message: str) -> None:
    """n_ctx must be at least 1 and at most the training context."""
    with pytest.raises(PlacementError, match=message):
        plan_placement(shape_7b(), [gpu(0, 8)], n_ctx)


def test_unknown_training_context_does_not_limit_n_ctx() -> None:
    """A file that does not state its training context (n_ctx_train 0) accepts any n_ctx."""
    placement = plan_placement(shape_7b(n_ctx_train=0), [gpu(0, 80)], 65536)
    assert placement.n_ctx == 65536


def test_bad_inventory_or_settings_are_refused() -> None:
    """Duplicate GPU indices, a bad safety fraction or a mismatched shape are programming errors."""
    with pytest.raises(PlacementError, match="GPU indices must be unique"):
        plan_placement(shape_7b(), [gpu(0, 8), gpu(0, 8)], 4096)
    with pytest.raises(PlacementError, match="safety_fraction"):
        plan_placement(shape_7b(), [gpu(0, 8)], 4096, safety_fraction=0)
    with pytest.raises(PlacementError, match="32 layers but 3 layer sizes"):
        plan_placement(shape_7b(layer_bytes=(1, 2, 3)), [gpu(0, 8)], 4096)


def test_safety_settings_set_the_usable_memory() -> None:
    """With no margin and fraction 1, exactly the free memory is usable."""
    shape, n_ctx = shape_7b(), 4096
    exact = full_offload_bytes(shape, n_ctx)
    fits = plan_placement(
        shape, [GpuMemory(0, "x", exact)], n_ctx, safety_margin_bytes=0, safety_fraction=1.0
    )
    assert fits.n_gpu_layers == 33
    short = plan_placement(
        shape, [GpuMemory(0, "x", exact - 1)], n_ctx, safety_margin_bytes=0, safety_fraction=1
    )
    assert short.n_gpu_layers < 33


def test_main_gpu_tie_goes_to_the_lower_index() -> None:
    """Equal GPUs: the first one is main, as llama.cpp defaults to."""
    assert plan_placement(shape_7b(), [gpu(1, 8), gpu(0, 8)], 4096).main_gpu == 0


def test_compute_buffer_estimate() -> None:
    """Attention scores + activations (+ logits on the output GPU), never below the floor."""
    shape = shape_7b()
    tokens = N_UBATCH
    base = 4096 * tokens * 32 * 4 + 8 * tokens * 4096 * 4
    assert estimate_compute_buffer_bytes(shape, 4096) == base
    assert estimate_compute_buffer_bytes(shape, 4096, holds_output=True) == base + tokens * 32000 * 4
    tiny = shape_7b(n_embd=64, n_head=1, n_vocab=100)
    assert estimate_compute_buffer_bytes(tiny, 16) == COMPUTE_BUFFER_FLOOR_BYTES
