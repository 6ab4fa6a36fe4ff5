"""The feed-forward inputs kernel (`diffjax.kernels.norms`) against its twin `diffjax.layers.moe_inputs`:
interpreted on random inputs, differentiated, refused on bad shapes, selected by the config, lowered for CUDA."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_kernels import _close, lower_for_cuda

from diffjax.config import Config
from diffjax.kernels.norms import moe_inputs_pallas
from diffjax.layers import moe_inputs
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
