"""`Config.projection_layout` and `Config.block_layout`: load-time parameter layouts (`diffjax.layout`)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AbstractMesh

import diffjax
from diffjax import sharding
from diffjax.config import FULL, SLIDING, AttentionConfig, Config
from diffjax.layout import fuse_projections, relayout, stack_blocks, unfuse_projections, unstack_blocks
from diffjax.model import init_params, param_shapes

# Both layer types with different head sizes, so the q/k/v column blocks differ between them.
CONFIG = Config.tiny(
    num_layers=4, layer_types=(SLIDING, FULL) * 2, num_heads=4,
    sliding=AttentionConfig(head_dim=8, num_kv_heads=2, rope_theta=10_000.0),
    full=AttentionConfig(head_dim=16, num_kv_heads=1, rope_theta=1e6, rope_type="proportional",
                         partial_rotary_factor=0.5),
)


def _leaves_equal(a, b) -> bool:
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_fusing_lays_out_the_declared_tree_and_unfusing_gives_the_weights_back():
    params = init_params(CONFIG, jax.random.key(1))
    fused_config, fused = fuse_projections(CONFIG, params)
    assert fused_config == CONFIG.replace(projection_layout="fused")
    assert jax.tree.map(lambda a: a.shape, fused) == jax.tree.map(lambda a: a.shape, param_shapes(fused_config))
    sliding, full = fused["blocks"]["layer_0"], fused["blocks"]["layer_1"]
    assert set(sliding["self_attn"]) == {"qkv_proj", "o_proj", "q_norm", "k_norm"}
    # [blocks, hidden, q + k + v] on a sliding layer, [blocks, hidden, q + k] on a full one (no v_proj).
    assert sliding["self_attn"]["qkv_proj"]["kernel"].shape == (2, CONFIG.hidden_size, 4 * 8 + 2 * 8 + 2 * 8)
    assert full["self_attn"]["qkv_proj"]["kernel"].shape == (2, CONFIG.hidden_size, 4 * 16 + 16)
    separate = params["blocks"]["layer_0"]
    np.testing.assert_array_equal(sliding["self_attn"]["qkv_proj"]["kernel"][..., 32:48],
                                  separate["self_attn"]["k_proj"]["kernel"])
    np.testing.assert_array_equal(sliding["mlp"]["gate_up_proj"]["kernel"][..., CONFIG.intermediate_size:],
                                  separate["mlp"]["up_proj"]["kernel"])
    assert set(fused["self_conditioning"]["mlp"]) == {"gate_up_proj", "down_proj"}
    # The experts' own gate_up_proj (an array, not a module) is left alone.
    assert fused["blocks"]["layer_0"]["experts"]["gate_up_proj"] is params["blocks"]["layer_0"]["experts"]["gate_up_proj"]
    assert "q_proj" in params["blocks"]["layer_0"]["self_attn"]  # the input tree is not changed
    back_config, back = unfuse_projections(fused_config, fused)
    assert back_config == CONFIG
    assert _leaves_equal(back, params)


@pytest.mark.parametrize("batch, pad", [(1, [0]), (2, [3, 0])])
def test_fused_model_computes_what_the_separate_one_does(batch, pad):
    params = init_params(CONFIG, jax.random.key(2))
    fused_config, fused = fuse_projections(CONFIG, params)
    rng = np.random.default_rng(3)
    ids = rng.integers(3, CONFIG.vocab_size, (batch, 9))
    mask = np.ones_like(ids, bool)
    for row, n in enumerate(pad):
        mask[row, :n] = False
    canvas = rng.integers(0, CONFIG.vocab_size, (batch, CONFIG.canvas_length))
    sc_logits = 2.0 * rng.standard_normal((batch, CONFIG.canvas_length, CONFIG.vocab_size)).astype(np.float32)
    outputs = []
    for config, p in ((CONFIG, params), (fused_config, fused)):
        cache = diffjax.encode(p, config, ids, mask)
        outputs.append((cache.keys, diffjax.denoise_logits(p, config, cache, canvas, sc_logits)))
    (keys, logits), (fused_keys, fused_logits) = outputs
    assert float(jnp.max(jnp.abs(logits))) > 0.3
    np.testing.assert_allclose(fused_logits, logits, atol=2e-6, rtol=1e-5)
    for name in keys:
        np.testing.assert_allclose(fused_keys[name], keys[name], atol=1e-5)


# layout -> (make, unmake, config field, its checkpoint value, a leaf name the layout has, diffjax.load flag)
LAYOUTS = {
    "fused": (fuse_projections, unfuse_projections, "projection_layout", "separate", "qkv_proj", "projections_fused"),
    "unstacked": (unstack_blocks, stack_blocks, "block_layout", "stacked", "block_0", "blocks_unstacked"),
}


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_load_time_layouts_are_refused_where_they_do_not_belong(tmp_path, layout):
    import convert
    from convert.errors import CheckpointError

    make, unmake, field, plain, leaf_name, load_flag = LAYOUTS[layout]
    params = init_params(CONFIG, jax.random.key(4))
    config, laid_out = make(CONFIG, params)
    with pytest.raises(ValueError, match=f"already '{layout}'"):
        make(config, laid_out)
    with pytest.raises(ValueError, match=f"is '{plain}', not '{layout}'"):
        unmake(CONFIG, params)
    with pytest.raises(CheckpointError, match=rf"{field}='{layout}'.*{unmake.__name__}"):
        convert.save(laid_out, config, tmp_path / "ckpt")
    assert not (tmp_path / "ckpt").exists()
    with pytest.raises(ValueError, match="separate projections and stacked blocks"):
        sharding.param_specs(config, AbstractMesh((1, 1, 2), sharding.AXES))
    # A tree in the checkpoint layout under the load-time config is named, not run.
    with pytest.raises(ValueError, match=leaf_name):
        diffjax.denoise_logits(params, config, diffjax.init_cache(CONFIG, 1, 8),
                               np.zeros((1, CONFIG.canvas_length), np.int32))
    # Checkpoints hold the plain layout; loading can make this one.
    convert.save(params, CONFIG, tmp_path / "plain")
    loaded_config, loaded = diffjax.load(tmp_path / "plain", **{load_flag: True})
    assert loaded_config == config
    assert _leaves_equal(loaded, laid_out)


def test_unstacking_gives_each_block_its_own_tree_and_stacking_gives_the_stacks_back(tmp_path):
    import convert
    from diffjax.lora import LoraConfig, init_lora

    params = init_params(CONFIG, jax.random.key(5))
    config, unstacked = unstack_blocks(CONFIG, params)
    assert config == CONFIG.replace(block_layout="unstacked")
    assert sorted(unstacked) == ["block_0", "block_1", "embedder", "final_norm", "self_conditioning"]
    assert jax.tree.map(lambda a: a.shape, unstacked) == jax.tree.map(lambda a: a.shape, param_shapes(config))
    np.testing.assert_array_equal(unstacked["block_1"]["layer_1"]["experts"]["down_proj"],
                                  params["blocks"]["layer_1"]["experts"]["down_proj"][1])
    back_config, back = stack_blocks(config, unstacked)
    assert back_config == CONFIG and _leaves_equal(back, params)
    # Both layouts at once, from either side.
    both_config, both = relayout(CONFIG, params, "fused", "unstacked")
    assert (both_config.projection_layout, both_config.block_layout) == ("fused", "unstacked")
    assert "qkv_proj" in both["block_0"]["layer_0"]["self_attn"]
    assert _leaves_equal(relayout(both_config, both, "separate", "stacked")[1], params)
    with pytest.raises(ValueError, match=r"without block_1"):
        stack_blocks(config, {k: v for k, v in unstacked.items() if k != "block_1"})
    with pytest.raises(ValueError, match="LoRA adapts stacked blocks"):
        init_lora(unstacked, LoraConfig(), jax.random.key(0))
    # Both loading flags at once.
    convert.save(params, CONFIG, tmp_path / "stacked")
    loaded_config, loaded = diffjax.load(tmp_path / "stacked", projections_fused=True, blocks_unstacked=True)
    assert (loaded_config.projection_layout, loaded_config.block_layout) == ("fused", "unstacked")
    assert _leaves_equal(loaded, relayout(CONFIG, params, "fused", "unstacked")[1])
    # donate: each stack's device memory goes as soon as its blocks are made.
    copy = jax.tree.map(jnp.copy, params)
    _, donated = unstack_blocks(CONFIG, copy, donate=True)
    assert copy["blocks"]["layer_0"]["mlp"]["down_proj"]["kernel"].is_deleted()
    assert not copy["embedder"]["embedding"].is_deleted()
    assert _leaves_equal(donated, unstacked)


@pytest.mark.parametrize("kernels", [False, True])
def test_unstacked_model_computes_what_the_stacked_one_does(kernels):
    """Encoder and decoder on unstacked blocks (a Python loop over blocks) against the scan over stacks, with
    the plain-JAX paths and with the Pallas kernels (interpreted here), which read the cache's stacks in place."""
    config = CONFIG.replace(num_heads=4, sliding=AttentionConfig(head_dim=16, num_kv_heads=2, rope_theta=1e4))
    if kernels:
        config = config.replace(moe_implementation="pallas", sliding_attention_implementation="pallas",
                                global_attention_implementation="pallas")
    params = init_params(config, jax.random.key(6))
    unstacked_config, unstacked = unstack_blocks(config, params)
    rng = np.random.default_rng(7)
    ids = rng.integers(3, config.vocab_size, (2, 19))
    mask = np.ones_like(ids, bool)
    mask[1, :4] = False
    canvas = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    outputs = []
    for c, p in ((config, params), (unstacked_config, unstacked)):
        cache = diffjax.encode(p, c, ids, mask, capacity=19 + config.canvas_length)
        outputs.append((cache, diffjax.denoise_logits(p, c, cache, canvas)))
    (cache, logits), (unstacked_cache, unstacked_logits) = outputs
    assert float(jnp.max(jnp.abs(logits))) > 0.3
    np.testing.assert_allclose(unstacked_logits, logits, atol=2e-6, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(unstacked_cache), jax.tree.leaves(cache), strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5)
