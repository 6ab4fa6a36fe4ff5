"""The Mosaic GPU expert kernels (`diffjax.kernels.moe_mgpu`) against their plain-JAX twins.

On a CPU they run in Mosaic GPU's interpreter (shared memory, TMA copies, barriers and the wgmma ring
simulated; out-of-bounds TMA reads give NaN where the GPU gives zeros), and are lowered for CUDA from here:
Mosaic GPU's Python passes (layout inference, shared-memory allocation) run at lowering, so a kernel they
reject fails here without a GPU.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from diffjax.config import Config
from diffjax.kernels.bench import MGPU_MOE_TILES, jax_ragged_dot_mgpu
from diffjax.kernels.moe import MoeTiles, pretile_experts, pretiled_shapes
from diffjax.kernels.moe_mgpu import MgpuMoeTiles, check_hopper, experts_mgpu, sorted_layout
from diffjax.layers import Experts, experts_dense, experts_grouped
from diffjax.model import denoise_logits, encode, init_cache, init_params, param_shapes
from diffjax.quantize import FP8, dequantize, quantize
from tests.test_kernels import _close, as_f32, lower_for_cuda, moe_case

MGPU_CALL = "mosaic_gpu_v2"


@pytest.mark.parametrize("block_rows", [64, 128])
@pytest.mark.parametrize("seed", [0, 1])
def test_sorted_layout_cuts_each_group_into_whole_tiles_of_its_own(block_rows, seed):
    """Brute force over ragged routings with empty experts and groups longer than a tile."""
    num_experts = 16
    key_size, key_ids = jax.random.split(jax.random.key(seed))
    assignments = int(jax.random.randint(key_size, (), 1, 700))
    # Skewed routing: low experts busy, high ones mostly empty.
    ids = np.asarray(jnp.minimum(jax.random.geometric(key_ids, 0.25, (assignments,)) - 1, num_experts - 1),
                     np.int32)
    layout = sorted_layout(jnp.asarray(ids), num_experts, block_rows)
    row, table = np.asarray(layout.row), np.asarray(layout.tiles)
    assert table.shape == (-(-assignments // block_rows) + num_experts - 1, 3)
    # Each assignment its own row, in bounds, in expert order (stable within an expert).
    assert len(set(row)) == assignments and row.max() < layout.rows and layout.rows >= block_rows
    assert (np.argsort(row, kind="stable") == np.argsort(ids, kind="stable")).all()
    expert_of_row = np.full(layout.rows, -1)
    expert_of_row[row] = ids
    covered = np.zeros(layout.rows, int)
    for expert, first, count in table[table[:, 2] > 0]:
        assert first % 8 == 0 and count <= block_rows
        assert (expert_of_row[first:first + count] == expert).all()
        covered[first:first + count] += 1
    assert (covered[row] == 1).all() and covered.sum() == assignments
    sizes = np.bincount(ids, minlength=num_experts)
    used = table[table[:, 2] > 0]
    assert len(used) == (-(-sizes // block_rows)).sum()  # ceil(group / tile) tiles per expert, no more
    assert (used[:, 2] < block_rows).sum() <= (sizes > 0).sum()  # one partial tile per expert at most


def test_sorted_layout_holds_the_worst_case_alignment_padding():
    """Every expert a group of one assignment: each padded by ROW_ALIGN - 1 rows, the most the static row count
    must hold; and the kernel on that routing (16 tokens, each to its own expert)."""
    for experts in (16, 128):
        layout = sorted_layout(jnp.arange(experts, dtype=jnp.int32), experts, 64)
        row = np.asarray(layout.row)
        np.testing.assert_array_equal(row, 8 * np.arange(experts))
        assert row.max() < layout.rows
    x, weights, ids, gate_up, down = moe_case(16, 16, 1, 64, 32, jnp.bfloat16, seed=2)
    ids = jnp.arange(16, dtype=jnp.int32)[:, None]
    ours = experts_mgpu(x, weights, ids, gate_up, down, interpret=True)
    assert np.isfinite(np.asarray(ours, np.float32)).all()
    _close(ours, experts_dense(*as_f32(x, weights, ids, gate_up, down)), jnp.bfloat16)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "dtype", "tiles"),
    [
        (37, 8, 2, 64, 32, jnp.bfloat16, MgpuMoeTiles()),  # 74 rows: not a multiple of the 8-row TMA tiling
        (50, 16, 4, 48, 80, jnp.bfloat16, MgpuMoeTiles(max_concurrent_steps=2)),  # 16-wide blocks (48, 80)
        (5, 8, 2, 64, 32, jnp.float16, MgpuMoeTiles()),  # fewer rows than one block
        (300, 16, 4, 64, 48, jnp.bfloat16, MgpuMoeTiles(block_rows=128, block_k=16)),  # 4 k-steps, 1200 rows
        # Warp-specialised: each compute warpgroup stores its own 64 rows of a 128-row block (~10 s here); two
        # groups of 70 rows, so the second warpgroup has rows to store (under 64, it would store none).
        (70, 4, 2, 64, 32, jnp.bfloat16, MgpuMoeTiles(block_rows=128, block_k=32, compute_warpgroups=2)),
    ],
)
def test_mgpu_moe_kernel_matches_twins(tokens, experts, top_k, hidden, inter, dtype, tiles):
    """Half the experts get no token; the interpreter's NaN for reads of rows no kernel wrote (past the sorted
    rows, the alignment rows between groups) would reach the result if a tile stored a row not its expert's."""
    args = moe_case(tokens, experts, top_k, hidden, inter, dtype, seed=tokens)
    ours = experts_mgpu(*args, tiles=tiles, interpret=True)
    assert ours.shape == args[0].shape and ours.dtype == dtype
    assert np.isfinite(np.asarray(ours, np.float32)).all()
    _close(ours, experts_dense(*as_f32(*args)), dtype)
    _close(experts_grouped(*args), experts_dense(*as_f32(*args)), dtype)  # the twin meets the same bar


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "dtype", "tiles"),
    [
        (37, 8, 2, 64, 32, jnp.bfloat16, MgpuMoeTiles()),
        (50, 16, 4, 48, 80, jnp.float16, MgpuMoeTiles(block_k=16)),  # e4m3 -> f16 in one conversion
    ],
)
def test_mgpu_moe_kernel_fp8_matches_dequantized_twins(tokens, experts, top_k, hidden, inter, dtype, tiles):
    """fp8 stacks of two layers read in place at a traced layer; layer 1 differs from layer 0 in weights and,
    by the factor, in its scales (which multiply gate and up before the activation, down after)."""
    x, weights, ids, gate_up, down = moe_case(tokens, experts, top_k, hidden, inter, dtype, seed=tokens + 1)
    (q_up, s_up), (q_down, s_down) = (quantize(jnp.stack([w, 0.5 * w[::-1]])) for w in (gate_up, down))
    ours = jax.jit(lambda i: experts_mgpu(x, weights, ids, q_up, q_down, i, gate_up_scale=s_up, down_scale=s_down,
                                          tiles=tiles, interpret=True))(jnp.int32(1))
    assert ours.dtype == dtype and np.isfinite(np.asarray(ours, np.float32)).all()
    oracle = experts_dense(x.astype(jnp.float32), weights, ids, dequantize(q_up[1], s_up[1], jnp.float32),
                           dequantize(q_down[1], s_down[1], jnp.float32))
    _close(ours, oracle, dtype)


@pytest.mark.parametrize("fp8", [False, True])
def test_mgpu_moe_kernel_reads_pretiled_stacks(fp8):
    """`pretile_experts` + `pretiled=True`: each weight tile one contiguous TMA box; the same outputs bit for
    bit as the plain layout (same column blocks), from a two-layer stack read in place, several tiles of gate,
    of up and of down."""
    x, weights, ids, gate_up, down = moe_case(41, 8, 2, 64, 48, jnp.bfloat16, seed=9)
    gate_up, down = jnp.stack([gate_up, 0.5 * gate_up[::-1]]), jnp.stack([down, 0.5 * down[::-1]])
    scales = {}
    if fp8:
        (gate_up, up_scale), (down, down_scale) = quantize(gate_up), quantize(down)
        scales = {"gate_up_scale": up_scale, "down_scale": down_scale}
    tiled_gate_up, tiled_down = pretile_experts(gate_up, down, MoeTiles(gate_up_block_n=16, down_block_n=32))
    assert tiled_gate_up.shape == (2, 8, 6, 64, 16) and tiled_down.shape == (2, 8, 2, 48, 32)
    tiles = MgpuMoeTiles(gate_up_block_n=16, down_block_n=32, block_k=32)
    plain = experts_mgpu(x, weights, ids, gate_up, down, jnp.int32(1), tiles=tiles, interpret=True, **scales)
    ours = experts_mgpu(x, weights, ids, tiled_gate_up, tiled_down, jnp.int32(1), tiles=tiles, pretiled=True,
                        interpret=True, **scales)
    assert float(jnp.std(plain.astype(jnp.float32))) > 0.1
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain, np.float32))
    if not fp8:
        _close(ours, experts_dense(*as_f32(x, weights, ids, gate_up[1], down[1])), jnp.bfloat16)


def test_mgpu_moe_kernel_refuses_a_gpu_without_wgmma(monkeypatch):
    class Ampere:
        device_kind, compute_capability = "NVIDIA A100-SXM4-80GB", "8.0"

    args = moe_case(8, 8, 2, 64, 32, jnp.bfloat16, seed=1)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(jax, "devices", lambda *_: [Ampere()])
    with pytest.raises(ValueError, match=r"Hopper GPU.*A100"):
        experts_mgpu(*args, interpret=False)
    Ampere.compute_capability = "9.0"
    check_hopper()


def test_mgpu_moe_kernel_rejects_what_it_cannot_run():
    x, weights, ids, gate_up, down = moe_case(20, 8, 2, 64, 32, jnp.bfloat16, seed=5)
    with pytest.raises(ValueError, match="bf16 or fp16"):
        experts_mgpu(x.astype(jnp.float32), weights, ids, gate_up, down, interpret=True)
    (q_up, s_up), (q_down, s_down) = quantize(gate_up), quantize(down)
    with pytest.raises(ValueError, match="both scales"):
        experts_mgpu(x, weights, ids, q_up, q_down, interpret=True)
    with pytest.raises(ValueError, match="down_scale must be"):
        experts_mgpu(x, weights, ids, q_up, q_down, gate_up_scale=s_up, down_scale=s_down[:, :8], interpret=True)
    with pytest.raises(ValueError, match="compute_warpgroups=1"):
        experts_mgpu(x, weights, ids, q_up, q_down, gate_up_scale=s_up, down_scale=s_down, interpret=True,
                     tiles=MgpuMoeTiles(block_rows=128, compute_warpgroups=2))
    with pytest.raises(ValueError, match="inter"):
        experts_mgpu(x, weights, ids, gate_up, down[:, :16], interpret=True)
    with pytest.raises(ValueError, match="multiple of 64"):
        experts_mgpu(x, weights, ids, gate_up, down, tiles=MgpuMoeTiles(block_rows=32), interpret=True)
    with pytest.raises(ValueError, match="multiple of 128"):
        experts_mgpu(x, weights, ids, gate_up, down, tiles=MgpuMoeTiles(compute_warpgroups=2), interpret=True)
    with pytest.raises(ValueError, match="max_concurrent_steps must be >= 2"):
        experts_mgpu(x, weights, ids, gate_up, down, tiles=MgpuMoeTiles(max_concurrent_steps=1), interpret=True)


# fp8 with the plain layout is the pair the other two cover between them (each ~18 s of CI).
@pytest.mark.parametrize(("quantization", "layout"), [("none", "plain"), ("fp8", "pretiled")])
def test_experts_module_and_model_select_the_mgpu_kernel(quantization, layout):
    """Through the `Experts` module, and through a two-block bf16 model whose blocks' experts (or fp8 scales)
    differ: the kernel must read block i's weights in block i from the stack, in either layout."""
    x, weights, ids, gate_up, down = moe_case(3, 8, 2, 64, 32, jnp.bfloat16, seed=3)
    variables = {"params": {"gate_up_proj": gate_up, "down_proj": down}}
    outputs = {impl: Experts(Config.tiny(moe_implementation=impl)).apply(variables, x, weights, ids)
               for impl in ("grouped", "pallas_mgpu")}
    _close(outputs["pallas_mgpu"], experts_dense(*as_f32(x, weights, ids, gate_up, down)), jnp.bfloat16)

    config = Config.tiny(num_layers=2, layer_types=("full_attention", "full_attention"),
                         expert_quantization=quantization, expert_layout=layout)
    params = init_params(config, jax.random.key(1), jnp.bfloat16)
    experts = params["blocks"]["layer_0"]["experts"]
    for name in ("gate_up_proj_scale", "down_proj_scale") if quantization == "fp8" else ("gate_up_proj", "down_proj"):
        experts[name] = experts[name].at[0].multiply(30.0)
    prompt = jax.random.randint(jax.random.key(2), (2, 8), 3, config.vocab_size)
    cache = encode(params, config, prompt, capacity=8)
    canvas = jax.random.randint(jax.random.key(3), (2, config.canvas_length), 3, config.vocab_size)
    logits = {impl: denoise_logits(params, config.replace(moe_implementation=impl), cache, canvas).astype(jnp.float32)
              for impl in ("grouped", "pallas_mgpu")}
    assert np.isfinite(np.asarray(logits["pallas_mgpu"])).all()
    # bf16 through two blocks: a few bf16 roundings of the logits' scale apart, not a different block's weights.
    _close(logits["pallas_mgpu"], logits["grouped"], jnp.bfloat16, scale=4)


def test_mgpu_moe_kernel_lowers_for_cuda_at_released_shapes():
    """Batch 1 and 8 canvases on the released [5 blocks, ...] stacks read in place; a tile set too large for
    shared memory is refused by name before Mosaic GPU sees it."""
    cfg = Config.diffusiongemma_26b_a4b()
    k, experts, layers = cfg.top_k_experts, cfg.num_experts, 5
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    stacks = (jax.ShapeDtypeStruct((layers, experts, hidden, 2 * inter), jnp.bfloat16),
              jax.ShapeDtypeStruct((layers, experts, inter, hidden), jnp.bfloat16))
    for tokens in (cfg.canvas_length, 8 * cfg.canvas_length):
        routing = (jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16), jax.ShapeDtypeStruct((tokens, k), jnp.float32),
                   jax.ShapeDtypeStruct((tokens, k), jnp.int32))
        # The defaults at both sizes, every setting the kernel bench sweeps at batch 1 (the grid is what batch 8
        # changes, and the defaults show it lowers).
        sweep = MGPU_MOE_TILES if tokens == cfg.canvas_length else ()
        for tiles in (MgpuMoeTiles(), *(MgpuMoeTiles(**c) for c in sweep)):
            text = lower_for_cuda(lambda x, w, i, up, down, tiles=tiles: experts_mgpu(
                x, w, i, up, down, jnp.int32(2), tiles=tiles, interpret=False), *routing, *stacks)
            assert text.count(f"@{MGPU_CALL}(") == 2  # gate/up and down
            # The stacks reach the kernels whole: no per-layer slice (a 0.5 GB copy) of them.
            assert not re.search(rf"-> tensor<1x{experts}x{hidden}x{2 * inter}xbf16>", text)
            # fp8 stacks and their scales go to the kernels as they are (no widened copy of a stack).
        fp8_stacks = [jax.ShapeDtypeStruct(a.shape, FP8) for a in stacks]
        scales = [jax.ShapeDtypeStruct((layers, experts, n), jnp.float32) for n in (2 * inter, hidden)]
        for tiles in (MgpuMoeTiles(), *(MgpuMoeTiles(**c) for c in sweep if "compute_warpgroups" not in c)):
            text = lower_for_cuda(lambda x, w, i, up, down, s_up, s_down, tiles=tiles: experts_mgpu(
                x, w, i, up, down, jnp.int32(4), gate_up_scale=s_up, down_scale=s_down, tiles=tiles,
                interpret=False), *routing, *fp8_stacks, *scales)
            assert text.count(f"@{MGPU_CALL}(") == 2
            assert not re.search(rf"tensor<{layers}x{experts}x{hidden}x{2 * inter}xbf16>", text)
    # Pretiled stacks: each weight tile one contiguous block.
    tiled = [jax.ShapeDtypeStruct(shape, jnp.bfloat16) for shape in pretiled_shapes(*(a.shape for a in stacks))]
    text = lower_for_cuda(lambda x, w, i, up, down: experts_mgpu(x, w, i, up, down, jnp.int32(2), pretiled=True,
                                                                  interpret=False), *routing, *tiled)
    assert text.count(f"@{MGPU_CALL}(") == 2
    many = 8 * 65536  # tokens: 4.2M assignments, 65,663 row tiles of 64
    with pytest.raises(ValueError, match="fewer tokens per call"):
        jax.eval_shape(lambda x, w, i: experts_mgpu(x, w, i, *stacks, jnp.int32(0), interpret=False),
                       jax.ShapeDtypeStruct((many, hidden), jnp.bfloat16), jax.ShapeDtypeStruct((many, k), jnp.float32),
                       jax.ShapeDtypeStruct((many, k), jnp.int32))
    with pytest.raises(ValueError, match="too large for shared memory"):
            lower_for_cuda(lambda x, w, i, up, down: experts_mgpu(
                x, w, i, up, down, jnp.int32(0), tiles=MgpuMoeTiles(down_block_n=256, max_concurrent_steps=6),
                interpret=False), *routing, *stacks)


def test_decoder_with_mgpu_experts_lowers_for_cuda(kernels_compiled):
    """The tiny decoder in bf16 with `moe_implementation="pallas_mgpu"`: both kernels, each block's experts
    from the stack."""
    config = Config.tiny(num_layers=2, layer_types=("full_attention", "full_attention"),
                         moe_implementation="pallas_mgpu")
    params = param_shapes(config, jnp.bfloat16)
    cache = jax.eval_shape(lambda: init_cache(config, 3, 8, jnp.bfloat16))
    canvas = jax.ShapeDtypeStruct((3, config.canvas_length), jnp.int32)
    text = lower_for_cuda(lambda p, c, ids: denoise_logits(p, config, c, ids), params, cache, canvas)
    assert text.count(f"@{MGPU_CALL}(") == 2
    stack = params["blocks"]["layer_0"]["experts"]["gate_up_proj"]
    assert "x".join(map(str, stack.shape)) in text


def test_grouped_experts_through_jax_mosaic_ragged_dot_lower_for_cuda():
    """The kernel bench's `ragged_dot_mgpu` reference point (JAX's example kernel in `experts_grouped`) at
    batch 8: a JAX whose example changed its signature or tiling fails here, not in a GPU session."""
    cfg = Config.diffusiongemma_26b_a4b()
    tokens, k, hidden, inter = 8 * cfg.canvas_length, cfg.top_k_experts, cfg.hidden_size, cfg.moe_intermediate_size
    args = (jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16), jax.ShapeDtypeStruct((tokens, k), jnp.float32),
            jax.ShapeDtypeStruct((tokens, k), jnp.int32),
            jax.ShapeDtypeStruct((cfg.num_experts, hidden, 2 * inter), jnp.bfloat16),
            jax.ShapeDtypeStruct((cfg.num_experts, inter, hidden), jnp.bfloat16))
    text = lower_for_cuda(lambda *a: experts_grouped(*a, ragged_dot=jax_ragged_dot_mgpu), *args)
    assert text.count(f"@{MGPU_CALL}(") == 2
