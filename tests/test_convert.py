"""Checkpoint conversion: transformers folders <-> diffjax params <-> the diffjax format."""

from __future__ import annotations

import numpy as np
import pytest
from reference import random_hf_model, save_hf

import convert
from diffjax import Config, param_shapes
from diffjax.config import FULL, SLIDING

# Two blocks of (sliding, full): exercises the stacked block axis (layer i -> block i // 2, slot i % 2).
CONFIG = Config.tiny(layer_types=(SLIDING, FULL, SLIDING, FULL))


def _np(x) -> np.ndarray:
    return np.asarray(x)


@pytest.fixture(scope="module")
def hf_model():
    return random_hf_model(CONFIG, seed=3)


@pytest.fixture(scope="module")
def hf_dir(hf_model, tmp_path_factory):
    return save_hf(hf_model, tmp_path_factory.mktemp("hf") / "single")


@pytest.fixture(scope="module")
def state(hf_model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}


def test_load_hf_single_file_maps_every_tensor(hf_dir, state):
    config, params = convert.load_hf(hf_dir)
    assert config == CONFIG
    b = params["blocks"]
    assert np.array_equal(_np(params["embedder"]["embedding"]), state["model.decoder.embed_tokens.weight"])
    assert np.array_equal(_np(params["final_norm"]["scale"]), state["model.decoder.norm.weight"])
    sc = params["self_conditioning"]
    assert np.array_equal(_np(sc["mlp"]["gate_proj"]["kernel"]), state["model.decoder.self_conditioning.gate_proj.weight"].T)
    assert np.array_equal(_np(sc["pre_norm"]["scale"]), state["model.decoder.self_conditioning.pre_norm.weight"])
    for i in range(CONFIG.num_layers):
        blk, j = CONFIG.layer_slot(i)
        layer = b[f"layer_{j}"]
        pre = f"model.decoder.layers.{i}."

        def leaf(*path, layer=layer, blk=blk):
            node = layer
            for key in path:
                node = node[key]
            return _np(node)[blk]

        assert np.array_equal(leaf("self_attn", "q_proj", "kernel"), state[pre + "self_attn.q_proj.weight"].T)
        assert np.array_equal(leaf("self_attn", "o_proj", "kernel"), state[pre + "self_attn.o_proj.weight"].T)
        assert np.array_equal(leaf("self_attn", "k_norm", "scale"), state[pre + "self_attn.k_norm.weight"])
        assert ("v_proj" in layer["self_attn"]) == (CONFIG.layer_types[i] == SLIDING)
        assert np.array_equal(leaf("mlp", "down_proj", "kernel"), state[pre + "mlp.down_proj.weight"].T)
        assert np.array_equal(leaf("router", "proj", "kernel"), state[pre + "router.proj.weight"].T)
        assert np.array_equal(leaf("router", "per_expert_scale"), state[pre + "router.per_expert_scale"])
        assert np.array_equal(leaf("experts", "gate_up_proj"), state[pre + "experts.gate_up_proj"].swapaxes(1, 2))
        assert np.array_equal(leaf("experts", "down_proj"), state[pre + "experts.down_proj"].swapaxes(1, 2))
        assert np.array_equal(
            leaf("post_feedforward_layernorm_2", "scale"), state[pre + "post_feedforward_layernorm_2.weight"]
        )
        assert np.array_equal(leaf("decoder_layer_scalar"), state[pre + "layer_scalar"])
        enc = state[f"model.encoder.language_model.layers.{i}.layer_scalar"]
        assert np.array_equal(leaf("encoder_layer_scalar"), enc)
        assert not np.array_equal(enc, state[pre + "layer_scalar"])  # distinct values survive


def test_structure_matches_param_shapes(hf_dir):
    config, params = convert.load_hf(hf_dir, dtype="bfloat16")
    expected = param_shapes(config)
    import jax

    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected), strict=True):
        assert got.shape == want.shape and got.dtype == want.dtype
