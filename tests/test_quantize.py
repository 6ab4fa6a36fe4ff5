"""FP8 weight-only experts (`diffjax.quantize`): round-trip error, the parameter tree, the model and loading.

The Pallas kernel's fp8 path is tested against its dequantized twins in test_kernels.py.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import convert
import diffjax
from diffjax.config import Config
from diffjax.model import denoise_logits, encode, init_params, param_shapes
from diffjax.quantize import (
    FP8,
    FP8_MAX,
    dequantize,
    dequantize_experts,
    quantize,
    quantize_experts,
    quantize_model,
)
from diffjax.train import fit

# Every expert used (top_k = num_experts): see test_quantized_model_logits.
CONFIG = Config.tiny(num_experts=2, top_k_experts=2)


def test_round_trip_is_within_one_e4m3_half_step():
    keys = jax.random.split(jax.random.key(0), 2)
    # [blocks, experts, k, n] with column magnitudes spread over five decades, and one all-zero column.
    magnitudes = 10.0 ** jax.random.uniform(keys[0], (2, 3, 1, 48), minval=-3, maxval=2)
    w = (jax.random.normal(keys[1], (2, 3, 64, 48)) * magnitudes).at[1, 2, :, 5].set(0.0)
    q, scale = quantize(w)
    assert q.dtype == FP8 and q.shape == w.shape
    assert scale.dtype == jnp.float32 and scale.shape == (2, 3, 48)
    q32 = np.asarray(q, np.float32)
    # Each column's largest magnitude lands on e4m3's largest value: the whole range is used.
    np.testing.assert_array_equal(np.abs(q32).max(axis=-2)[np.asarray(scale) != 1], FP8_MAX)
    assert np.all(q32[1, 2, :, 5] == 0) and float(scale[1, 2, 5]) == 1.0  # zero column: no 0/0
    back, w = np.asarray(dequantize(q, scale, jnp.float32)), np.asarray(w)
    # e4m3 keeps 3 mantissa bits: a normal value rounds within 2^-4 of itself; below 2^-6 (subnormals) the
    # step is 2^-9, so the error is at most 2^-10 in units of the scale.
    bound = np.maximum(2.0**-4 * np.abs(w), 2.0**-10 * np.asarray(scale)[..., None, :]) * (1 + 1e-6)
    assert np.all(np.abs(back - w) <= bound)
    assert np.abs(back - w).max() > 0  # rounding happened: the bound was tested, not trivially met


def test_quantize_tiny_and_non_finite_columns():
    """A column too small for a normal float32 scale quantizes to zeros with scale 1 (not 0/0 = NaN); one
    holding NaN or inf is refused by name, not spread over its column."""
    w = jnp.array([[1e-37, 0.0], [0.0, 1.0], [0.0, 0.5], [0.0, 0.0]], jnp.float32)
    q, scale = quantize(w)
    assert float(scale[0]) == 1.0
    back = np.asarray(dequantize(q, scale, jnp.float32))
    assert np.isfinite(back).all() and np.all(back[:, 0] == 0) and back[1, 1] == 1.0
    for bad in (np.inf, np.nan):
        weights = np.ones((1, 4, 2), np.float32)
        weights[0, 1, 1] = bad
        experts = {"gate_up_proj": weights, "down_proj": np.ones((1, 4, 2), np.float32)}
        with pytest.raises(ValueError, match="experts/gate_up_proj holds NaN or inf"):
            quantize_experts({"blocks": {"layer_0": {"experts": experts}}})


def test_dequantize_rounds_once_to_the_activation_dtype():
    """q * scale is formed in float32 and rounded once: rounding the scale to bf16 first (or the product in
    bf16) moves a good share of the weights by a bf16 step."""
    keys = jax.random.split(jax.random.key(1), 2)
    q, scale = quantize(jax.random.normal(keys[0], (64, 48)) * jax.random.uniform(keys[1], (1, 48), minval=0.1))
    once = np.asarray(dequantize(q, scale, jnp.float32).astype(jnp.bfloat16), np.float32)
    ours = dequantize(q, scale, jnp.bfloat16)
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), once)
    twice = np.asarray(q.astype(jnp.bfloat16) * scale.astype(jnp.bfloat16)[None, :], np.float32)
    assert np.mean(twice != once) > 0.05  # the check can fail


def test_columns_too_small_for_a_normal_scale_stay_finite():
    """A column whose amax / 448 is below float32's normal range gets a scale of 0 (flushed): its q must
    still be finite (clipped to +-448), or e4m3fn (no infinity) stores NaN and the dequantized weights are NaN
    instead of ~0. Other columns are untouched."""
    w = jnp.asarray([[1e-37, 1.0, 0.0], [-3e-38, 0.5, 0.0]], jnp.float32)
    q, scale = quantize(w)
    back = np.asarray(dequantize(q, scale, jnp.float32))
    assert np.isfinite(np.asarray(q, np.float32)).all() and np.isfinite(back).all()
    np.testing.assert_allclose(back[:, 0], 0.0, atol=1e-36)
    np.testing.assert_array_equal(back[:, 1:], [[1.0, 0.0], [0.5, 0.0]])


def test_quantized_tree_is_the_fp8_configs_tree():
    config = CONFIG
    params = init_params(config, jax.random.key(1))
    quantized = quantize_experts(params)
    expected = param_shapes(config.replace(expert_quantization="fp8"), jnp.float32)
    assert jax.tree.structure(quantized) == jax.tree.structure(expected)
    for leaf, want in zip(jax.tree.leaves(quantized), jax.tree.leaves(expected), strict=True):
        assert (leaf.shape, leaf.dtype) == (want.shape, want.dtype)
    assert quantized["embedder"]["embedding"] is params["embedder"]["embedding"]  # only the experts change
    experts = quantized["blocks"]["layer_0"]["experts"]
    assert experts["gate_up_proj_scale"].shape == (config.num_blocks, config.num_experts, 2 * config.moe_intermediate_size)

    back = dequantize_experts(quantized, jnp.float32)
    assert jax.tree.structure(back) == jax.tree.structure(params)
    original = params["blocks"]["layer_0"]["experts"]["down_proj"]
    np.testing.assert_allclose(back["blocks"]["layer_0"]["experts"]["down_proj"], original, rtol=2**-4,
                               atol=2**-10 * float(jnp.abs(original).max()) / FP8_MAX)

    with pytest.raises(ValueError, match="already quantized"):
        quantize_experts(quantized)
    with pytest.raises(ValueError, match="not quantized"):
        dequantize_experts(params)
    half = dict(experts)
    del half["down_proj_scale"]
    with pytest.raises(ValueError, match="half-quantized"):
        quantize_experts({"experts": half})
    with pytest.raises(ValueError, match="no `experts` parameters"):
        quantize_experts({"embedder": params["embedder"]})


def test_fp8_init_draws_e4m3_weights_with_scales():
    config = CONFIG.replace(expert_quantization="fp8")
    params = init_params(config, jax.random.key(2), jnp.bfloat16)
    experts = params["blocks"]["layer_1"]["experts"]
    assert experts["gate_up_proj"].dtype == FP8 and experts["down_proj_scale"].dtype == jnp.float32
    assert params["embedder"]["embedding"].dtype == jnp.bfloat16
    weights = dequantize(experts["gate_up_proj"], experts["gate_up_proj_scale"], jnp.float32)
    assert 0.018 < float(jnp.std(weights)) < 0.022  # the unquantized init's N(0, 0.02)
    assert diffjax.count_params(config) == diffjax.count_params(CONFIG)  # scales are not weights


def _logits(params, config: Config) -> jax.Array:
    prompt = jax.random.randint(jax.random.key(3), (2, 8), 3, config.vocab_size)
    canvas = jax.random.randint(jax.random.key(4), (2, config.canvas_length), 3, config.vocab_size)
    return denoise_logits(params, config, encode(params, config, prompt, capacity=8), canvas)


def test_quantized_model_logits():
    """Against its own dequantized weights the fp8 model differs only by float32 rounding. Against the
    unquantized weights the e4m3 rounding carried through 4 layers: measured 0.058 relative (bf16 experts
    give 0.0045, e4m3's step being 16 times bf16's). CONFIG uses every expert, so no
    routing decision can flip on that rounding (in Config.tiny's top-2 of 8 some do: the gap is 0.24)."""
    params = init_params(CONFIG, jax.random.key(5))
    fp8_config, quantized = quantize_model(CONFIG, params)
    assert fp8_config.expert_quantization == "fp8"
    ours = _logits(quantized, fp8_config)
    dequantized = _logits(dequantize_experts(quantized, jnp.float32), CONFIG)
    peak = float(jnp.abs(dequantized).max())
    assert peak > 0.3  # logits that differ between tokens, not near zero
    np.testing.assert_allclose(ours, dequantized, atol=2e-5 * peak, rtol=0)
    unquantized = _logits(params, CONFIG)
    assert 0 < float(jnp.linalg.norm(ours - unquantized) / jnp.linalg.norm(unquantized)) < 0.1

    with pytest.raises(ValueError, match=r"missing blocks/layer_0/experts/down_proj_scale.*come from "
                                         r"diffjax.quantize.quantize_model\(config, params\)"):
        _logits(params, fp8_config)
    with pytest.raises(ValueError, match=r"unexpected blocks/layer_0/experts/down_proj_scale.*these are fp8 experts"):
        _logits(quantized, CONFIG)
    half = jax.tree.map(lambda x: x, quantized)
    del half["blocks"]["layer_2"]["experts"]["down_proj_scale"]
    with pytest.raises(ValueError, match="missing blocks/layer_2/experts/down_proj_scale"):
        _logits(half, fp8_config)
    wide = jax.tree.map(lambda x: x, quantized)
    wide["blocks"]["layer_1"]["experts"]["gate_up_proj"] = params["blocks"]["layer_1"]["experts"]["gate_up_proj"]
    with pytest.raises(ValueError, match="blocks/layer_1/experts/gate_up_proj is float32, expected float8_e4m3fn"):
        _logits(wide, fp8_config)


def test_load_quantizes_on_the_way_and_checkpoints_refuse_fp8(tmp_path):
    config = CONFIG
    params = init_params(config, jax.random.key(6))
    convert.save(params, config, tmp_path / "ckpt")
    fp8_config, loaded = diffjax.load(tmp_path / "ckpt", experts_fp8=True)
    assert fp8_config == config.replace(expert_quantization="fp8")
    experts = loaded["blocks"]["layer_0"]["experts"]
    assert isinstance(experts["gate_up_proj"], jax.Array) and experts["gate_up_proj"].dtype == FP8
    assert isinstance(loaded["final_norm"]["scale"], jax.Array)
    np.testing.assert_array_equal(experts["down_proj"], quantize_experts(params)["blocks"]["layer_0"]["experts"]["down_proj"])
    with pytest.raises(convert.CheckpointError, match="experts_fp8=True"):
        convert.save(loaded, fp8_config, tmp_path / "fp8")
    with pytest.raises(convert.CheckpointError, match="checkpoints hold unquantized weights"):
        convert.save_hf(loaded, fp8_config, tmp_path / "hf")
    with pytest.raises(ValueError, match="not trainable weights"):
        fit(loaded, fp8_config, lambda _: None, 1, key=jax.random.key(0))
    with pytest.raises(ValueError, match="expert_quantization must be one of"):
        Config.tiny(expert_quantization="int4")
