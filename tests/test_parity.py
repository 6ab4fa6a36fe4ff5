"""Parity of encode / denoise_logits with transformers 5.23.0 on tiny random configs (float32)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from reference import diffjax_params, random_hf_model
from transformers import DynamicCache

import diffjax
from diffjax.config import FULL, SLIDING, AttentionConfig, Config

TOL = 1e-4

CONFIGS = {
    # 3 sliding + 1 k_eq_v global, GQA 2:1 sliding, 4:1 global, proportional RoPE 1/4.
    "tiny": Config.tiny(),
    # Two scanned blocks of (sliding, sliding, full); MHA sliding, GQA 2:1 global, window 5.
    "two_blocks": Config.tiny(
        num_layers=6, layer_types=(SLIDING, SLIDING, FULL) * 2, sliding_window=5,
        sliding=AttentionConfig(head_dim=16, num_kv_heads=4, rope_theta=10_000.0),
        full=AttentionConfig(head_dim=32, num_kv_heads=2, rope_theta=1e6, rope_type="proportional",
                             partial_rotary_factor=0.25),
    ),
    # A non-periodic stack (one unrolled block), MQA on sliding layers, 8 heads, 3 of 6 experts.
    "irregular_mqa": Config.tiny(
        num_layers=5, layer_types=(SLIDING, FULL, SLIDING, SLIDING, FULL), num_heads=8, sliding_window=6,
        sliding=AttentionConfig(head_dim=8, num_kv_heads=1, rope_theta=10_000.0),
        full=AttentionConfig(head_dim=16, num_kv_heads=2, rope_theta=1e6, rope_type="proportional",
                             partial_rotary_factor=0.5),
        num_experts=6, top_k_experts=3, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    ),
    # Global layers with full-width default RoPE, window 4, a wider vocab.
    "default_rope_global": Config.tiny(
        num_layers=4, layer_types=(SLIDING, FULL, SLIDING, FULL), sliding_window=4, vocab_size=1000,
        full=AttentionConfig(head_dim=32, num_kv_heads=2, rope_theta=5e5),
        canvas_length=12,
    ),
}


def _pair(name, tmp_path_factory):
    config = CONFIGS[name]
    model = random_hf_model(config, seed=len(name))
    loaded_config, params = diffjax_params(model, tmp_path_factory.mktemp(name))
    assert loaded_config == config
    return config, model, params


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=sorted(name for name, config in CONFIGS.items() if config.num_blocks > 1))
def multi_block_pair(request, tmp_path_factory):
    return _pair(request.param, tmp_path_factory)


def _prompt(config: Config, batch: int, length: int, pad: list[int], seed: int):
    rng = np.random.default_rng(seed)
    ids = rng.integers(3, config.vocab_size, (batch, length))
    mask = np.ones((batch, length), bool)
    for row, n_pad in enumerate(pad):
        mask[row, :n_pad] = False
        ids[row, :n_pad] = config.pad_token_id
    return ids, mask


def _reference(model, ids, mask, canvas, sc_logits=None, sc_mask=None, cache=None):
    """transformers: encode `ids` into `cache` (or a new one), decode `canvas`; (logits, encoder hidden)."""
    cache = cache if cache is not None else DynamicCache(config=model.config.text_config)
    past = cache.get_seq_length()
    full_mask = np.concatenate([np.ones((ids.shape[0], past), bool), mask, np.ones(canvas.shape, bool)], 1)
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(np.concatenate([np.ones((ids.shape[0], past), bool), mask], 1)),
            past_key_values=cache,
            decoder_input_ids=torch.tensor(canvas),
            decoder_attention_mask=torch.tensor(full_mask),
            self_conditioning_logits=None if sc_logits is None else torch.tensor(sc_logits),
            self_conditioning_mask=None if sc_mask is None else torch.tensor(sc_mask),
        )
    return out.logits.numpy(), out.encoder_last_hidden_state.float().numpy()


def _assert_close(ours, ref, what, tol=TOL):
    """Max-abs difference within `tol`; hidden states (not softcapped) are compared relative to their scale."""
    diff = float(np.max(np.abs(np.asarray(ours) - ref)))
    scale = float(np.abs(ref).max())
    print(f"{what}: max abs diff {diff:.2e} (reference max {scale:.2f})")  # shown with pytest -s
    assert scale > 0.1, f"{what}: reference is degenerate"
    assert diff <= tol * max(1.0, scale), f"{what}: max abs diff {diff:.3g} > {tol} (scale {scale:.3g})"


@pytest.mark.parametrize(
    ("batch", "length", "pad"),
    [(1, 3, [0]), (2, 13, [0, 4]), (3, 21, [7, 0, 2])],
    ids=["short", "padded_longer_than_window", "batch3_long"],
)
def test_encode_then_denoise(pair, batch, length, pad):
    config, model, params = pair
    ids, mask = _prompt(config, batch, length, pad, seed=length)
    rng = np.random.default_rng(length + 1)
    canvas = rng.integers(0, config.vocab_size, (batch, config.canvas_length))
    ref_logits, ref_hidden = _reference(model, ids, mask, canvas)

    # Spare capacity, as generate allocates for later canvases: the empty slots must stay invisible.
    cache, hidden = diffjax.encode_with_hidden(params, config, ids, mask, capacity=length + 2 * config.canvas_length)
    _assert_close(np.asarray(hidden)[mask], ref_hidden[mask], "encoder hidden")
    logits = diffjax.denoise_logits(params, config, cache, canvas)
    assert logits.dtype == np.float32 and logits.shape == (batch, config.canvas_length, config.vocab_size)
    _assert_close(logits, ref_logits, "logits")


def _variant_matches_the_reference(model, config, params, variant, what, seed, self_conditioned=False):
    """A padded batch-2 prompt encoded and a canvas decoded (self-conditioned: on random logits) with `variant`
    of `config` and `params` (the same weights, laid out for it) against transformers."""
    ids, mask = _prompt(config, 2, 13, [0, 4], seed=seed)
    rng = np.random.default_rng(seed + 1)
    canvas = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    sc_logits = None
    if self_conditioned:
        sc_logits = (3.0 * rng.standard_normal((2, config.canvas_length, config.vocab_size))).astype(np.float32)
    ref_logits, ref_hidden = _reference(model, ids, mask, canvas, sc_logits)
    cache, hidden = diffjax.encode_with_hidden(params, variant, ids, mask, capacity=13 + config.canvas_length)
    _assert_close(np.asarray(hidden)[mask], ref_hidden[mask], f"{what} encoder hidden")
    _assert_close(diffjax.denoise_logits(params, variant, cache, canvas, sc_logits), ref_logits, f"{what} logits")


@pytest.mark.parametrize("scan_unroll", [2, 7])  # 7: more than any config's blocks, i.e. no loop at all
def test_unrolled_blocks_match_the_reference(multi_block_pair, scan_unroll):
    """`Config.scan_unroll` reads each block's weights at a fixed offset instead of a per-iteration slice."""
    config, model, params = multi_block_pair
    _variant_matches_the_reference(model, config, params, config.replace(scan_unroll=scan_unroll), "unrolled", 21)


@pytest.mark.parametrize(("scan_unroll", "projections", "blocks"), [
    (1, "fused", "stacked"), (7, "fused", "stacked"), (1, "separate", "unstacked"), (1, "fused", "unstacked")])
def test_load_time_layouts_match_the_reference(multi_block_pair, scan_unroll, projections, blocks):
    """`Config.projection_layout="fused"` (q/k/v and gate/up one kernel each, the self-conditioning MLP's too)
    and `Config.block_layout="unstacked"` (a tree per block, no scan) against transformers: encoder, decoder and
    a self-conditioned decoder pass."""
    from diffjax.layout import relayout

    config, model, params = multi_block_pair
    laid_config, laid_out = relayout(config.replace(scan_unroll=scan_unroll), params, projections, blocks)
    _variant_matches_the_reference(model, config, laid_out, laid_config, f"{projections}, {blocks} self-conditioned",
                                   23, self_conditioned=True)


def test_routing_kernels_match_the_reference(pair):
    """`Config.routing_implementation="pallas"`: the router kernel (its matmul and top-k) and, under the Pallas
    experts, the row-layout kernel (both interpreted here) against transformers, on every config (6 experts
    top-3 among them: widths that are not powers of two; its expert width, 24, is not one the expert kernels
    take, so there only the router's kernel runs)."""
    config, model, params = pair
    moe = "pallas" if config.moe_intermediate_size % 16 == 0 else "grouped"
    routed = config.replace(routing_implementation="pallas", moe_implementation=moe)
    _variant_matches_the_reference(model, config, params, routed, "routing kernels", 25)


def test_attention_kernels_match_the_reference(pair):
    """The decoder's Pallas attention (interpreted here): the q/k/v inputs kernel (norms and RoPE), the split-K
    pass over the cache and the canvas, and the combine of its splits, on each layer type whose head_dim the
    split-K kernel takes (a multiple of 16), against transformers, self-conditioned (a 12-row canvas among
    them: the split-K kernel pads it to its 16-row block)."""
    config, model, params = pair
    kernels = {f"{kind}_attention_implementation": "pallas"
               for kind, attention in (("sliding", config.sliding), ("global", config.full))
               if attention.head_dim % 16 == 0}
    assert "global_attention_implementation" in kernels
    _variant_matches_the_reference(model, config, params, config.replace(**kernels), "attention kernels", 27,
                                   self_conditioned=True)


def test_norms_kernel_matches_the_reference(pair):
    """`Config.norm_implementation="pallas"`: each layer's residual add and feed-forward input norms in one
    kernel (interpreted here), in the encoder and the decoder, against transformers."""
    config, model, params = pair
    _variant_matches_the_reference(model, config, params, config.replace(norm_implementation="pallas"),
                                   "norms kernel", 29)


@pytest.mark.parametrize(("blocks", "norms"), [("stacked", "xla"), ("unstacked", "pallas")])
def test_mlp_in_the_expert_kernels_matches_the_reference(pair, blocks, norms):
    """`Config.mlp_implementation="pallas"`: each layer's dense MLP run by the Pallas expert kernels (interpreted
    here), reading its fused weights from the block stacks in place or from each block's own tree, in the
    encoder and a self-conditioned decoder pass, against transformers; with the norms kernels, the experts'
    rows summed by the outputs kernel, which also norms each layer's output for the next (the last: the final
    norm)."""
    from diffjax.layout import relayout

    config, model, params = pair
    if config.moe_intermediate_size % 16:
        pytest.skip(f"the expert kernels take widths that are multiples of 16, not {config.moe_intermediate_size}")
    laid_config, laid_out = relayout(config, params, "fused", blocks)
    variant = laid_config.replace(moe_implementation="pallas", mlp_implementation="pallas", norm_implementation=norms)
    _variant_matches_the_reference(model, config, laid_out, variant, f"MLP kernel, {blocks}, {norms} norms", 31,
                                   self_conditioned=True)


def test_self_conditioning(pair):
    config, model, params = pair
    ids, mask = _prompt(config, 2, 11, [3, 0], seed=5)
    rng = np.random.default_rng(6)
    canvas = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    sc_logits = (3.0 * rng.standard_normal((2, config.canvas_length, config.vocab_size))).astype(np.float32)
    cache = diffjax.encode(params, config, ids, mask)
    plain = diffjax.denoise_logits(params, config, cache, canvas)
    for sc_mask in (None, np.array([True, False])):
        ref, _ = _reference(model, ids, mask, canvas, sc_logits, sc_mask)
        ours = diffjax.denoise_logits(params, config, cache, canvas, sc_logits, sc_mask)
        _assert_close(ours, ref, f"self-conditioned logits (mask={sc_mask})")
    # The signal changes the answer; a masked row equals the unconditioned pass.
    assert np.max(np.abs(np.asarray(ours[0]) - np.asarray(plain[0]))) > 1e-2
    np.testing.assert_allclose(np.asarray(ours[1]), np.asarray(plain[1]), atol=1e-6)


def test_encode_twice_equals_one_pass(pair):
    """Prompt, then a canvas appended to the cache == the reference encoding the concatenation at once."""
    config, model, params = pair
    ids, mask = _prompt(config, 2, 9, [0, 5], seed=9)
    rng = np.random.default_rng(10)
    appended = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    canvas = rng.integers(0, config.vocab_size, (2, config.canvas_length))
    both = np.concatenate([ids, appended], 1)
    both_mask = np.concatenate([mask, np.ones(appended.shape, bool)], 1)
    ref_logits, ref_hidden = _reference(model, both, both_mask, canvas)

    cache = diffjax.encode(params, config, ids, mask, capacity=both.shape[1])
    cache, hidden = diffjax.encode_with_hidden(params, config, appended, cache=cache)
    assert int(cache.length) == both.shape[1]
    _assert_close(hidden, ref_hidden[:, ids.shape[1]:], "hidden of the appended canvas")
    _assert_close(diffjax.denoise_logits(params, config, cache, canvas), ref_logits, "logits after two encodes")
