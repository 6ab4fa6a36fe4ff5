"""Pallas kernels against their plain-JAX twins (interpret mode on CPU) and lowered for CUDA from here.

Interpret mode runs the kernel bodies exactly as written (grid, block indexing, loops, masks) on the CPU;
the CUDA lowering runs Pallas' Triton lowering of the same kernels, so a kernel that cannot compile for an
NVIDIA GPU fails here even without one.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import diffjax
from diffjax.config import AttentionConfig, Config
from diffjax.generate import generate
from diffjax.kernels import bench as kernel_bench
from diffjax.kernels.attention import (
    AttentionTiles,
    attend_padding_only,
    attention_inputs_pallas,
    global_attention_pallas,
)
from diffjax.kernels.moe import (
    MlpInputs,
    MoeTiles,
    experts_pallas,
    mlp_reference,
    pretile_experts,
    untile_experts,
)
from diffjax.kernels.moe_mgpu import experts_mgpu
from diffjax.kernels.vocab import VocabTiles, vocab_stats_pallas, vocab_stats_reference
from diffjax.layers import Experts, attention_inputs, experts_dense, experts_grouped, rope_inverse_frequencies
from diffjax.model import denoise_logits, encode, init_cache, init_params, param_shapes, tied_logits
from diffjax.quantize import FP8, dequantize, quantize


def lower_for_cuda(fn, *args) -> str:
    """StableHLO text of `fn(*args)` lowered for CUDA (no GPU needed); Triton kernels appear as custom calls."""
    return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).as_text()


def _close(actual, expected, dtype, scale=1.0) -> None:
    """fp32: tight. bf16: within a few bf16 roundings of the largest magnitude (compare against a float32
    oracle of the same bf16 inputs: the bf16 twins round intermediates at other points than the kernels)."""
    actual, expected = np.asarray(actual, np.float32), np.asarray(expected, np.float32)
    peak = np.abs(expected).max()
    assert peak > 0.05  # never compare on (near) zeros
    tol = scale * (2e-5 if dtype == jnp.float32 else 2**-7 * peak)
    np.testing.assert_allclose(actual, expected, atol=tol, rtol=2e-5 * scale if dtype == jnp.float32 else 0)


def as_f32(*arrays):
    return tuple(a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a for a in arrays)


# --------------------------------------------------------------------------------------------- moe


def moe_case(tokens: int, experts: int, top_k: int, hidden: int, inter: int, dtype, seed: int):
    """Random MoE inputs routed to the first half of the experts only: several experts get zero tokens."""
    keys = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(keys[0], (tokens, hidden)).astype(dtype)
    scores = jax.random.normal(keys[1], (tokens, max(top_k, experts // 2)))
    weights, ids = jax.lax.top_k(jax.nn.softmax(scores), top_k)
    gate_up = (0.3 * jax.random.normal(keys[2], (experts, hidden, 2 * inter))).astype(dtype)
    down = (0.3 * jax.random.normal(keys[3], (experts, inter, hidden))).astype(dtype)
    return x, weights, ids.astype(jnp.int32), gate_up, down


# The default launch (column tiles first, plain products), transposed products, row tiles first, and k-loops
# starting at a k-step of their own.
LAUNCH_VARIANTS = [{}, {"swap_ab": True}, {"column_tiles_first": False}, {"skew_k": True}]


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "block_rows", "dtype"),
    [
        (37, 8, 2, 64, 32, 16, jnp.float32),  # ragged groups spanning several row tiles
        (50, 16, 4, 48, 80, 32, jnp.bfloat16),  # dims that are multiples of 16 but not powers of two
    ],
)
@pytest.mark.parametrize("launch", LAUNCH_VARIANTS)
def test_moe_kernel_matches_twins(tokens, experts, top_k, hidden, inter, block_rows, dtype, launch):
    args = moe_case(tokens, experts, top_k, hidden, inter, dtype, seed=tokens)
    ours = experts_pallas(*args, tiles=MoeTiles(block_rows=block_rows, **launch), interpret=True)
    assert ours.shape == args[0].shape and ours.dtype == dtype
    _close(ours, experts_dense(*as_f32(*args)), dtype)
    _close(experts_grouped(*args), experts_dense(*as_f32(*args)), dtype)  # the twin meets the same bar


@pytest.mark.parametrize(("dtype", "fp8"), [(jnp.float32, False), (jnp.bfloat16, False), (jnp.bfloat16, True)])
@pytest.mark.parametrize("launch", [{}, {"swap_ab": True, "column_tiles_first": False},
                                    {"skew_k": True, "gate_up_block_k": 16, "down_block_k": 16}])
def test_moe_kernel_reads_pretiled_stacks(dtype, fp8, launch):
    """`pretile_experts` + `pretiled=True`: the same outputs as the plain layout, from a two-layer stack read
    in place, with column tiles narrower than the sizes (several tiles of gate, of up and of down)."""
    x, weights, ids, gate_up, down = moe_case(41, 8, 2, 64, 48, dtype, seed=9)
    gate_up, down = jnp.stack([gate_up, 0.5 * gate_up[::-1]]), jnp.stack([down, 0.5 * down[::-1]])
    scales = {}
    if fp8:
        (gate_up, up_scale), (down, down_scale) = quantize(gate_up), quantize(down)
        scales = {"gate_up_scale": up_scale, "down_scale": down_scale}
    tiles = MoeTiles(block_rows=16, gate_up_block_n=16, down_block_n=32, **launch)
    tiled_gate_up, tiled_down = pretile_experts(gate_up, down, tiles)
    assert tiled_gate_up.shape == (2, 8, 6, 64, 16) and tiled_down.shape == (2, 8, 2, 48, 32)
    assert tiled_gate_up.dtype == gate_up.dtype
    layer = jnp.int32(1)
    plain = experts_pallas(x, weights, ids, gate_up, down, layer, tiles=tiles, interpret=True, **scales)
    ours = experts_pallas(x, weights, ids, tiled_gate_up, tiled_down, layer, tiles=tiles, pretiled=True,
                          interpret=True, **scales)
    assert float(jnp.std(plain.astype(jnp.float32))) > 0.1
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain, np.float32))
    if not fp8:
        _close(ours, experts_dense(*as_f32(x, weights, ids, gate_up[1], down[1])), dtype)


def test_moe_kernel_rejects_bad_pretiled_stacks():
    x, weights, ids, gate_up, down = moe_case(20, 8, 2, 64, 48, jnp.float32, seed=3)
    tiled_gate_up, tiled_down = pretile_experts(gate_up, down, MoeTiles(gate_up_block_n=16))
    with pytest.raises(ValueError, match="pretiled"):
        experts_pallas(x, weights, ids, gate_up, down, pretiled=True, interpret=True)
    # 32-wide tiles of 2 x 48 columns: the second would hold gate and up columns.
    mixed_gate_up = gate_up.reshape(8, 64, 3, 32).transpose(0, 2, 1, 3)
    with pytest.raises(ValueError, match="must divide inter"):
        experts_pallas(x, weights, ids, mixed_gate_up, tiled_down, pretiled=True, interpret=True)
    with pytest.raises(ValueError, match="does not match"):
        pretile_experts(gate_up, down[:, :16])
    ours = experts_pallas(x, weights, ids, tiled_gate_up, tiled_down, pretiled=True, interpret=True)
    np.testing.assert_allclose(ours, experts_pallas(x, weights, ids, gate_up, down, interpret=True), rtol=1e-6,
                               atol=1e-6)


def test_moe_kernel_skewed_k_loops_sum_the_same_terms_in_another_order():
    """`skew_k`: every program still visits each k-step once (same result to float32 rounding), starting
    elsewhere (so not bit for bit the unskewed sums)."""
    args = moe_case(50, 16, 4, 48, 80, jnp.float32, seed=3)
    tiles = MoeTiles(block_rows=16, gate_up_block_k=16, down_block_k=16)
    plain = experts_pallas(*args, tiles=tiles, interpret=True)
    skewed = experts_pallas(*args, tiles=dataclasses.replace(tiles, skew_k=True), interpret=True)
    np.testing.assert_allclose(np.asarray(skewed), np.asarray(plain), rtol=1e-5, atol=1e-5)
    assert not np.array_equal(np.asarray(skewed), np.asarray(plain))


@pytest.mark.parametrize(("kernel", "dtype"), [(experts_pallas, jnp.float32), (experts_mgpu, jnp.bfloat16)])
def test_moe_kernels_read_a_layer_of_a_stack_in_place(kernel, dtype):
    """The Triton and the Mosaic GPU expert kernels."""
    x, weights, ids, gate_up, down = moe_case(20, 8, 2, 32, 16, dtype, seed=4)
    stack_up = jnp.stack([gate_up, -0.5 * gate_up, gate_up[::-1]])
    stack_down = jnp.stack([down, down[::-1], 2.0 * down])
    run = jax.jit(lambda layer: kernel(x, weights, ids, stack_up, stack_down, layer, interpret=True))
    for layer in (1, 2):  # one compile, the layer traced
        _close(run(jnp.int32(layer)), experts_dense(*as_f32(x, weights, ids, stack_up[layer], stack_down[layer])),
               dtype)
    with pytest.raises(ValueError, match="stacks"):
        kernel(x, weights, ids, gate_up, down, 0)


@pytest.mark.parametrize(
    ("tokens", "experts", "top_k", "hidden", "inter", "block_rows", "dtype"),
    [
        (37, 8, 2, 64, 32, 16, jnp.float32),
        (50, 16, 4, 48, 80, 32, jnp.bfloat16),
    ],
)
@pytest.mark.parametrize("launch", LAUNCH_VARIANTS)
def test_moe_kernel_fp8_matches_dequantized_twins(tokens, experts, top_k, hidden, inter, block_rows, dtype, launch):
    """fp8 stacks of two layers read in place at a traced layer index, half the experts without tokens."""
    x, weights, ids, gate_up, down = moe_case(tokens, experts, top_k, hidden, inter, dtype, seed=tokens + 1)
    # Layer 1 differs from layer 0 in weights and, by the factor, in its scales.
    (q_up, s_up), (q_down, s_down) = (quantize(jnp.stack([w, 0.5 * w[::-1]])) for w in (gate_up, down))
    layer = jnp.int32(1)
    ours = jax.jit(lambda i: experts_pallas(x, weights, ids, q_up, q_down, i, gate_up_scale=s_up, down_scale=s_down,
                                            tiles=MoeTiles(block_rows=block_rows, **launch),
                                            interpret=True))(layer)
    assert ours.shape == x.shape and ours.dtype == dtype
    oracle = experts_dense(x.astype(jnp.float32), weights, ids, dequantize(q_up[1], s_up[1], jnp.float32),
                           dequantize(q_down[1], s_down[1], jnp.float32))
    _close(ours, oracle, dtype)
    twin = experts_grouped(x, weights, ids, dequantize(q_up[1], s_up[1], dtype), dequantize(q_down[1], s_down[1], dtype))
    _close(twin, oracle, dtype)  # the twin (weights dequantized to the activation dtype) meets the same bar


@pytest.mark.parametrize(("kernel", "dtype", "fp8", "pretiled"), [
    (experts_pallas, jnp.float32, False, False), (experts_pallas, jnp.float32, True, True),
    (experts_mgpu, jnp.bfloat16, False, False), (experts_mgpu, jnp.bfloat16, True, False),
])
def test_moe_kernels_differentiate_through_their_twin(kernel, dtype, fp8, pretiled):
    """`jax.grad` through either kernel family (forward: the kernel; backward: `moe.experts_reference`): the
    same gradients as differentiating the plain-JAX twin, for x, the routing weights and either a traced layer
    of the weight stacks (zero in the other layer) or, fp8, the scales."""
    x, weights, ids, gate_up, down = moe_case(24, 8, 2, 64, 32, dtype, seed=5)
    stacks = [jnp.stack([w, 0.5 * w[::-1]]) for w in (gate_up, down)]
    scales = []
    if fp8:
        (q_up, s_up), (q_down, s_down) = quantize(stacks[0]), quantize(stacks[1])
        stacks, scales = [q_up, q_down], [s_up, s_down]
    if pretiled:
        stacks = list(pretile_experts(*stacks, MoeTiles(gate_up_block_n=16, down_block_n=32)))
    layer = jnp.int32(1)

    def loss(forward, x, weights, a, b):
        """Sum of squares of the experts' output; (a, b) are the scales (fp8) or the weight stacks."""
        args = (*stacks, layer, a, b) if fp8 else (a, b, layer)
        return jnp.sum(forward(x, weights, ids, *args).astype(jnp.float32) ** 2)

    def ours(x, weights, ids, gate_up, down, layer, gate_up_scale=None, down_scale=None):
        return kernel(x, weights, ids, gate_up, down, layer, gate_up_scale=gate_up_scale, down_scale=down_scale,
                      pretiled=pretiled, interpret=True)

    def twin(x, weights, ids, gate_up, down, layer, gate_up_scale=None, down_scale=None):
        """Written out here rather than `experts_reference` (the backward under test)."""
        if pretiled:
            gate_up, down = untile_experts(gate_up, down)
        gate_up, down = gate_up[layer], down[layer]
        if fp8:
            gate_up = dequantize(gate_up, gate_up_scale[layer], dtype)
            down = dequantize(down, down_scale[layer], dtype)
        return experts_grouped(x, weights, ids, gate_up, down)

    differentiated = scales if fp8 else stacks
    mine = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3))(x, weights, *differentiated)
    want = jax.grad(functools.partial(loss, twin), argnums=(0, 1, 2, 3))(x, weights, *differentiated)
    if not fp8:
        assert float(jnp.abs(mine[2][0].astype(jnp.float32)).max()) == 0  # layer 0's weights: no gradient
    for got, expected in zip(mine, want, strict=True):
        assert got.shape == expected.shape and got.dtype == expected.dtype
        # The cotangent is the kernel's output, not the twin's: float32 agrees tightly, bf16 to its roundings.
        _close(got, expected, dtype, scale=1 if dtype == jnp.float32 else 4)


def mlp_case(tokens: int, hidden: int, inter: int, dtype, seed: int, layers: int | None = None) -> MlpInputs:
    """A dense MLP's random input and fused weights (a stack of `layers` if given)."""
    keys = jax.random.split(jax.random.key(seed), 3)
    lead = () if layers is None else (layers,)
    return MlpInputs(jax.random.normal(keys[0], (tokens, hidden)).astype(dtype),
                     (0.3 * jax.random.normal(keys[1], (*lead, hidden, 2 * inter))).astype(dtype),
                     (0.3 * jax.random.normal(keys[2], (*lead, inter, hidden))).astype(dtype))


@pytest.mark.parametrize(("tokens", "mlp_inter", "mlp_rows", "dtype", "fp8", "stacked"), [
    (37, 48, 16, jnp.float32, False, False),  # a tail token tile (rows past the end), 3 column tiles of 16
    (64, 96, 32, jnp.float32, False, True),  # whole token tiles, read from layer 1 of a stack
    (50, 80, 64, jnp.bfloat16, True, True),  # fp8 experts beside a bf16 MLP; one token tile wider than tokens
])
@pytest.mark.parametrize("launch", [{}, {"swap_ab": True, "column_tiles_first": False}])
def test_moe_kernels_run_the_dense_mlp_in_their_launches(tokens, mlp_inter, mlp_rows, dtype, fp8, stacked, launch):
    """`experts_pallas(..., mlp=...)`: the MLP's programs give `mlp_reference`'s output, and the experts'
    output is bit for bit the one without them (their programs are the same)."""
    x, weights, ids, gate_up, down = moe_case(tokens, 8, 2, 64, 32, dtype, seed=tokens)
    mlp = mlp_case(tokens, 64, mlp_inter, dtype, seed=tokens + 1, layers=2 if stacked else None)
    scales, layer = {}, None
    if stacked:
        gate_up, down, layer = jnp.stack([0.5 * gate_up[::-1], gate_up]), jnp.stack([0.5 * down[::-1], down]), 1
    if fp8:
        (gate_up, s_up), (down, s_down) = quantize(gate_up), quantize(down)
        scales = {"gate_up_scale": s_up, "down_scale": s_down}
    tiles = MoeTiles(block_rows=16, mlp_block_rows=mlp_rows, mlp_block_n=16, **launch)
    alone = experts_pallas(x, weights, ids, gate_up, down, layer, tiles=tiles, interpret=True, **scales)
    experts, dense = experts_pallas(x, weights, ids, gate_up, down, layer, mlp=mlp, tiles=tiles, interpret=True,
                                    **scales)
    np.testing.assert_array_equal(np.asarray(experts, np.float32), np.asarray(alone, np.float32))
    assert dense.shape == x.shape and dense.dtype == dtype
    weights_of_layer = (mlp.gate_up, mlp.down) if layer is None else (mlp.gate_up[layer], mlp.down[layer])
    _close(dense, mlp_reference(*as_f32(mlp.x, *weights_of_layer)), dtype)


def test_moe_kernels_differentiate_the_dense_mlp_through_its_twin():
    """`jax.grad` through the experts with the MLP beside them: the MLP's input and weights (a traced layer of
    a stack) get `mlp_reference`'s gradients, the experts' arguments theirs."""
    x, weights, ids, gate_up, down = moe_case(24, 8, 2, 64, 32, jnp.float32, seed=6)
    mlp = mlp_case(24, 64, 48, jnp.float32, seed=7, layers=2)
    stacks = [jnp.stack([w, 0.5 * w[::-1]]) for w in (gate_up, down)]
    layer = jnp.int32(1)
    probe = jax.random.normal(jax.random.key(8), x.shape)  # the MLP's cotangent, whatever its output

    def loss(forward, x, mlp_x, mlp_gate_up, mlp_down):
        experts, dense = forward(x, mlp_x, mlp_gate_up, mlp_down)
        return jnp.sum(experts ** 2) + jnp.sum(dense * probe)

    def ours(x, mlp_x, mlp_gate_up, mlp_down):
        return experts_pallas(x, weights, ids, *stacks, layer, mlp=MlpInputs(mlp_x, mlp_gate_up, mlp_down),
                              tiles=MoeTiles(block_rows=16, mlp_block_n=16), interpret=True)

    def twin(x, mlp_x, mlp_gate_up, mlp_down):
        return (experts_grouped(x, weights, ids, stacks[0][layer], stacks[1][layer]),
                mlp_reference(mlp_x, mlp_gate_up[layer], mlp_down[layer]))

    mine = jax.grad(functools.partial(loss, ours), argnums=(0, 1, 2, 3))(x, *mlp)
    want = jax.grad(functools.partial(loss, twin), argnums=(0, 1, 2, 3))(x, *mlp)
    assert float(jnp.abs(mine[2][0]).max()) == 0  # layer 0's MLP: no gradient
    for got, expected in zip(mine, want, strict=True):  # the cotangents are the kernels' outputs, not the twin's
        _close(got, expected, jnp.float32, scale=5)


def test_moe_kernels_refuse_a_mismatched_dense_mlp():
    x, weights, ids, gate_up, down = moe_case(8, 4, 2, 32, 16, jnp.float32, seed=0)
    mlp = mlp_case(8, 32, 48, jnp.float32, seed=1)
    with pytest.raises(ValueError, match="MLP's x must be shaped"):
        experts_pallas(x, weights, ids, gate_up, down, mlp=mlp._replace(x=mlp.x[:4]), interpret=True)
    with pytest.raises(ValueError, match="a layers axis exactly when"):
        experts_pallas(x, weights, ids, gate_up, down, mlp=mlp._replace(down=mlp.down[:16]), interpret=True)
    with pytest.raises(ValueError, match="a layers axis exactly when"):  # stacked experts, one layer's MLP
        experts_pallas(x, weights, ids, gate_up[None], down[None], 0, mlp=mlp, interpret=True)
    with pytest.raises(ValueError, match="multiple of 16"):
        experts_pallas(x, weights, ids, gate_up, down, mlp=mlp_case(8, 32, 40, jnp.float32, seed=1), interpret=True)


def test_moe_kernel_rejects_inconsistent_fp8_inputs():
    x, weights, ids, gate_up, down = moe_case(4, 4, 2, 32, 16, jnp.float32, seed=0)
    (q_up, s_up), (q_down, s_down) = quantize(gate_up), quantize(down)
    with pytest.raises(ValueError, match="fp8 experts need"):
        experts_pallas(x, weights, ids, q_up, q_down)  # no scales
    with pytest.raises(ValueError, match="fp8 experts need"):
        experts_pallas(x, weights, ids, gate_up, down, gate_up_scale=s_up, down_scale=s_down)
    with pytest.raises(ValueError, match="down_scale must be"):
        experts_pallas(x, weights, ids, q_up, q_down, gate_up_scale=s_up, down_scale=s_down[:, :8])


def test_experts_module_selects_the_kernel():
    # One token: a single used row tile, every other tile skipped.
    x, weights, ids, gate_up, down = moe_case(1, 8, 2, 64, 32, jnp.float32, seed=3)
    variables = {"params": {"gate_up_proj": gate_up, "down_proj": down}}
    outputs = {
        impl: Experts(Config.tiny(moe_implementation=impl)).apply(variables, x, weights, ids)
        for impl in ("grouped", "pallas")
    }
    _close(outputs["pallas"], outputs["grouped"], jnp.float32)


@pytest.mark.parametrize(("quantization", "layout"), [("none", "plain"), ("fp8", "plain"), ("none", "pretiled"),
                                                      ("fp8", "pretiled")])
def test_model_hands_the_kernel_each_blocks_experts_from_the_stack(quantization, layout):
    """Two scanned blocks with different experts: the kernel must read block i's weights (and fp8 scales)
    in block i, in either layout ("grouped" untiles pretiled experts)."""
    config = Config.tiny(num_layers=2, layer_types=("full_attention", "full_attention"),
                         expert_quantization=quantization, expert_layout=layout)
    params = init_params(config, jax.random.key(1))
    experts = params["blocks"]["layer_0"]["experts"]  # [blocks, ...] stacks
    # fp8: the weights stay e4m3 and block 0's scales carry the factor.
    for name in ("gate_up_proj_scale", "down_proj_scale") if quantization == "fp8" else ("gate_up_proj", "down_proj"):
        experts[name] = experts[name].at[0].multiply(30.0)
    prompt = jax.random.randint(jax.random.key(2), (2, 8), 3, config.vocab_size)
    cache = encode(params, config, prompt, capacity=8)
    canvas = jax.random.randint(jax.random.key(3), (2, config.canvas_length), 3, config.vocab_size)
    logits = {
        impl: denoise_logits(params, config.replace(moe_implementation=impl), cache, canvas)
        for impl in ("grouped", "pallas")
    }
    _close(logits["pallas"], logits["grouped"], jnp.float32, scale=5)


@pytest.mark.parametrize(("quantization", "layout"), [("none", "plain"), ("fp8", "plain"), ("fp8", "pretiled")])
def test_decoder_lowered_for_cuda_slices_no_expert_weights(kernels_compiled, quantization, layout):
    """In the scanned model the kernels take the whole expert stacks: no per-block slice (copy) of them,
    nor of the fp8 scales."""
    config = Config.tiny(num_layers=2, layer_types=("full_attention", "full_attention"), moe_implementation="pallas",
                         expert_quantization=quantization, expert_layout=layout)
    params = param_shapes(config, jnp.bfloat16)
    cache = jax.eval_shape(lambda: init_cache(config, 2, 8, jnp.bfloat16))
    canvas = jax.ShapeDtypeStruct((2, config.canvas_length), jnp.int32)
    text = lower_for_cuda(lambda p, c, ids: denoise_logits(p, config, c, ids), params, cache, canvas)
    assert text.count("__gpu$xla.gpu.triton") == 2
    ir_type = {jnp.dtype(jnp.bfloat16): "bf16", jnp.dtype(jnp.float32): "f32", jnp.dtype(FP8): "f8E4M3FN"}
    experts = params["blocks"]["layer_0"]["experts"]
    assert len(experts) == (4 if quantization == "fp8" else 2)
    for leaf in experts.values():  # [blocks, ...]: one block's slice would be a tensor<1x...>
        one_block = "x".join(map(str, leaf.shape[1:])) + "x" + ir_type[jnp.dtype(leaf.dtype)] + ">"
        assert "x".join(map(str, leaf.shape)) in text  # the whole stack reaches the kernel
        assert not re.search(r"dynamic_slice[^\n]*-> tensor<1x" + one_block, text)
    assert experts["gate_up_proj"].ndim == (5 if layout == "pretiled" else 4)


@pytest.mark.parametrize("moe", ["grouped", "pallas", "pallas_mgpu"])
def test_decoder_step_has_no_loop_inside_a_layer(kernels_compiled, moe):
    """On a GPU every iteration of a loop costs its kernels' launches again: the only loop of a decoder step is
    the scan over layer blocks, and unrolled there is none. (`jnp.searchsorted`'s default method was a while
    loop of log2(experts) iterations in each layer's expert layout: 240 iterations per full-size step.)"""
    config = Config.tiny(num_layers=8, layer_types=(("sliding_attention",) * 3 + ("full_attention",)) * 2,
                         moe_implementation=moe, global_attention_implementation="pallas",
                         sliding_attention_implementation="pallas")
    params = param_shapes(config, jnp.bfloat16)
    cache = jax.eval_shape(lambda: init_cache(config, 2, 8, jnp.bfloat16))
    canvas = jax.ShapeDtypeStruct((2, config.canvas_length), jnp.int32)

    def lowered(scan_unroll):
        unrolled = config.replace(scan_unroll=scan_unroll)
        return lower_for_cuda(lambda p, c, ids: denoise_logits(p, unrolled, c, ids), params, cache, canvas)

    assert lowered(1).count("stablehlo.while") == 1
    assert lowered(config.num_blocks).count("stablehlo.while") == 0


def test_pretiled_model_round_trips_and_refuses_what_it_cannot_do(tmp_path):
    import convert
    from convert.errors import CheckpointError
    from diffjax.kernels.moe import pretile_model, untile_model
    from diffjax.quantize import quantize_model

    config = Config.tiny()
    params = init_params(config, jax.random.key(4))
    tiled_config, tiled = pretile_model(config, params)
    assert tiled_config == config.replace(expert_layout="pretiled")
    # The tree has the shapes the pretiled config declares, and untiling gives the weights back exactly.
    assert jax.tree.map(lambda a: a.shape, tiled) == jax.tree.map(lambda a: a.shape, param_shapes(tiled_config))
    back_config, back = untile_model(tiled_config, tiled)
    assert back_config == config
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True))
    with pytest.raises(ValueError, match="already 'pretiled'"):
        pretile_model(tiled_config, tiled)
    with pytest.raises(ValueError, match="quantize the plain-layout experts"):
        quantize_model(tiled_config, tiled)
    with pytest.raises(CheckpointError, match="expert_layout='pretiled'"):
        convert.save(tiled, tiled_config, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    # Checkpoints hold the plain layout; loading can pretile (after quantizing, for fp8).
    convert.save(params, config, tmp_path / "plain")
    loaded_config, loaded = diffjax.load(tmp_path / "plain", experts_pretiled=True)
    assert loaded_config == tiled_config
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(loaded), jax.tree.leaves(tiled), strict=True))
    fp8_config, fp8 = diffjax.load(tmp_path / "plain", experts_fp8=True, experts_pretiled=True)
    assert (fp8_config.expert_quantization, fp8_config.expert_layout) == ("fp8", "pretiled")
    assert fp8["blocks"]["layer_0"]["experts"]["gate_up_proj"].dtype == FP8
    with pytest.raises(ValueError, match="expert_layout must be one of"):
        config.replace(expert_layout="tiled")
    with pytest.raises(ValueError, match="not by 'expert_parallel'"):
        tiled_config.replace(moe_implementation="expert_parallel")


def test_moe_kernel_lowers_for_cuda_at_released_shapes():
    cfg = Config.diffusiongemma_26b_a4b()
    tokens, k, experts = 2 * cfg.canvas_length, cfg.top_k_experts, cfg.num_experts
    args = (
        jax.ShapeDtypeStruct((tokens, cfg.hidden_size), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens, k), jnp.float32),
        jax.ShapeDtypeStruct((tokens, k), jnp.int32),
        jax.ShapeDtypeStruct((experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size), jnp.bfloat16),
        jax.ShapeDtypeStruct((experts, cfg.moe_intermediate_size, cfg.hidden_size), jnp.bfloat16),
    )
    text = lower_for_cuda(lambda *a: experts_pallas(*a, interpret=False), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2  # gate/up and down kernels
    # The kernels gather their rows of x and scatter their output rows: the only [rows, hidden] arrays are x
    # and the result (tokens), the per-assignment output (+ a spare row for padding) and its view without the
    # spare row, never an expert-sorted copy padded to row tiles.
    row_counts = {int(n) for n in re.findall(rf"tensor<(\d+)x{cfg.hidden_size}xbf16>", text)}
    assert row_counts == {tokens, tokens * k, tokens * k + 1}, row_counts
    swapped = lower_for_cuda(lambda *a: experts_pallas(*a, tiles=MoeTiles(swap_ab=True), interpret=False), *args)
    assert swapped.count("__gpu$xla.gpu.triton") == 2 and swapped != text  # the option reaches the kernels

    # A scan over a stack of layers hands the kernels the whole stack: no per-layer slice (a copy) of it.
    layers = 2
    stacks = [jax.ShapeDtypeStruct((layers, *a.shape), a.dtype) for a in args[3:]]

    def scanned(x, weights, ids, gate_up, down, sliced):
        def layer_step(h, layer):
            if sliced:
                return experts_pallas(h, weights, ids, gate_up[layer], down[layer], interpret=False), None
            return experts_pallas(h, weights, ids, gate_up, down, layer, interpret=False), None

        return jax.lax.scan(layer_step, x, jnp.arange(layers))[0]

    slice_type = f"tensor<1x{cfg.num_experts}x{cfg.hidden_size}x{2 * cfg.moe_intermediate_size}xbf16>"
    in_place = lower_for_cuda(lambda *a: scanned(*a, sliced=False), *args[:3], *stacks)
    assert in_place.count("__gpu$xla.gpu.triton") == 2 and slice_type not in in_place
    assert slice_type in lower_for_cuda(lambda *a: scanned(*a, sliced=True), *args[:3], *stacks)


def test_moe_kernels_with_the_dense_mlp_lower_for_cuda_at_released_shapes():
    """The released layer's dense MLP in the expert kernels' launches: still two Triton kernels and no matmul
    left to XLA, the MLP's weight stacks read in place (no per-layer slice)."""
    cfg = Config.diffusiongemma_26b_a4b()
    tokens, k, experts, layers = cfg.canvas_length, cfg.top_k_experts, cfg.num_experts, 5
    hidden, inter, mlp_inter = cfg.hidden_size, cfg.moe_intermediate_size, cfg.intermediate_size
    args = (
        jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens, k), jnp.float32),
        jax.ShapeDtypeStruct((tokens, k), jnp.int32),
        jax.ShapeDtypeStruct((layers, experts, hidden, 2 * inter), jnp.bfloat16),
        jax.ShapeDtypeStruct((layers, experts, inter, hidden), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16),
        jax.ShapeDtypeStruct((layers, hidden, 2 * mlp_inter), jnp.bfloat16),
        jax.ShapeDtypeStruct((layers, mlp_inter, hidden), jnp.bfloat16),
    )
    text = lower_for_cuda(lambda x, w, i, up, down, layer, mlp_x, mlp_up, mlp_down: experts_pallas(
        x, w, i, up, down, layer, mlp=MlpInputs(mlp_x, mlp_up, mlp_down), interpret=False), *args)
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "stablehlo.dot_general" not in text and "stablehlo.dynamic_slice" not in text
    assert f"tensor<{layers}x{hidden}x{2 * mlp_inter}xbf16>" in text  # the whole stack reaches the kernel


def lower_released_fp8_moe_for_cuda(tokens: int) -> str:
    """The fp8 expert kernels lowered for CUDA on `tokens` tokens and the released [5 blocks, ...] stacks."""
    cfg = Config.diffusiongemma_26b_a4b()
    k, experts, layers = cfg.top_k_experts, cfg.num_experts, 5
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    args = (
        jax.ShapeDtypeStruct((tokens, hidden), jnp.bfloat16),
        jax.ShapeDtypeStruct((tokens, k), jnp.float32),
        jax.ShapeDtypeStruct((tokens, k), jnp.int32),
        jax.ShapeDtypeStruct((layers, experts, hidden, 2 * inter), FP8),
        jax.ShapeDtypeStruct((layers, experts, inter, hidden), FP8),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((layers, experts, 2 * inter), jnp.float32),
        jax.ShapeDtypeStruct((layers, experts, hidden), jnp.float32),
    )
    return lower_for_cuda(lambda x, w, i, up, down, layer, s_up, s_down: experts_pallas(
        x, w, i, up, down, layer, gate_up_scale=s_up, down_scale=s_down, interpret=False), *args)


def test_fp8_moe_kernel_lowers_for_cuda_at_released_shapes():
    """e4m3 weight stacks and their scales go to the Triton kernels as they are (no converted copy)."""
    cfg = Config.diffusiongemma_26b_a4b()
    text = lower_released_fp8_moe_for_cuda(2 * cfg.canvas_length)
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "dynamic_slice" not in text
    assert f"{cfg.num_experts}x{cfg.hidden_size}x{2 * cfg.moe_intermediate_size}xbf16>" not in text


def released_fp8_offset_widths(monkeypatch, offsets_fn) -> dict[tuple[int, ...], set[str]]:
    """Lower the fp8 expert kernels at the released stack shapes for CUDA with `offsets_fn` as the Triton
    lowering's offset computation; returns the offset element types seen per ref shape."""
    from jax._src.pallas.triton import lowering

    seen: dict[tuple[int, ...], set[str]] = {}

    def spy(block_info, nd_indexer):
        offsets = offsets_fn(block_info, nd_indexer)
        seen.setdefault(tuple(block_info.full_shape_dtype.shape), set()).add(str(offsets.type))
        return offsets

    monkeypatch.setattr(lowering, "_compute_offsets_from_indices", spy)
    lower_released_fp8_moe_for_cuda(Config.diffusiongemma_26b_a4b().canvas_length)
    return seen


def test_fp8_stack_over_2_31_weights_gets_64bit_offsets(monkeypatch):
    """The released fp8 gate/up stack (2.54e9 one-byte weights, under 2**32 bytes) must be indexed with 64-bit
    offsets: JAX's own choice (32-bit below 2**32 bytes) wraps past 2**31 and faulted on an H100."""
    from diffjax.kernels import WIDE_OFFSETS

    assert WIDE_OFFSETS
    cfg = Config.diffusiongemma_26b_a4b()
    gate_up = (5, cfg.num_experts, cfg.hidden_size, 2 * cfg.moe_intermediate_size)
    down = (5, cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size)
    from jax._src.pallas.triton import lowering

    wrapper = lowering._compute_offsets_from_indices
    widths = released_fp8_offset_widths(monkeypatch, wrapper)
    assert all("i64" in t and "i32" not in t for t in widths[gate_up]), widths[gate_up]
    assert all("i32" in t for t in widths[down]), widths[down]  # 1.27e9 weights: 32-bit offsets suffice
    # Without the wrapper the lowering would pick 32-bit offsets for the gate/up stack: the check can fail.
    unwrapped = released_fp8_offset_widths(monkeypatch, wrapper.wrapped)
    assert all("i32" in t for t in unwrapped[gate_up]), unwrapped[gate_up]


def test_moe_kernel_rejects_bad_shapes():
    x, weights, ids, gate_up, down = moe_case(4, 4, 2, 32, 16, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="down must be"):
        experts_pallas(x, weights, ids, gate_up, down[:, :8])
    with pytest.raises(ValueError, match=r"weights .* and expert_ids"):
        experts_pallas(x, weights[:, :1], ids, gate_up, down)
    with pytest.raises(ValueError, match="multiple of 16"):
        experts_pallas(x[:, :24], weights, ids, gate_up[:, :24], down[..., :24])
    with pytest.raises(ValueError, match="block_rows"):
        experts_pallas(x, weights, ids, gate_up, down, tiles=MoeTiles(block_rows=24), interpret=True)


# ------------------------------------------------------------------------------------------- bench


def test_best_time_queues_calls_and_reports_the_time_per_call():
    """A sample is `calls` calls waited for once; the figure is per call (a per-sample figure would be 5x)."""
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.002)
        return jnp.zeros(())

    _, best = kernel_bench.best_time(fn, repeats=2, calls=5)
    assert len(calls) == 1 + 2 * 5
    assert 0.002 <= best < 0.008


def test_kernel_bench_refuses_non_positive_counts(capsys):
    for flag in ("--calls", "--repeats"):
        with pytest.raises(SystemExit):
            kernel_bench.main(["--tiny", flag, "0"])
        assert "must be positive" in capsys.readouterr().err


def test_kernel_bench_runs_tiny_and_records_failures(tmp_path, monkeypatch):
    def broken(*_args, **_kwargs):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr("diffjax.kernels.bench.experts_dense", broken)
    out = tmp_path / "k.json"
    assert kernel_bench.main([
        "--tiny", "--rows", "1", "--repeats", "1", "--sections", "moe", "sliding", "--moe-impls", "ragged_dot",
        "pallas_fp8", "pallas_pretiled", "pallas_mgpu", "pallas_mgpu_fp8", "pallas_mgpu_pretiled", "ragged_dot_mgpu",
        "dense", "--out", str(out),
    ]) == 0
    entries = json.loads(out.read_text())["entries"]
    by_impl = {e["impl"]: e for e in entries}
    assert by_impl["ragged_dot"]["ms"] > 0 and by_impl["ragged_dot"]["bytes"] > 0
    # fp8 experts read about half the bytes (the activations and scales are the rest).
    assert by_impl["pallas_fp8"]["ms"] > 0 and by_impl["pallas_fp8"]["bytes"] < 0.75 * by_impl["ragged_dot"]["bytes"]
    # The pretiled weights are the same bytes in another order.
    assert by_impl["pallas_pretiled"]["ms"] > 0 and by_impl["pallas_pretiled"]["bytes"] == by_impl["ragged_dot"]["bytes"]
    assert "kernel exploded" in by_impl["dense"]["error"]
    assert by_impl["ragged_dot"]["tflop_per_s"] == by_impl["ragged_dot"]["flops"] / by_impl["ragged_dot"]["ms"] / 1e9
    assert by_impl["attend"]["section"] == "sliding" and by_impl["sdpa_xla"]["ms"] > 0 and by_impl["pallas"]["ms"] > 0
    # The Mosaic GPU kernels: ours interpreted, JAX's example refused off a GPU.
    assert by_impl["pallas_mgpu"]["ms"] > 0 and by_impl["pallas_mgpu"]["bytes"] == by_impl["ragged_dot"]["bytes"]
    assert by_impl["pallas_mgpu_fp8"]["ms"] > 0 and by_impl["pallas_mgpu_fp8"]["bytes"] == by_impl["pallas_fp8"]["bytes"]
    assert by_impl["pallas_mgpu_pretiled"]["ms"] > 0
    if jax.default_backend() == "cpu":
        assert "cuDNN" in by_impl["sdpa_cudnn"]["error"]
        assert "interpret" in by_impl["ragged_dot_mgpu"]["error"]


def test_kernel_bench_times_the_mlp_in_and_beside_the_expert_kernels(tmp_path):
    """The `mlp` section: the MLP inside the expert launches against the expert kernels then the XLA MLP, on the
    same bytes and FLOPs, and the XLA MLP alone (less of both); `--sweep` tries `MLP_TILES`."""
    out = tmp_path / "mlp.json"
    assert kernel_bench.main(["--tiny", "--rows", "1", "--repeats", "1", "--sections", "mlp", "--out", str(out)]) == 0
    by_impl = {e["impl"]: e for e in json.loads(out.read_text())["entries"]}
    together, apart, alone = by_impl["pallas_with_mlp"], by_impl["pallas_then_xla_mlp"], by_impl["xla_mlp"]
    assert together["ms"] > 0 and apart["ms"] > 0 and alone["ms"] > 0
    assert (together["bytes"], together["flops"]) == (apart["bytes"], apart["flops"])
    assert alone["bytes"] < together["bytes"] and alone["flops"] == 2 * 16 * 3 * 64 * 48  # tiny: 16 tokens
    assert kernel_bench.main(["--tiny", "--sweep", "--rows", "1", "--repeats", "1", "--sections", "mlp", "--out",
                              str(out)]) == 0
    tried = [e["tiles"] for e in json.loads(out.read_text())["entries"]]
    assert len(tried) == 1 + len(kernel_bench.MLP_TILES) and tried[1]["mlp_block_n"] == 32


def _xla_flops(fn, *args) -> float:
    cost = jax.jit(fn).lower(*args).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_kernel_bench_flops_match_xla_cost_analysis():
    """The bench's FLOP counts against XLA's count of the twins: the dense experts on a pool as large as each
    token's pick (dense = routed work), and attention over a ring of keys. In float32, where XLA adds no
    conversions to its count."""
    shapes = dataclasses.replace(kernel_bench.Shapes.tiny(), hidden=512, moe_inter=256, experts=2, top_k=2,
                                 head_dim=128)
    tokens = 3 * shapes.canvas
    args = as_f32(*kernel_bench.random_moe_problem(shapes, tokens, seed=0))
    counted = kernel_bench.moe_flops(shapes, tokens)
    assert counted <= _xla_flops(experts_dense, *args) <= 1.03 * counted
    batch, context = 2, 40
    args = as_f32(*kernel_bench.random_attention_problem(shapes, batch, context, shapes.kv_heads, shapes.head_dim,
                                                         seed=0))
    counted = kernel_bench.attention_flops(shapes, batch, context + shapes.canvas, shapes.head_dim)
    assert counted <= _xla_flops(kernel_bench.concatenating(attend_padding_only), *args) <= 1.05 * counted


# ------------------------------------------------------------------------------------------- vocab


def vocab_case(lead: tuple[int, ...], width: int, vocab: int, dtype, seed: int):
    keys = jax.random.split(jax.random.key(seed), 2)
    hidden = jax.random.normal(keys[0], (*lead, width)).astype(dtype)
    embedding = (0.4 * jax.random.normal(keys[1], (vocab, width))).astype(dtype)
    return hidden, embedding


@pytest.mark.parametrize(
    ("lead", "width", "vocab", "softcap", "temperature", "splits", "dtype"),
    [
        ((2, 20), 32, 512, 30.0, 0.8, 2, jnp.float32),  # rows padded to the row block, two splits combined
        ((16,), 64, 256, None, 1.3, None, jnp.bfloat16),
        ((3, 5), 20, 150, 30.0, 0.9, None, jnp.float32),  # hidden and vocab padded, the vocabulary tail masked
        ((2, 8), 64, 14, 30.0, 0.6, None, jnp.float32),  # the demo model's 14-token vocabulary
    ],
)
def test_vocab_kernel_matches_twin(lead, width, vocab, softcap, temperature, splits, dtype):
    hidden, embedding = vocab_case(lead, width, vocab, dtype, seed=width)
    ours, ours_logits = vocab_stats_pallas(hidden, embedding, temperature, seed=5, softcap=softcap,
                                           return_logits=True, tiles=VocabTiles(splits=splits), interpret=True)
    twin, twin_logits = vocab_stats_reference(hidden, embedding, temperature, seed=5, softcap=softcap,
                                              return_logits=True)
    # The stored logits (self-conditioning's input) are the twin's, rounded to the hidden state's dtype.
    assert ours_logits.shape == (*lead, vocab) and ours_logits.dtype == dtype
    np.testing.assert_allclose(np.asarray(ours_logits, np.float32), np.asarray(twin_logits, np.float32),
                               rtol=1e-5 if dtype == jnp.float32 else 1e-2, atol=1e-5)
    # Statistics alone (no logits output) are the same numbers.
    alone = vocab_stats_pallas(hidden, embedding, temperature, seed=5, softcap=softcap,
                               tiles=VocabTiles(splits=splits), interpret=True)
    np.testing.assert_array_equal(np.asarray(alone.entropy), np.asarray(ours.entropy))
    for name in ("logsumexp", "entropy", "argmax_logprob", "sample_logprob"):
        expected = np.asarray(getattr(twin, name))
        assert getattr(ours, name).shape == lead and np.abs(expected).max() > 0.1
        np.testing.assert_allclose(np.asarray(getattr(ours, name)), expected, rtol=1e-5, atol=1e-5, err_msg=name)
    np.testing.assert_array_equal(np.asarray(ours.argmax), np.asarray(twin.argmax))
    np.testing.assert_array_equal(np.asarray(ours.sample), np.asarray(twin.sample))
    assert np.mean(np.asarray(ours.sample) != np.asarray(ours.argmax)) > 0.2  # samples are not just argmax


def test_vocab_kernel_samples_follow_softmax():
    """Chi-square test of 2048 draws of one distribution (every row the same hidden state) against softmax."""
    rows, width, vocab, temperature = 2048, 16, 64, 0.7
    hidden, embedding = vocab_case((1,), width, vocab, jnp.float32, seed=11)
    hidden = jnp.broadcast_to(hidden, (rows, width))
    stats = vocab_stats_pallas(hidden, embedding, temperature, seed=123, softcap=30.0, interpret=True)
    probs = np.asarray(jax.nn.softmax(tied_logits(hidden[0], embedding, 30.0) / temperature), np.float64)
    counts = np.bincount(np.asarray(stats.sample), minlength=vocab)
    expected = rows * probs
    # Pool the tokens expected fewer than 5 times into one bin, as the chi-square approximation needs.
    rare = expected < 5
    observed = np.append(counts[~rare], counts[rare].sum())
    expected = np.append(expected[~rare], expected[rare].sum())
    chi2 = float(np.sum((observed - expected) ** 2 / expected))
    dof = len(observed) - 1
    assert dof >= 10  # a spread-out distribution, not a near-deterministic one
    # Wilson-Hilferty upper 0.1% point of the chi-square distribution (z = 3.09).
    critical = dof * (1 - 2 / (9 * dof) + 3.09 * np.sqrt(2 / (9 * dof))) ** 3
    assert chi2 < critical, (chi2, critical)
    # The log-probability of each draw is the softmax's.
    np.testing.assert_allclose(np.exp(np.asarray(stats.sample_logprob)), probs[np.asarray(stats.sample)], rtol=1e-4)


@pytest.mark.parametrize("splits", [1, 4])
def test_vocab_kernel_argmax_ties_across_tiles_take_the_lower_id(splits):
    """Duplicate embedding rows in different vocabulary tiles give bitwise-equal top logits: the argmax is the
    lower token id, as jnp.argmax's. One split walks all four tiles in one program; four combine per-tile
    partials."""
    width, vocab = 32, 512  # four tiles of 128
    pairs = [(5, 300), (130, 511), (200, 260)]  # (lower, higher) token id, in different tiles
    _, embedding = vocab_case((1,), width, vocab, jnp.float32, seed=3)
    for low, high in pairs:
        embedding = embedding.at[low].multiply(3.0)  # long rows: each pair is its hidden state's clear top
        embedding = embedding.at[high].set(embedding[low])
    hidden = embedding[jnp.array([low for low, _ in pairs])]
    twin = vocab_stats_reference(hidden, embedding, 1.0, seed=0, softcap=30.0)
    logits = np.asarray(tied_logits(hidden, embedding, 30.0))
    for row, (low, high) in enumerate(pairs):
        assert logits[row, low] == logits[row, high] == logits[row].max()
    np.testing.assert_array_equal(np.argmax(logits, axis=-1), [low for low, _ in pairs])
    ours = vocab_stats_pallas(hidden, embedding, 1.0, seed=0, softcap=30.0,
                              tiles=VocabTiles(block_v=128, splits=splits), interpret=True)
    np.testing.assert_array_equal(np.asarray(ours.argmax), [low for low, _ in pairs])
    np.testing.assert_array_equal(np.asarray(twin.argmax), [low for low, _ in pairs])


def test_vocab_kernel_lowers_for_cuda_at_released_shapes():
    cfg = Config.diffusiongemma_26b_a4b()
    args = (
        jax.ShapeDtypeStruct((2, cfg.canvas_length, cfg.hidden_size), jnp.bfloat16),
        jax.ShapeDtypeStruct((cfg.vocab_size, cfg.hidden_size), jnp.bfloat16),
        jax.ShapeDtypeStruct((), jnp.float32),
        jax.ShapeDtypeStruct((), jnp.uint32),
    )
    for return_logits in (False, True):
        text = lower_for_cuda(
            lambda h, e, t, s: vocab_stats_pallas(
                h, e, t, seed=s, softcap=30.0, return_logits=return_logits, interpret=False  # noqa: B023
            ),
            *args,
        )
        assert text.count("__gpu$xla.gpu.triton") == 1
        # No float32 [rows..., vocab] array anywhere in the program (the twin has them); the logits for
        # self-conditioning leave the kernel once, in bf16.
        assert "x262144xf32>" not in text
        assert ("x262144xbf16>" in text) == return_logits
    twin = lower_for_cuda(lambda h, e, t, s: vocab_stats_reference(h, e, t, seed=s, softcap=30.0), *args)
    assert "x262144xf32>" in twin


def test_vocab_kernel_rejects_bad_shapes():
    hidden, embedding = vocab_case((4,), 32, 64, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="embedding must be"):
        vocab_stats_pallas(hidden, embedding[:, :16], 1.0, seed=0, softcap=None)
    with pytest.raises(ValueError, match="splits"):
        vocab_stats_pallas(hidden, embedding, 1.0, seed=0, softcap=None, tiles=VocabTiles(splits=3))
    with pytest.raises(ValueError, match="block_v"):
        vocab_stats_pallas(hidden, embedding, 1.0, seed=0, softcap=None, tiles=VocabTiles(block_v=48))


# --------------------------------------------------------------------------------------- attention


def attention_case(batch: int, q_len: int, heads: int, kv_heads: int, head_dim: int, length: int, dtype, seed: int):
    keys = jax.random.split(jax.random.key(seed), 3)
    query = jax.random.normal(keys[0], (batch, q_len, heads, head_dim)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim)).astype(dtype)
    v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim)).astype(dtype)
    return query, k, v


@pytest.mark.parametrize(
    ("batch", "q_len", "heads", "kv_heads", "head_dim", "length", "splits", "dtype"),
    [
        (2, 16, 4, 2, 32, 45, 3, jnp.float32),  # a partial last key tile, three splits combined
        (1, 8, 8, 2, 64, 72, None, jnp.bfloat16),
    ],
)
def test_attention_kernel_matches_attend(batch, q_len, heads, kv_heads, head_dim, length, splits, dtype):
    query, k, v = attention_case(batch, q_len, heads, kv_heads, head_dim, length, dtype, seed=length)
    # Left padding of different lengths per row (the cache of a batch of prompts), plus a padded tail.
    valid = (jnp.arange(length)[None, :] >= jnp.arange(batch)[:, None] * 7) & (jnp.arange(length) < length - 3)
    ours = global_attention_pallas(query, k, v, valid, tiles=AttentionTiles(16, 16, splits), interpret=True)
    assert ours.shape == (batch, q_len, heads * head_dim) and ours.dtype == dtype
    _close(ours, attend_padding_only(*as_f32(query, k, v), valid), dtype)


@pytest.mark.parametrize(
    ("q_len", "heads", "kv_heads", "pack", "block_q", "new", "splits", "dtype"),
    [
        (16, 8, 2, 2, 32, 21, 3, jnp.float32),  # 2 of a kv head's 4 query heads a program, 16 tokens of each
        (16, 8, 2, 4, 64, 0, 2, jnp.float32),  # the whole group in one program, one key source
        (37, 8, 1, 8, 64, 24, None, jnp.bfloat16),  # 8 tokens of each of 8 heads; rows not a multiple of 8
        (12, 4, 2, 2, 32, 16, 1, jnp.float32),  # one split: no combine, the packed block written as is
    ],
)
def test_attention_kernel_packing_a_kv_heads_queries_matches_attend(q_len, heads, kv_heads, pack, block_q, new,
                                                                     splits, dtype):
    """`AttentionTiles.pack_heads`: a program's rows are several query heads of one kv head (reading its keys
    once for all of them), which changes the programs, not the answer."""
    query, k, v = attention_case(2, q_len, heads, kv_heads, 32, 45, dtype, seed=q_len + pack)
    valid = (jnp.arange(45)[None, :] >= jnp.array([[0], [7]])) & (jnp.arange(45) < 43)
    tiles = AttentionTiles(block_q, 16, splits, pack_heads=pack)
    if new:
        _, new_k, new_v = attention_case(2, 1, heads, kv_heads, 32, new, dtype, seed=new)
        ours = global_attention_pallas(query, k, v, valid, new_k, new_v, tiles=tiles, interpret=True)
        k, v = jnp.concatenate([k, new_k], 1), jnp.concatenate([v, new_v], 1)
        valid = jnp.concatenate([valid, jnp.ones((2, new), bool)], axis=1)
    else:
        ours = global_attention_pallas(query, k, v, valid, tiles=tiles, interpret=True)
    assert ours.shape == (2, q_len, heads * 32) and ours.dtype == dtype
    _close(ours, attend_padding_only(*as_f32(query, k, v), valid), dtype)


def test_attention_kernel_refuses_a_head_pack_that_does_not_divide_the_group():
    query, k, v = attention_case(1, 16, 8, 2, 32, 20, jnp.float32, seed=0)
    valid = jnp.ones((1, 20), bool)
    for pack, match in (
        (3, r"pack_heads must be a power of two dividing block_q \(32\), got 3"),  # whatever the shapes
        (8, r"pack_heads must be a power of two dividing the query heads per kv head \(4\) and block_q \(32\), got 8"),
    ):
        with pytest.raises(ValueError, match=match):
            global_attention_pallas(query, k, v, valid, tiles=AttentionTiles(32, 16, pack_heads=pack),
                                    interpret=True)


@pytest.mark.parametrize(
    ("length", "new", "splits", "dtype"),
    [
        (45, 21, 3, jnp.float32),  # partial last tiles in both sources, three splits each
        (72, 16, None, jnp.bfloat16),  # splits chosen per source
        (9, 24, 2, jnp.float32),  # a first source under one key tile: joined to the second
        (40, 5, None, jnp.float32),  # a second source under one key tile: joined to the first
    ],
)
def test_attention_kernel_with_new_keys_matches_attend_over_the_concatenation(length, new, splits, dtype):
    """The canvas's own keys as a second source (every row sees them) equal `attend` over `keys ++ new`."""
    query, k, v = attention_case(2, 16, 4, 2, 32, length, dtype, seed=length)
    _, new_k, new_v = attention_case(2, 1, 4, 2, 32, new, dtype, seed=new + 100)
    valid = (jnp.arange(length)[None, :] >= jnp.array([[0], [7]])) & (jnp.arange(length) < length - 2)
    ours = global_attention_pallas(query, k, v, valid, new_k, new_v, tiles=AttentionTiles(16, 16, splits),
                                   interpret=True)
    assert ours.shape == (2, 16, 4 * 32) and ours.dtype == dtype
    all_valid = jnp.concatenate([valid, jnp.ones((2, new), bool)], axis=1)
    twin = attend_padding_only(*as_f32(query, jnp.concatenate([k, new_k], 1), jnp.concatenate([v, new_v], 1)),
                               all_valid)
    _close(ours, twin, dtype)
    # The new keys count: dropping them changes the answer.
    assert float(jnp.max(jnp.abs(ours.astype(jnp.float32) - attend_padding_only(*as_f32(query, k, v), valid)))) > 0.05


@pytest.mark.parametrize(("length", "new", "dtype"), [(45, 21, jnp.float32), (40, None, jnp.bfloat16),
                                                    (9, 24, jnp.float32)])  # 9: joined to the new keys
def test_attention_kernel_reads_one_layer_of_a_stack_in_place(length, new, dtype):
    """With a layer index, keys/values are `[layers, batch, k, ...]` stacks (the decoder's cache) and the
    kernel reads that layer's: the same as attending to the slice, under jit with a traced index too."""
    query, _, _ = attention_case(2, 16, 4, 2, 32, length, dtype, seed=length)
    stacks = [attention_case(2, 1, 4, 2, 32, length, dtype, seed=200 + i)[1:] for i in range(3)]
    k_stack, v_stack = (jnp.stack([s[j] for s in stacks]) for j in (0, 1))
    new_kv = (None, None) if new is None else attention_case(2, 1, 4, 2, 32, new, dtype, seed=300)[1:]
    valid = (jnp.arange(length)[None, :] >= jnp.array([[0], [5]]))
    kernel = jax.jit(functools.partial(global_attention_pallas, tiles=AttentionTiles(16, 16, 2), interpret=True))
    outputs = []
    for layer in range(3):
        ours = kernel(query, k_stack, v_stack, valid, *new_kv, jnp.int32(layer))
        _close(ours, global_attention_pallas(query, k_stack[layer], v_stack[layer], valid, *new_kv,
                                             tiles=AttentionTiles(16, 16, 2), interpret=True), dtype)
        outputs.append(ours.astype(jnp.float32))
    # Each layer's keys give another answer: the index is not ignored.
    assert float(jnp.max(jnp.abs(outputs[0] - outputs[2]))) > 0.05
    with pytest.raises(ValueError, match=r"a \[layers, batch, k, kv_heads, head_dim\] stack"):
        global_attention_pallas(query, k_stack[0], v_stack[0], valid, layer=1)


def test_attention_kernel_on_a_stack_differentiates_into_its_layer():
    query, _, _ = attention_case(2, 8, 4, 2, 32, 40, jnp.float32, seed=5)
    k_stack, v_stack = (jax.random.normal(jax.random.key(i), (3, 2, 40, 2, 32)) for i in (6, 7))
    _, new_k, new_v = attention_case(2, 1, 4, 2, 32, 16, jnp.float32, seed=8)
    valid = jnp.arange(40)[None, :] >= jnp.array([[0], [11]])
    kernel = functools.partial(global_attention_pallas, tiles=AttentionTiles(16, 16, 2), interpret=True)

    def loss(q, k, v, nk, nv):
        return jnp.sum(kernel(q, k, v, valid, nk, nv, 1) ** 2)

    def twin_loss(q, k, v, nk, nv):
        return jnp.sum(kernel(q, k[1], v[1], valid, nk, nv) ** 2)

    ours = jax.grad(loss, argnums=(0, 1, 2, 3, 4))(query, k_stack, v_stack, new_k, new_v)
    twin = jax.grad(twin_loss, argnums=(0, 1, 2, 3, 4))(query, k_stack, v_stack, new_k, new_v)
    for got, want in zip(ours, twin, strict=True):
        _close(got, want, jnp.float32, scale=5)
    assert float(jnp.max(jnp.abs(ours[1][1]))) > 0 and not jnp.any(ours[1][0]) and not jnp.any(ours[2][2])


def test_attention_splits_are_shared_out_by_key_tiles():
    """Without explicit splits, two sources share the one-source split count by key tiles, at least one each
    (released shapes: a 1023-slot ring and 256 canvas keys at batch 1 get 3 + 1; batch 8 fills the GPU with one
    split per source)."""
    from diffjax.kernels.attention import _key_ranges

    def cut(lengths, programs, splits=None):
        return [(r.splits, r.tiles_per_split) for r in _key_ranges(lengths, AttentionTiles(splits=splits), programs)]

    assert cut([1279], 64) == [(4, 10)]
    assert cut([1023, 256], 64) == [(3, 11), (1, 8)]
    assert cut([32768, 256], 64) == [(3, 342), (1, 8)]
    assert cut([1023, 256], 512) == [(1, 32), (1, 8)]
    assert cut([100, 300], 66) == [(1, 4), (3, 4)]  # the larger source gets the larger share, whichever it is
    assert cut([1023, 256], 64, splits=2) == [(2, 16), (2, 4)]  # explicit: per source


def test_attention_kernel_with_new_keys_differentiates_through_attend():
    query, keys, values = attention_case(2, 8, 4, 2, 32, 40, jnp.float32, seed=3)
    _, new_k, new_v = attention_case(2, 1, 4, 2, 32, 16, jnp.float32, seed=4)
    valid = jnp.arange(40)[None, :] >= jnp.array([[0], [40]])  # row 1: only the new keys are visible
    kernel = functools.partial(global_attention_pallas, tiles=AttentionTiles(16, 16, 2), interpret=True)

    def loss(forward, *args):
        return jnp.sum(forward(args[0], args[1], args[2], valid, args[3], args[4]) ** 2)

    def concatenated(q, k, v, valid, nk, nv):
        all_valid = jnp.concatenate([valid, jnp.ones(nk.shape[:2], bool)], axis=1)
        return attend_padding_only(q, jnp.concatenate([k, nk], 1), jnp.concatenate([v, nv], 1), all_valid)

    args = (query, keys, values, new_k, new_v)
    ours = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3, 4))(*args)
    twin = jax.grad(functools.partial(loss, concatenated), argnums=(0, 1, 2, 3, 4))(*args)
    for got, want in zip(ours, twin, strict=True):
        _close(got, want, jnp.float32, scale=5)


def test_attention_kernel_differentiates_through_attend():
    """`jax.grad` through the split-K kernel (its backward is `attend`'s): the gradients of `attend` with the
    padding mask, a fully padded row included."""
    query, keys, values = attention_case(3, 8, 4, 2, 32, 40, jnp.float32, seed=7)
    valid = (jnp.arange(40)[None, :] >= jnp.array([[0], [9], [40]]))  # row 2: all padding

    def loss(forward, q, k, v):
        return jnp.sum(forward(q, k, v, valid) ** 2)

    kernel = functools.partial(global_attention_pallas, tiles=AttentionTiles(16, 16, 2), interpret=True)
    ours = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2))(query, keys, values)
    twin = jax.grad(functools.partial(loss, attend_padding_only), argnums=(0, 1, 2))(query, keys, values)
    for got, want in zip(ours, twin, strict=True):
        _close(got, want, jnp.float32, scale=5)


def attention_inputs_case(batch, n, heads, kv_heads, head_dim, fused, dtype, seed):
    """Projections holding q, k and v (one fused array with v's columns, or three arrays with k at an offset),
    scales around 1, positions past 1000 (RoPE angles of many turns)."""
    keys = jax.random.split(jax.random.key(seed), 5)
    if fused:
        projections = 3 * jax.random.normal(keys[0], (batch, n, (heads + 2 * kv_heads) * head_dim))
        sources, offsets = (projections,) * 3, (0, heads * head_dim, (heads + kv_heads) * head_dim)
    else:
        widths = (heads * head_dim, (kv_heads + 2) * head_dim, kv_heads * head_dim)
        sources = tuple(3 * jax.random.normal(k, (batch, n, w)) for k, w in zip(keys[:3], widths, strict=True))
        offsets = (0, 2 * head_dim, 0)
    scales = tuple(1 + 0.3 * jax.random.normal(k, (head_dim,)) for k in keys[3:])
    sources = tuple(source.astype(dtype) for source in sources)
    return sources, offsets, (*(scale.astype(dtype) for scale in scales), 1000 + jnp.arange(n, dtype=jnp.int32))


@pytest.mark.parametrize(
    ("batch", "n", "heads", "kv_heads", "head_dim", "fused", "dtype"),
    [
        (2, 11, 4, 2, 32, True, jnp.float32),  # a partial token block
        (1, 20, 4, 1, 24, False, jnp.float32),  # half-heads of 12: a masked, wider block
        (2, 32, 8, 2, 64, True, jnp.bfloat16),
    ],
)
def test_attention_inputs_kernel_matches_its_twin(batch, n, heads, kv_heads, head_dim, fused, dtype):
    sources, offsets, (q_scale, k_scale, positions) = attention_inputs_case(batch, n, heads, kv_heads, head_dim,
                                                                            fused, dtype, seed=n)
    for rope_type in ("default", "proportional"):  # proportional: the last pairs are not rotated
        inv_freq = rope_inverse_frequencies(AttentionConfig(head_dim=head_dim, num_kv_heads=kv_heads,
                                                            rope_theta=1e4, rope_type=rope_type,
                                                            partial_rotary_factor=0.5))
        args = (sources, offsets, heads, kv_heads, q_scale, k_scale, positions, inv_freq, 1e-6)
        ours = attention_inputs_pallas(*args, interpret=True)
        # The twin in the same dtype: bf16 RoPE rounds cos, sin and the normed inputs as transformers does.
        twin = attention_inputs(*args)
        for got, want, count in zip(ours, twin, (heads, kv_heads, kv_heads), strict=True):
            assert got.shape == (batch, n, count, head_dim) and got.dtype == dtype
            _close(got, want, dtype)
    # v is normed without a scale and not rotated: its rows have unit mean square.
    np.testing.assert_allclose(np.mean(np.square(np.asarray(ours[2], np.float32)), axis=-1), 1.0,
                               rtol=2e-5 if dtype == jnp.float32 else 2e-2)


def test_attention_inputs_kernel_differentiates_through_its_twin():
    sources, offsets, (q_scale, k_scale, positions) = attention_inputs_case(2, 8, 4, 2, 32, True, jnp.float32, 3)
    inv_freq = 1.0 / (1e4 ** (jnp.arange(0, 32, 2) / 32))
    weights = [jax.random.normal(jax.random.key(i), shape) for i, shape in
               enumerate([(2, 8, 4, 32), (2, 8, 2, 32), (2, 8, 2, 32)])]

    def loss(make, projections, q_scale, k_scale):
        outputs = make((projections,) * 3, offsets, 4, 2, q_scale, k_scale, positions, inv_freq, 1e-6)
        return sum(jnp.sum(w * out) for w, out in zip(weights, outputs, strict=True))

    kernel = functools.partial(attention_inputs_pallas, interpret=True)
    ours = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2))(sources[0], q_scale, k_scale)
    twin = jax.grad(functools.partial(loss, attention_inputs), argnums=(0, 1, 2))(sources[0], q_scale, k_scale)
    for got, want in zip(ours, twin, strict=True):
        _close(got, want, jnp.float32, scale=5)


def test_attention_inputs_kernel_rejects_bad_shapes():
    sources, offsets, (q_scale, k_scale, positions) = attention_inputs_case(1, 8, 4, 2, 32, True, jnp.float32, 0)
    inv_freq = jnp.ones((16,))
    with pytest.raises(ValueError, match="must hold 2 heads of 32 from column 224"):
        attention_inputs_pallas(sources, (0, 128, 224), 4, 2, q_scale, k_scale, positions, inv_freq, 1e-6)
    with pytest.raises(ValueError, match="a multiple of head_dim"):
        attention_inputs_pallas(sources, (0, 130, 192), 4, 2, q_scale, k_scale, positions, inv_freq, 1e-6)
    with pytest.raises(ValueError, match=r"positions must be \[n=8\]"):
        attention_inputs_pallas(sources, offsets, 4, 2, q_scale, k_scale, positions[:5], inv_freq, 1e-6)
    with pytest.raises(ValueError, match="inv_freq"):
        attention_inputs_pallas(sources, offsets, 4, 2, q_scale, k_scale, positions, inv_freq[:8], 1e-6)


def test_attention_kernel_takes_fewer_keys_than_one_tile():
    """A tiny model's decoder: a 4-slot ring and a 9-row canvas, 13 keys in all, under one 16-key tile."""
    query, k, v = attention_case(2, 9, 4, 2, 16, 4, jnp.float32, seed=11)
    _, new_k, new_v = attention_case(2, 1, 4, 2, 16, 9, jnp.float32, seed=12)
    valid = jnp.array([[True] * 4, [False, True, True, True]])
    ours = global_attention_pallas(query, k, v, valid, new_k, new_v, tiles=AttentionTiles(16, 16), interpret=True)
    twin = attend_padding_only(query, jnp.concatenate([k, new_k], 1), jnp.concatenate([v, new_v], 1),
                               jnp.concatenate([valid, jnp.ones((2, 9), bool)], 1))
    _close(ours, twin, jnp.float32)


def test_attention_kernel_gives_zeros_for_all_padding_rows():
    query, k, v = attention_case(2, 16, 4, 2, 32, 40, jnp.float32, seed=1)
    valid = jnp.zeros((2, 40), bool).at[0, 5:].set(True)
    ours = global_attention_pallas(query, k, v, valid, tiles=AttentionTiles(16, 16, 2), interpret=True)
    np.testing.assert_array_equal(np.asarray(ours[1]), 0.0)
    _close(ours[0], attend_padding_only(query, k, v, valid)[0], jnp.float32)


def test_generate_with_fused_statistics_lowers_for_cuda(kernels_compiled):
    """The whole generation loop with the fused vocabulary pass lowers to one Triton call per step, and no XLA
    matmul produces float32 `[batch, canvas, vocab]` logits (the logits path's LM head does). The
    self-conditioning softmax of the stored bf16 logits stays in XLA (a fused reduction + elementwise pass)."""
    config = Config.tiny(num_layers=2, layer_types=("sliding_attention", "full_attention"), vocab_size=1024)
    params = param_shapes(config, jnp.bfloat16)
    ids = np.arange(3, 11)[None].repeat(2, 0)
    lm_head_f32 = re.compile(rf"dot_general[^\n]*-> tensor<2x{config.canvas_length}x{config.vocab_size}xf32>")
    texts = {
        statistics: lower_for_cuda(
            lambda p: generate(p, config, ids, key=jax.random.key(0), statistics=statistics),  # noqa: B023
            params,
        )
        for statistics in ("logits", "pallas")
    }
    assert texts["pallas"].count("__gpu$xla.gpu.triton") == 1
    assert lm_head_f32.search(texts["logits"]) and not lm_head_f32.search(texts["pallas"])


def test_kernel_tiles_in_the_config_reach_every_kernel(kernels_compiled):
    """`Config.kernel_tiles` (as `diffjax bench --tiles` parses it) reaches each kernel of the generation loop:
    lowered for CUDA, each Triton launch takes the warps set for its kernel (the sliding and global layers'
    split-K launches each their own), and the kernels given no tiles keep their defaults."""
    from diffjax.config import FULL, SLIDING, KernelTiles
    from diffjax.kernels import codegen

    config = Config.tiny(num_layers=2, layer_types=(SLIDING, FULL), vocab_size=1024).replace(
        moe_implementation="pallas", sliding_attention_implementation="pallas",
        global_attention_implementation="pallas", routing_implementation="pallas")
    ids = np.arange(3, 11)[None].repeat(2, 0)

    def launches(config: Config) -> dict[str, set[tuple[int, tuple[int, int, int]]]]:
        lowered = jax.jit(lambda p: generate(p, config, ids, key=jax.random.key(0), statistics="pallas")).trace(
            param_shapes(config, jnp.bfloat16)).lower(lowering_platforms=("cuda",))
        found: dict[str, set] = {}
        for kernel in codegen.triton_kernels(lowered):
            found.setdefault(kernel.name, set()).add((kernel.num_warps, kernel.grid))
        return found

    default = launches(config)
    tuned = launches(config.replace(kernel_tiles=KernelTiles.parse(
        "experts.num_warps=2,routing.num_warps=2,sliding_attention.num_warps=2,global_attention.num_warps=1,"
        "vocab.num_warps=2")))
    assert {name: {w for w, _ in found} for name, found in default.items()} == {
        "attention_inputs": {4}, "route": {4}, "expert_rows": {4}, "moe_gate_up": {4}, "moe_down": {4},
        "global_attention_split_k": {8}, "global_attention_combine": {4}, "vocab_stats": {4}}
    for name in ("route", "moe_gate_up", "moe_down", "vocab_stats"):
        assert {w for w, _ in tuned[name]} == {2}, name
    for name in ("attention_inputs", "expert_rows", "global_attention_combine"):
        assert tuned[name] == default[name], name
    # Same grids; the two layer types' split-K launches told apart by them.
    assert {grid for _, grid in tuned["global_attention_split_k"]} == {
        grid for _, grid in default["global_attention_split_k"]}
    assert {w for w, _ in tuned["global_attention_split_k"]} == {1, 2}


@pytest.mark.parametrize(("moe", "quantization", "routing"), [
    ("pallas", "none", "xla"), ("pallas", "fp8", "pallas"), ("pallas_mgpu", "fp8", "xla"),
    ("pallas_mgpu", "none", "pallas")])
def test_released_generate_with_every_kernel_lowers_for_cuda(kernels_compiled, moe, quantization, routing):
    """The whole released-shape generation loop as the GPU runs it (Pallas experts, Triton or Mosaic GPU, bf16
    or fp8, the routing kernels and the fused vocabulary pass) lowers for CUDA: a kernel or shape that Triton
    or Mosaic GPU rejects fails here, not on the GPU."""
    config = Config.diffusiongemma_26b_a4b().replace(moe_implementation=moe, expert_quantization=quantization,
                                                     routing_implementation=routing)
    ids = np.arange(3, 1027)[None].repeat(2, 0)
    text = lower_for_cuda(
        lambda p: generate(p, config, ids, key=jax.random.key(0), statistics="pallas"),
        param_shapes(config, jnp.bfloat16),
    )
    # Experts gate/up + down in the encoder and in the decoder (one scan body each), and the vocabulary pass;
    # with the routing kernels, the router's top-k in each, and the Triton experts' layout in each.
    mosaic, triton = text.count("@mosaic_gpu_v2("), text.count("__gpu$xla.gpu.triton")
    routing_kernels = 0 if routing == "xla" else (2 if moe == "pallas_mgpu" else 4)
    assert (mosaic, triton) == ((4, 1 + routing_kernels) if moe == "pallas_mgpu" else (0, 5 + routing_kernels))


def test_attention_kernel_lowers_for_cuda_at_released_shapes():
    cfg = Config.diffusiongemma_26b_a4b()
    query, k, v = (jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in (
        (2, cfg.canvas_length, cfg.num_heads, cfg.full.head_dim),
        (2, 1024 + cfg.canvas_length, cfg.full.num_kv_heads, cfg.full.head_dim),
        (2, 1024 + cfg.canvas_length, cfg.full.num_kv_heads, cfg.full.head_dim),
    ))
    valid = jax.ShapeDtypeStruct((2, 1024 + cfg.canvas_length), jnp.bool_)
    text = lower_for_cuda(lambda *a: global_attention_pallas(*a, interpret=False), query, k, v, valid)
    assert text.count("__gpu$xla.gpu.triton") == 2  # the split-K pass and the combine of its splits
    assert "stablehlo.transpose" not in text  # the query is read in place, the output written in place
    # The decoder's form: the cache and the canvas's keys as two sources of one launch, never concatenated.
    cache_k = jax.ShapeDtypeStruct((2, 1024, cfg.full.num_kv_heads, cfg.full.head_dim), jnp.bfloat16)
    canvas_k = jax.ShapeDtypeStruct((2, cfg.canvas_length, cfg.full.num_kv_heads, cfg.full.head_dim), jnp.bfloat16)
    text = lower_for_cuda(lambda q, k, v, valid, nk, nv: global_attention_pallas(q, k, v, valid, nk, nv,
                                                                                interpret=False),
                          query, cache_k, cache_k, jax.ShapeDtypeStruct((2, 1024), jnp.bool_), canvas_k, canvas_k)
    assert text.count("__gpu$xla.gpu.triton") == 2
    assert "tensor<2x1280x" not in text
    # The decoder's inputs kernel at the released shapes, both layer types.
    for attention, widths in ((cfg.full, 2), (cfg.sliding, 3)):
        columns = (cfg.num_heads + (widths - 1) * attention.num_kv_heads) * attention.head_dim
        offsets = (0, cfg.num_heads * attention.head_dim, cfg.num_heads * attention.head_dim
                   + (widths - 2) * attention.num_kv_heads * attention.head_dim)
        projections = jax.ShapeDtypeStruct((2, cfg.canvas_length, columns), jnp.bfloat16)
        scale = jax.ShapeDtypeStruct((attention.head_dim,), jnp.bfloat16)
        text = lower_for_cuda(
            lambda p, qs, ks, attention=attention, offsets=offsets: attention_inputs_pallas(
                (p,) * 3, offsets, cfg.num_heads, attention.num_kv_heads, qs, ks,
                jnp.arange(cfg.canvas_length, dtype=jnp.int32), rope_inverse_frequencies(attention), 1e-6,
                interpret=False),
            projections, scale, scale)
        assert text.count("__gpu$xla.gpu.triton") == 1


def test_attention_kernel_rejects_bad_shapes():
    query, k, v = attention_case(1, 4, 4, 2, 32, 20, jnp.float32, seed=0)
    valid = jnp.ones((1, 20), bool)
    with pytest.raises(ValueError, match="values"):
        global_attention_pallas(query, k, v[:, :10], valid)
    with pytest.raises(ValueError, match="valid must be"):
        global_attention_pallas(query, k, v, valid[:, :10])
    with pytest.raises(ValueError, match="must divide the query heads"):
        global_attention_pallas(query[:, :, :3], k, v, valid)
    with pytest.raises(ValueError, match="block_k"):
        global_attention_pallas(query, k, v, valid, tiles=AttentionTiles(block_k=24))
    with pytest.raises(ValueError, match="go together"):
        global_attention_pallas(query, k, v, valid, k)
    with pytest.raises(ValueError, match="new_keys must be"):
        global_attention_pallas(query, k, v, valid, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="new_values"):
        global_attention_pallas(query, k, v, valid, k, v[:, :10])


def test_decoder_global_layers_select_the_kernel():
    """`global_attention_implementation="pallas"` changes only the decoder's global layers, not the maths."""
    config = Config.tiny(num_layers=1, layer_types=("full_attention",))
    params = init_params(config, jax.random.key(1))
    prompt = jax.random.randint(jax.random.key(2), (2, 8), 3, config.vocab_size)
    attention_mask = jnp.ones((2, 8), bool).at[1, :3].set(False)  # left padding in one row
    cache = encode(params, config, prompt, attention_mask, capacity=12)  # the encoder never uses the kernel
    canvas = jax.random.randint(jax.random.key(3), (2, config.canvas_length), 3, config.vocab_size)
    logits = {
        impl: denoise_logits(params, config.replace(global_attention_implementation=impl), cache, canvas)
        for impl in ("xla", "pallas")
    }
    _close(logits["pallas"], logits["xla"], jnp.float32, scale=5)
    with pytest.raises(ValueError, match="global_attention_implementation"):
        config.replace(global_attention_implementation="cudnn")


def test_decoder_sliding_layers_through_cudnn():
    """`sliding_attention_implementation="cudnn"` touches only the decoder's sliding layers (the encoder keeps
    `attend`): equal logits in bf16 on a GPU; elsewhere a clear error instead of an XLA failure."""
    config = Config.tiny(sliding=AttentionConfig(head_dim=64, num_kv_heads=2, rope_theta=10_000.0))
    cudnn = config.replace(sliding_attention_implementation="cudnn")
    # The init trace (float32, a few dummy tokens) keeps `attend` whatever the implementation fields say.
    params = init_params(cudnn.replace(global_attention_implementation="pallas"), jax.random.key(1), jnp.bfloat16)
    prompt = jax.random.randint(jax.random.key(2), (3, 20), 3, config.vocab_size)  # longer than the window
    attention_mask = jnp.ones((3, 20), bool).at[1, :5].set(False).at[2, :17].set(False)
    cache = encode(params, cudnn, prompt, attention_mask, capacity=20 + config.canvas_length)
    reference_cache = encode(params, config, prompt, attention_mask, capacity=20 + config.canvas_length)
    assert all(jnp.array_equal(a, b) for a, b in zip(jax.tree.leaves(cache), jax.tree.leaves(reference_cache), strict=True))
    canvas = jax.random.randint(jax.random.key(3), (3, config.canvas_length), 3, config.vocab_size)
    if jax.default_backend() == "gpu":
        _close(denoise_logits(params, cudnn, cache, canvas), denoise_logits(params, config, cache, canvas),
               jnp.bfloat16, scale=5)
    else:
        with pytest.raises(ValueError, match="needs an NVIDIA GPU backend"):
            denoise_logits(params, cudnn, cache, canvas)
    with pytest.raises(ValueError, match="sliding_attention_implementation"):
        config.replace(sliding_attention_implementation="flash")


@pytest.mark.parametrize("window", [8, 20])  # a ring of 7 keys joins the canvas's; one of 19 is a source of its own
def test_decoder_sliding_layers_through_the_split_k_kernel(window):
    """`sliding_attention_implementation="pallas"`: the sliding layers' canvas over the ring (prompt longer
    than the window, left padding, batch 3) through the split-K kernel, same logits as `attend` (float32)."""
    config = Config.tiny(num_layers=2, layer_types=("sliding_attention", "sliding_attention"), sliding_window=window)
    split_k = config.replace(sliding_attention_implementation="pallas")
    params = init_params(split_k, jax.random.key(5))
    prompt = jax.random.randint(jax.random.key(6), (3, 27), 3, config.vocab_size)
    assert prompt.shape[1] > config.sliding_window
    attention_mask = jnp.ones((3, 27), bool).at[1, :4].set(False).at[2, :24].set(False)
    cache = encode(params, split_k, prompt, attention_mask, capacity=27 + config.canvas_length)
    canvas = jax.random.randint(jax.random.key(7), (3, config.canvas_length), 3, config.vocab_size)
    ours = denoise_logits(params, split_k, cache, canvas)
    reference = denoise_logits(params, config, cache, canvas)
    assert float(jnp.std(reference)) > 0.1
    _close(ours, reference, jnp.float32, scale=5)


@pytest.mark.parametrize("scan_unroll", [1, 3])
def test_decoder_attention_kernels_read_each_blocks_cache_in_place(scan_unroll):
    """Three blocks of (sliding, full) layers with both attention kernels: each layer reads its block's keys
    from the cache's `[blocks, ...]` stacks at the block index (looped and unrolled), and the logits equal
    `attend`'s over the sliced cache (float32; ring shorter than the prompt, left padding, batch 2)."""
    config = Config.tiny(num_layers=6, layer_types=("sliding_attention", "full_attention") * 3, sliding_window=20,
                         scan_unroll=scan_unroll)
    kernels = config.replace(sliding_attention_implementation="pallas", global_attention_implementation="pallas")
    params = init_params(config, jax.random.key(8))
    prompt = jax.random.randint(jax.random.key(9), (2, 27), 3, config.vocab_size)
    attention_mask = jnp.ones((2, 27), bool).at[1, :6].set(False)
    cache = encode(params, config, prompt, attention_mask, capacity=27 + config.canvas_length)
    assert cache.keys["layer_0"].shape[0] == 3
    canvas = jax.random.randint(jax.random.key(10), (2, config.canvas_length), 3, config.vocab_size)
    reference = denoise_logits(params, config, cache, canvas)
    assert float(jnp.std(reference)) > 0.1
    _close(denoise_logits(params, kernels, cache, canvas), reference, jnp.float32, scale=5)
    # Every block's cache counts: changing the last block's keys changes the kernels' answer.
    changed = cache.replace(keys={**cache.keys, "layer_1": cache.keys["layer_1"].at[2].multiply(-1.0)})
    assert float(jnp.max(jnp.abs(denoise_logits(params, kernels, changed, canvas) - reference))) > 1e-3


def test_kernel_tiles_change_how_the_decoder_splits_its_work_not_its_logits():
    """Every kernel of the decoder under other tiles than its defaults (`Config.kernel_tiles`: smaller blocks,
    packed query heads, three key splits, XLA's router scores, row tiles first) gives the plain model's logits
    (float32; prompt longer than the window, left padding, batch 2)."""
    from diffjax.config import KernelTiles

    config = Config.tiny(num_layers=2, layer_types=("sliding_attention", "full_attention"), sliding_window=12)
    kernels = config.replace(moe_implementation="pallas", routing_implementation="pallas",
                             sliding_attention_implementation="pallas", global_attention_implementation="pallas")
    tuned = kernels.replace(kernel_tiles=KernelTiles.parse(
        "sliding_attention.block_q=16,sliding_attention.block_k=16,sliding_attention.pack_heads=2,"
        "global_attention.splits=3,routing.block_tokens=16,routing.project=false,experts.block_rows=16,"
        "experts.column_tiles_first=false"))
    params = init_params(config, jax.random.key(11))
    prompt = jax.random.randint(jax.random.key(12), (2, 21), 3, config.vocab_size)
    cache = encode(params, config, prompt, jnp.ones((2, 21), bool).at[0, :4].set(False),
                   capacity=21 + config.canvas_length)
    canvas = jax.random.randint(jax.random.key(13), (2, config.canvas_length), 3, config.vocab_size)
    reference = denoise_logits(params, config, cache, canvas)
    assert float(jnp.std(reference)) > 0.1
    for cfg in (kernels, tuned):
        _close(denoise_logits(params, cfg, cache, canvas), reference, jnp.float32, scale=5)


def test_kernel_bench_sweeps_the_split_k_kernel_on_sliding_layers_too(tmp_path):
    out = tmp_path / "sweep.json"
    assert kernel_bench.main(["--tiny", "--sweep", "--rows", "1", "--repeats", "1", "--sections", "sliding",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    impls = [e["impl"] for e in result["entries"]]
    assert impls == [f"pallas[{i}]" for i in range(1 + len(kernel_bench.ATTENTION_TILES))]  # no twins
    # The tiny sliding layers have 2 query heads per kv head: wider head packs fail their entries only.
    fits = [e for e in result["entries"] if e["tiles"]["pack_heads"] <= 2]
    assert len(fits) < len(result["entries"]) and all("ms" in e for e in fits), result["entries"]
    assert all("pack_heads must be a power of two dividing" in e["error"]
               for e in result["entries"] if e["tiles"]["pack_heads"] > 2)
    assert [b["section"] for b in result["best_tiles"]] == ["sliding"]
    from diffjax.config import KernelTiles

    assert list(result["best_kernel_tiles"]) == ["1"]  # JSON keys
    KernelTiles.parse(result["best_kernel_tiles"]["1"])


def test_sweep_winners_become_tiles_text_for_the_step_bench():
    """`best_kernel_tiles`: per rows, the winners' settings that differ from their kernel's defaults, as
    `KernelTiles.parse` text; the MoE section's bf16 plain-layout kernel only, the MLP's settings merged into
    the experts', global attention at its shortest prompt."""
    from diffjax.config import KernelTiles
    from diffjax.kernels.routing import RouteTiles

    def entry(section, impl, rows, tiles, prompt=None):
        return {"section": section, "impl": impl, "rows": rows, "prompt": prompt, "ms": 1.0,
                "tiles": dataclasses.asdict(tiles)}

    best = [
        entry("moe", "pallas[2]", 8, MoeTiles(num_warps=4, swap_ab=True)),
        entry("moe", "pallas_fp8[1]", 8, MoeTiles(num_stages=2)),  # not what the step runs
        entry("mlp", "pallas_with_mlp[1]", 8, MoeTiles(mlp_block_rows=32)),
        entry("attention", "pallas[3]", 8, AttentionTiles(block_q=32), prompt=1024),
        entry("attention", "pallas[5]", 8, AttentionTiles(block_k=16), prompt=32768),
        entry("sliding", "pallas[0]", 8, AttentionTiles()),  # the defaults won: nothing to set
        entry("routing", "pallas[1]", 1, RouteTiles(project=False)),
        entry("sliding", "pallas[0]", 1, AttentionTiles()),
    ]
    texts = kernel_bench.best_kernel_tiles(best)
    assert texts == {
        1: "routing.project=false",
        8: "experts.num_warps=4,experts.swap_ab=true,experts.mlp_block_rows=32,global_attention.block_q=32",
    }
    tiles = KernelTiles.parse(texts[8])
    assert tiles.experts == MoeTiles(num_warps=4, swap_ab=True, mlp_block_rows=32)
    assert tiles.global_attention == AttentionTiles(block_q=32) and tiles.sliding_attention is None
    assert kernel_bench.best_kernel_tiles([entry("sliding", "pallas[0]", 1, AttentionTiles())]) == {1: ""}


def test_kernel_bench_times_the_router_against_its_twin_and_sweeps_its_tiles(tmp_path):
    out = tmp_path / "routing.json"
    assert kernel_bench.main(["--tiny", "--rows", "1", "2", "--repeats", "1", "--sections", "routing",
                              "--out", str(out)]) == 0
    entries = json.loads(out.read_text())["entries"]
    assert [(e["impl"], e["rows"]) for e in entries] == [("pallas", 1), ("xla", 1), ("pallas", 2), ("xla", 2)]
    shapes = kernel_bench.Shapes.tiny()
    for e in entries:
        tokens = e["rows"] * shapes.canvas
        assert e["ms"] > 0 and e["flops"] == 2 * tokens * shapes.hidden * shapes.experts
        # bf16 input, scale and router; float32 per-expert scales; float32 weights and int32 ids out
        assert e["bytes"] == 2 * (tokens * shapes.hidden + shapes.hidden + shapes.hidden * shapes.experts) + (
            4 * shapes.experts + 8 * tokens * shapes.top_k)
    assert kernel_bench.main(["--tiny", "--sweep", "--rows", "1", "--repeats", "1", "--sections", "routing",
                              "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [e["impl"] for e in result["entries"]] == [f"pallas[{i}]" for i in range(1 + len(kernel_bench.ROUTE_TILES))]
    assert all("ms" in e for e in result["entries"]), result["entries"]
    assert [b["section"] for b in result["best_tiles"]] == ["routing"]


def test_kernel_bench_sweep_lists_tile_variants_and_picks_the_fastest():
    variants = kernel_bench._pallas_variants(lambda t: lambda: t, VocabTiles, ({"block_k": 32},), sweep=True)
    assert list(variants) == ["pallas[0]", "pallas[1]"]
    assert variants["pallas[0]"][1]["tiles"] == dataclasses.asdict(VocabTiles())
    assert variants["pallas[1]"][1]["tiles"]["block_k"] == 32
    assert list(kernel_bench._pallas_variants(lambda t: lambda: t, VocabTiles, (), sweep=False)) == ["pallas"]
    entries = [
        {"section": "moe", "impl": "pallas[0]", "rows": 1, "ms": 2.0, "tiles": {"num_warps": 4}},
        {"section": "moe", "impl": "pallas[1]", "rows": 1, "ms": 1.0, "tiles": {"num_warps": 8}},
        {"section": "moe", "impl": "pallas[2]", "rows": 1, "error": "failed"},
        # Faster, but another kernel: it must not take the bf16 kernel's place.
        {"section": "moe", "impl": "pallas_fp8[0]", "rows": 1, "ms": 0.5, "tiles": {"num_warps": 4}},
        {"section": "moe", "impl": "pallas[0]", "rows": 4, "ms": 3.0, "tiles": {"num_warps": 4}},
    ]
    assert kernel_bench.best_tiles(entries) == [
        {"section": "moe", "impl": "pallas[1]", "rows": 1, "ms": 1.0, "tiles": {"num_warps": 8}},
        {"section": "moe", "impl": "pallas_fp8[0]", "rows": 1, "ms": 0.5, "tiles": {"num_warps": 4}},
        {"section": "moe", "impl": "pallas[0]", "rows": 4, "ms": 3.0, "tiles": {"num_warps": 4}},
    ]
    assert kernel_bench.best_kernel_tiles(kernel_bench.best_tiles(entries)) == {
        1: "experts.num_warps=8", 4: "experts.num_warps=4"}


# Found by the second mutation audit: the expert kernel's padded layout and the split-K combine's precision.


def test_moe_kernel_on_the_worst_case_padding():
    """32 tokens, each routed to its own one of 32 experts: every group one row padded to a whole tile."""
    x, weights, ids, gate_up, down = moe_case(32, 32, 1, 32, 16, jnp.float32, seed=6)
    ids = jnp.arange(32, dtype=jnp.int32)[:, None]
    ours = experts_pallas(x, weights, ids, gate_up, down, tiles=MoeTiles(block_rows=16), interpret=True)
    _close(ours, experts_dense(*as_f32(x, weights, ids, gate_up, down)), jnp.float32)
    assert bool((jnp.abs(ours).max(axis=1) > 0).all())  # a dropped assignment would leave its row zero


def test_attention_kernel_combines_bf16_splits_from_float32_partials():
    """bf16 inputs, keys split 2-8 ways: each split's output and logsumexp stay float32 until they are
    combined, so splitting moves the result by float32 rounding and p's per-split bf16 rounding only (measured
    4-6e-4 of the mean magnitude); partial outputs stored in bf16 add a bf16 rounding each (1.6-1.7e-3)."""
    keys = jax.random.split(jax.random.key(0), 3)
    query = (0.3 * jax.random.normal(keys[0], (2, 16, 8, 64))).astype(jnp.bfloat16)
    k = jax.random.normal(keys[1], (2, 256, 2, 64)).astype(jnp.bfloat16)
    v = jax.random.normal(keys[2], (2, 256, 2, 64)).astype(jnp.bfloat16)
    valid = jnp.ones((2, 256), bool).at[1, :37].set(False)

    def run(splits):
        out = global_attention_pallas(query, k, v, valid, tiles=AttentionTiles(16, 32, splits), interpret=True)
        assert out.dtype == jnp.bfloat16
        return np.asarray(out, np.float32)

    whole = run(1)
    assert np.abs(whole).mean() > 0.05
    for splits in (2, 4, 8):
        moved = np.abs(run(splits) - whole).mean() / np.abs(whole).mean()
        assert moved < 1e-3, (splits, moved)
