"""The feed-forward inputs and outputs kernels (`diffjax.kernels.norms`) against their twins
`diffjax.layers.moe_inputs` and `feedforward_outputs`: interpreted on random inputs, differentiated, refused on
bad shapes, selected by the config, lowered for CUDA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import _close, lower_for_cuda

from diffjax.config import Config
from diffjax.kernels.moe import MlpInputs, experts_pallas
from diffjax.kernels.norms import feedforward_outputs_pallas, moe_inputs_pallas
from diffjax.layers import experts_grouped_rows, feedforward_outputs, moe_inputs, rms_norm
from diffjax.layout import relayout
from diffjax.model import denoise_logits, encode, init_params


def norms_case(shape, dtype, seed):
    """An attention output of a larger scale than the residual, and scales around 1."""
    keys = jax.random.split(jax.random.key(seed), 5)
    attention_out = 4 * jax.random.normal(keys[0], shape)
    residual = 2 * jax.random.normal(keys[1], shape)
    scales = [1 + 0.3 * jax.random.normal(k, shape[-1:]) for k in keys[2:]]
    return [a.astype(dtype) for a in (attention_out, residual, *scales)]


@pytest.mark.parametrize(("shape", "dtype"), [
    ((2, 11, 96), jnp.float32),  # hidden not a power of two: a wider, masked block; a partial token block
    ((3, 5, 64), jnp.float32),
    ((1, 7, 2816), jnp.bfloat16),  # the released hidden size
])
def test_moe_inputs_kernel_matches_its_twin(shape, dtype):
    args = norms_case(shape, dtype, seed=shape[-1])
    ours = moe_inputs_pallas(*args, 1e-6, interpret=True)
    twin = moe_inputs(*args, 1e-6)
    for got, want in zip(ours, twin, strict=True):
        assert got.shape == shape and got.dtype == dtype
        _close(got, want, dtype)
    # The router's input is the new residual normed without a scale: unit mean square.
    np.testing.assert_allclose(np.mean(np.square(np.asarray(ours[3], np.float32)), axis=-1), 1.0,
                               rtol=2e-5 if dtype == jnp.float32 else 2e-2)


def test_moe_inputs_kernel_differentiates_through_its_twin():
    args = norms_case((2, 6, 48), jnp.float32, seed=3)
    weights = [jax.random.normal(jax.random.key(10 + i), (2, 6, 48)) for i in range(4)]

    def loss(make, *args):
        return sum(jnp.sum(w * out) for w, out in zip(weights, make(*args, 1e-6), strict=True))

    kernel = functools.partial(moe_inputs_pallas, interpret=True)
    ours = jax.grad(functools.partial(loss, kernel), argnums=tuple(range(5)))(*args)
    twin = jax.grad(functools.partial(loss, moe_inputs), argnums=tuple(range(5)))(*args)
    for got, want in zip(ours, twin, strict=True):
        _close(got, want, jnp.float32, scale=5)


def test_moe_inputs_kernel_rejects_bad_shapes():
    attention_out, residual, *scales = norms_case((2, 4, 32), jnp.float32, seed=0)
    with pytest.raises(ValueError, match="same shape and dtype"):
        moe_inputs_pallas(attention_out, residual[:, :3], *scales, 1e-6)
    with pytest.raises(ValueError, match="same shape and dtype"):
        moe_inputs_pallas(attention_out, residual.astype(jnp.bfloat16), *scales, 1e-6)
    with pytest.raises(ValueError, match=r"dense_scale must be \[hidden=32\]"):
        moe_inputs_pallas(attention_out, residual, scales[0], scales[1][:16], scales[2], 1e-6)


def test_layers_select_the_norms_kernel():
    """`Config.norm_implementation="pallas"` changes how the encoder and the decoder compute, not the maths."""
    config = Config.tiny(num_layers=2, layer_types=("sliding_attention", "full_attention"))
    params = init_params(config, jax.random.key(1))
    prompt = jax.random.randint(jax.random.key(2), (2, 12), 3, config.vocab_size)
    attention_mask = jnp.ones((2, 12), bool).at[1, :5].set(False)
    canvas = jax.random.randint(jax.random.key(3), (2, config.canvas_length), 3, config.vocab_size)
    logits = {}
    for impl in ("xla", "pallas"):
        variant = config.replace(norm_implementation=impl)
        cache = encode(params, variant, prompt, attention_mask)
        logits[impl] = denoise_logits(params, variant, cache, canvas)
    _close(logits["pallas"], logits["xla"], jnp.float32, scale=5)
    with pytest.raises(ValueError, match="norm_implementation"):
        config.replace(norm_implementation="triton")


def test_moe_inputs_kernel_lowers_for_cuda_at_released_shapes():
    cfg = Config.diffusiongemma_26b_a4b()
    activations = jax.ShapeDtypeStruct((8, cfg.canvas_length, cfg.hidden_size), jnp.bfloat16)
    scale = jax.ShapeDtypeStruct((cfg.hidden_size,), jnp.bfloat16)
    text = lower_for_cuda(lambda *a: moe_inputs_pallas(*a, cfg.rms_norm_eps, interpret=False),
                          activations, activations, scale, scale, scale)
    assert text.count("__gpu$xla.gpu.triton") == 1


def outputs_case(tokens, hidden, top_k, dtype, seed):
    """A residual, a dense output, the experts' rows (and a scratch row past them, never read), three scales
    around 1 and a layer scalar."""
    keys = jax.random.split(jax.random.key(seed), 6)
    residual = 2 * jax.random.normal(keys[0], (tokens, hidden))
    dense = 3 * jax.random.normal(keys[1], (tokens, hidden))
    rows = jax.random.normal(keys[2], (tokens * top_k + 1, hidden)).at[-1].set(jnp.nan)
    scales = [1 + 0.3 * jax.random.normal(k, (hidden,)) for k in keys[3:]]
    return [a.astype(dtype) for a in (residual, dense, rows, *scales, jnp.array([0.7]))]


def summed_outputs(residual, dense, rows, top_k, *rest):
    """The twin of the kernel, written out: the rows summed in float32 per token, then `feedforward_outputs`."""
    tokens, hidden = residual.shape
    experts = jnp.sum(rows[:tokens * top_k].reshape(tokens, top_k, hidden).astype(jnp.float32), axis=1)
    return feedforward_outputs(residual, dense, experts.astype(residual.dtype), *rest, 1e-6)


@pytest.mark.parametrize(("tokens", "hidden", "top_k", "dtype"), [
    (37, 48, 3, jnp.float32),  # hidden in three 16-column chunks; a partial token block
    (6, 256, 1, jnp.float32),
    (9, 2816, 8, jnp.bfloat16),  # the released hidden size (11 chunks of 256) and top-8
])
def test_feedforward_outputs_kernel_matches_its_twin(tokens, hidden, top_k, dtype):
    residual, dense, rows, *rest = outputs_case(tokens, hidden, top_k, dtype, seed=hidden)
    ours = feedforward_outputs_pallas(residual, dense, rows, top_k, *rest, 1e-6, interpret=True)
    assert ours.shape == residual.shape and ours.dtype == dtype
    assert bool(jnp.isfinite(ours).all())  # the scratch row (NaN) is never read
    _close(ours, summed_outputs(residual, dense, rows, top_k, *rest), dtype)
    # Batched activations `[batch, n, hidden]` as the layers hold them, and the output normed for the next layer.
    next_scale = 1 + 0.3 * jax.random.normal(jax.random.key(7), (hidden,)).astype(dtype)
    batched, normed = feedforward_outputs_pallas(residual[None], dense[None], rows, top_k, *rest, 1e-6, next_scale,
                                                 interpret=True)
    np.testing.assert_array_equal(np.asarray(batched[0], np.float32), np.asarray(ours, np.float32))
    assert normed.shape == batched.shape and normed.dtype == dtype
    _close(normed, rms_norm(batched, next_scale, 1e-6), dtype)


def test_feedforward_outputs_kernel_differentiates_through_its_twin():
    residual, dense, rows, *rest = outputs_case(10, 32, 2, jnp.float32, seed=4)
    rows = rows.at[-1].set(0.0)
    next_scale = 1 + 0.3 * jax.random.normal(jax.random.key(8), (32,))
    probes = jax.random.normal(jax.random.key(9), (2, *residual.shape))

    def loss(make, *args):
        out, normed = make(*args)
        return jnp.sum(probes[0] * out) + jnp.sum(probes[1] * normed)

    def kernel(residual, dense, rows, *rest):
        return feedforward_outputs_pallas(residual, dense, rows, 2, *rest[:-1], 1e-6, rest[-1], interpret=True)

    def twin(residual, dense, rows, *rest):
        out = summed_outputs(residual, dense, rows, 2, *rest[:-1])
        return out, rms_norm(out, rest[-1], 1e-6)

    args = (residual, dense, rows, *rest, next_scale)
    ours = jax.grad(functools.partial(loss, kernel), argnums=tuple(range(8)))(*args)
    twin = jax.grad(functools.partial(loss, twin), argnums=tuple(range(8)))(*args)
    for got, want in zip(ours, twin, strict=True):
        _close(got, want, jnp.float32, scale=5)
    assert float(jnp.abs(ours[2][-1]).max()) == 0  # the scratch row has no gradient


def test_feedforward_outputs_kernel_rejects_bad_inputs():
    residual, dense, rows, *rest = outputs_case(4, 32, 2, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="must share the residual's shape and dtype"):
        feedforward_outputs_pallas(residual, dense[:3], rows, 2, *rest, 1e-6)
    with pytest.raises(ValueError, match=r"expert_rows must be \[>= tokens \* top_k = 12"):
        feedforward_outputs_pallas(residual, dense, rows, 3, *rest, 1e-6)
    with pytest.raises(ValueError, match=r"output_scale must be \[hidden=32\]"):
        feedforward_outputs_pallas(residual, dense, rows, 2, *rest[:2], rest[2][:8], rest[3], 1e-6)
    with pytest.raises(ValueError, match=r"next_scale must be \[hidden=32\]"):
        feedforward_outputs_pallas(residual, dense, rows, 2, *rest, 1e-6, rest[0][:16])
    with pytest.raises(ValueError, match=r"layer_scalar must be \[1\]"):
        feedforward_outputs_pallas(residual, dense, rows, 2, *rest[:3], rest[3][0], 1e-6)
    residual, dense, rows, *rest = outputs_case(4, 40, 2, jnp.float32, seed=0)
    with pytest.raises(ValueError, match="multiple of 16"):
        feedforward_outputs_pallas(residual, dense, rows, 2, *rest, 1e-6)


def test_expert_kernels_hand_over_their_rows_unsummed():
    """`experts_pallas(..., sum_rows=False)`: each assignment's weighted row where the down kernel writes it,
    as `experts_grouped_rows`, plus a scratch row; differentiable through that twin (the scratch row's
    cotangent goes nowhere)."""
    keys = jax.random.split(jax.random.key(3), 5)
    x = jax.random.normal(keys[0], (20, 32))
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (20, 4))), 2)
    gate_up, down = (0.3 * jax.random.normal(k, shape) for k, shape in ((keys[2], (4, 32, 32)), (keys[3], (4, 16, 32))))
    rows = experts_pallas(x, weights, ids.astype(jnp.int32), gate_up, down, sum_rows=False, interpret=True)
    assert rows.shape == (41, 32)
    _close(rows[:40], experts_grouped_rows(x, weights, ids, gate_up, down), jnp.float32)
    probe = jax.random.normal(keys[4], rows.shape)
    grad = jax.grad(lambda x: jnp.sum(probe * experts_pallas(x, weights, ids.astype(jnp.int32), gate_up, down,
                                                             sum_rows=False, interpret=True)))(x)
    want = jax.grad(lambda x: jnp.sum(probe[:40] * experts_grouped_rows(x, weights, ids, gate_up, down)))(x)
    _close(grad, want, jnp.float32, scale=5)


def test_layers_select_the_outputs_kernel_with_the_mlp_in_the_expert_launches():
    """`norm_implementation="pallas"` with `mlp_implementation="pallas"`: the experts' rows go unsummed to the
    outputs kernel; same logits as the XLA norms, MLP and sum (scanned blocks; the transformers parity test runs
    the unstacked ones)."""
    config = Config.tiny(num_layers=2, layer_types=("sliding_attention", "full_attention"))
    config, params = relayout(config, init_params(config, jax.random.key(1)), "fused", "stacked")
    config = config.replace(moe_implementation="pallas")
    prompt = jax.random.randint(jax.random.key(2), (2, 12), 3, config.vocab_size)
    canvas = jax.random.randint(jax.random.key(3), (2, config.canvas_length), 3, config.vocab_size)
    logits = {}
    for impl in ("xla", "pallas"):
        variant = config.replace(norm_implementation=impl, mlp_implementation=impl)
        logits[impl] = denoise_logits(params, variant, encode(params, variant, prompt), canvas)
    _close(logits["pallas"], logits["xla"], jnp.float32, scale=5)


def test_feedforward_outputs_kernel_lowers_for_cuda_at_released_shapes():
    """At the released sizes, behind the expert kernels as the decoder runs them: three Triton kernels, and the
    experts' rows reach the outputs kernel whole (no slice of them, which a custom call would copy)."""
    cfg = Config.diffusiongemma_26b_a4b()
    tokens, k, hidden = cfg.canvas_length, cfg.top_k_experts, cfg.hidden_size
    spec = jax.ShapeDtypeStruct

    def layer_end(x, weights, ids, gate_up, down, mlp_gate_up, mlp_down, residual, scale, scalar):
        rows, dense = experts_pallas(x, weights, ids, gate_up, down, mlp=MlpInputs(x, mlp_gate_up, mlp_down),
                                     sum_rows=False, interpret=False)
        return feedforward_outputs_pallas(residual, dense, rows, k, scale, scale, scale, scalar, cfg.rms_norm_eps,
                                          interpret=False)

    text = lower_for_cuda(
        layer_end, spec((tokens, hidden), jnp.bfloat16), spec((tokens, k), jnp.float32), spec((tokens, k), jnp.int32),
        spec((cfg.num_experts, hidden, 2 * cfg.moe_intermediate_size), jnp.bfloat16),
        spec((cfg.num_experts, cfg.moe_intermediate_size, hidden), jnp.bfloat16),
        spec((hidden, 2 * cfg.intermediate_size), jnp.bfloat16), spec((cfg.intermediate_size, hidden), jnp.bfloat16),
        spec((tokens, hidden), jnp.bfloat16), spec((hidden,), jnp.bfloat16), spec((1,), jnp.bfloat16))
    assert text.count("__gpu$xla.gpu.triton") == 3
    assert f"tensor<{tokens * k}x{hidden}xbf16>" not in text  # the rows without their scratch row: a slice
