"""Sharded model, generation and training equal the single-device run (8 forced CPU devices, in a subprocess).

`sharding_check.py` runs every mesh once in one jax process (the device count is fixed when jax starts) and
reports JSON; the tests below check the report. The partition rules and errors are tested in-process.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh
from jax.sharding import PartitionSpec as P

from diffjax import sharding
from diffjax.config import Config
from diffjax.layers import experts_grouped
from diffjax.model import param_shapes

ROOT = pathlib.Path(__file__).resolve().parents[1]
MESHES = ("8,1,1", "1,8,1", "1,4,2", "2,2,2")
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def report() -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8".strip()
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "sharding_check.py")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    # XLA's warning for a layout it can only reach by replicating the whole array on every device first.
    result["rematerializations"] = [line[:400] for line in done.stderr.splitlines()
                                    if "Involuntary full rematerialization" in line]
    print(json.dumps(result, indent=1))
    return result


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_logits_and_tokens_equal_single_device(report: dict, mesh: str) -> None:
    result = report["meshes"][mesh]
    assert report["reference"]["max_abs_logit"] > 0.5  # logits that differ between tokens, not near zero
    assert result["logits_max_diff"] <= TOLERANCE
    assert result["tokens_equal"] and result["passes_equal"]


@pytest.mark.parametrize("mesh", MESHES)
def test_sharded_generate_never_gathers_the_logits_or_the_embedding_whole(report: dict, mesh: str) -> None:
    """The self-conditioning product contracts each device's slice of the vocabulary. Unpinned, the compiled
    loop gathered the embedding whole on (1, 8, 1) and (1, 4, 2), and on (1, 4, 2) the [batch, canvas, vocab]
    logits too (its carry had settled on rows split over `expert`), every step."""
    assert report["meshes"][mesh]["generate_whole_gathers"] == []
    # The LM head takes its rows whole ([rows, hidden] gathered if need be) and gathers none of its logits: from
    # the MoE's tokens split over every device, it made each device's rows' logits and gathered [rows, vocab /
    # group] floats a step on (1, 8, 1) and (1, 4, 2).
    assert report["meshes"][mesh]["lm_head_named"] and report["meshes"][mesh]["lm_head_gathers"] == []


def test_nothing_sharded_is_replicated_whole_to_be_resplit(report: dict) -> None:
    """Over the whole check (every mesh's decoder pass, generate, the fused pass and the train step) XLA never
    falls back to replicating an array to change its layout. Before the layouts were pinned it did five times:
    the self-conditioning carry in generate on (1, 4, 2), and on (2, 2, 2) the train step's per-example K/V
    (four leaves). Pinning the LM head's input rows alone added a sixth, the AR logits' gradient."""
    assert report["rematerializations"] == []


def test_fused_vocabulary_pass_runs_sharded(report: dict) -> None:
    """generate(statistics="pallas") on the mesh that splits both the rows and the vocabulary draws the same
    tokens as on one device, and the vocabulary kernel reads each device's slice of the embedding: no
    all-gather rebuilds it (only the per-row partials are gathered)."""
    result = report["meshes"]["2,2,2"]
    assert result["fused_tokens_equal"] and result["fused_passes_equal"]
    assert result["fused_hlo"]["all_gathers"] > 0 and result["fused_hlo"]["embedding_all_gathers"] == []


@pytest.mark.parametrize("mesh", MESHES)
def test_load_hf_places_params_on_their_shards(report: dict, mesh: str) -> None:
    result = report["meshes"][mesh]
    assert result["load_max_diff"] == 0.0
    assert result["load_shardings_match"]
    _, expert, model = map(int, mesh.split(","))
    config = Config.tiny()
    # [blocks, experts / (expert x model), hidden, 2 * inter] on each device.
    assert result["expert_shard_shape"] == [2, config.num_experts // (expert * model), config.hidden_size,
                                            2 * config.moe_intermediate_size]


@pytest.mark.parametrize("mesh", MESHES)
def test_decoder_hlo_has_the_expected_collectives(report: dict, mesh: str) -> None:
    hlo = report["meshes"][mesh]["hlo"]
    _, expert, model = map(int, mesh.split(","))
    if expert * model > 1:
        assert hlo["counts"]["all-to-all"] > 0  # the expert dispatch and return
    else:
        assert hlo["counts"]["all-to-all"] == 0
    if model > 1:  # heads / MLP split over `model`: partial sums reduced
        assert hlo["counts"]["all-reduce"] + hlo["counts"]["reduce-scatter"] > 0
    assert hlo["expert_weight_all_gathers"] == []  # expert weights are never gathered whole
    # The self-conditioning product contracts each device's vocabulary slice (it gathered the embedding whole
    # on every mesh that splits it, given logits split over rows only).
    assert hlo["embedding_all_gathers"] == []


def test_fp8_experts_run_expert_parallel(report: dict) -> None:
    result = report["meshes"]["1,4,2"]
    assert result["fp8_logits_max_diff"] <= TOLERANCE
    assert result["fp8_hlo"]["counts"]["all-to-all"] > 0
    assert result["fp8_hlo"]["expert_weight_all_gathers"] == []  # dequantized where they lie, not gathered
    assert result["fp8_hlo"]["embedding_all_gathers"] == []


def test_sharded_train_step_equals_single_device(report: dict) -> None:
    result = report["meshes"]["2,2,2"]
    assert report["reference"]["updated_params_moved"] > 1e-2  # the step changes the weights
    assert result["loss_diff"] <= TOLERANCE
    assert result["grad_norm_diff"] <= 1e-4
    assert result["updated_params_max_diff"] <= TOLERANCE


def test_cli_generates_on_a_mesh_what_it_does_on_one_device(report: dict) -> None:
    """`diffjax generate --mesh 1,4,2`: the demo model's weights on their shards (its 8 experts one per device),
    experts expert-parallel, prints the single-device answer (tests/test_cli.py::test_generate_default_model_sorts)."""
    cli = report["cli"]
    assert cli["exit_status"] == 0, cli["stderr"]
    assert cli["params_on_their_shards"] and cli["experts_per_device"] == 1
    assert cli["answer"] == "0124579\n"


def test_bad_inputs_on_a_mesh_are_named(report: dict) -> None:
    errors = report["errors"]
    assert errors["uneven_batch"] == "batch axis 3 is not divisible by the mesh's data axis (8)"
    assert errors["uneven_cache"] == "cache batch 3 is not divisible by the mesh's data axis (8)"
    assert "4 experts cannot be split evenly over an expert group of 8 devices" in errors["experts_not_divisible"]
    assert "mesh axes must be ('data', 'expert', 'model')" in errors["foreign_mesh"]


# ------------------------------------------------------------------------------------------- in-process


def test_partition_rules_of_the_released_model() -> None:
    config = Config.diffusiongemma_26b_a4b()
    mesh = AbstractMesh((2, 4, 2), sharding.AXES)
    specs = sharding.param_specs(config, mesh)
    layer = specs["blocks"]["layer_0"]  # sliding: 8 kv heads, split over model
    assert specs["embedder"]["embedding"] == P(sharding.EXPERT_GROUP, None)
    assert layer["experts"]["gate_up_proj"] == P(None, sharding.EXPERT_GROUP, None, None)
    assert layer["self_attn"]["q_proj"]["kernel"] == P(None, None, "model")
    assert layer["self_attn"]["k_proj"]["kernel"] == P(None, None, "model")
    assert layer["self_attn"]["o_proj"]["kernel"] == P(None, "model", None)
    assert layer["mlp"]["down_proj"]["kernel"] == P(None, "model", None)
    assert layer["router"]["proj"]["kernel"] == P(None, None, None)
    assert specs["self_conditioning"]["mlp"]["gate_proj"]["kernel"] == P(None, "model")
    # The full layers' 2 kv heads cannot be split 4 ways: replicated rather than cut inside a head.
    wide = sharding.param_specs(config, AbstractMesh((1, 2, 4), sharding.AXES))
    assert wide["blocks"]["layer_5"]["self_attn"]["k_proj"]["kernel"] == P(None, None, None)
    assert jax.tree.structure(specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(param_shapes(config))
    # fp8 experts: the scales are split with their weights.
    fp8 = config.replace(expert_quantization="fp8")
    fp8_specs = sharding.param_specs(fp8, mesh)
    fp8_experts = fp8_specs["blocks"]["layer_0"]["experts"]
    assert fp8_experts["gate_up_proj_scale"] == fp8_experts["down_proj_scale"] == P(None, sharding.EXPERT_GROUP, None)
    assert jax.tree.structure(fp8_specs, is_leaf=lambda x: isinstance(x, P)) == jax.tree.structure(param_shapes(fp8))


def test_expert_mesh_divides_the_released_model_bytes() -> None:
    config = Config.diffusiongemma_26b_a4b()
    total = sharding.param_bytes_per_device(config, AbstractMesh((1, 1, 1), sharding.AXES))
    per_device = sharding.param_bytes_per_device(config, AbstractMesh((1, 8, 1), sharding.AXES))
    shapes = param_shapes(config)
    experts = sum(x.size for path, x in jax.tree_util.tree_leaves_with_path(shapes)
                  if "experts" in jax.tree_util.keystr(path)) * 2
    embedding = shapes["embedder"]["embedding"].size * 2
    assert per_device == total - (experts + embedding) * 7 // 8
    # fp8 experts: one byte per expert weight plus a float32 scale per output column.
    fp8 = config.replace(expert_quantization="fp8")
    scales = 4 * config.num_layers * config.num_experts * (2 * config.moe_intermediate_size + config.hidden_size)
    fp8_total = sharding.param_bytes_per_device(fp8, AbstractMesh((1, 1, 1), sharding.AXES))
    assert fp8_total == total - experts // 2 + scales


def test_constrain_pins_only_under_a_diffjax_mesh() -> None:
    """No mesh, a mesh of other axis names, or one of Explicit axes: the array as it is (the model runs there
    unchanged); under `make_mesh`'s mesh, a sharding constraint with the spec fitted to the shape."""
    x = jnp.arange(12.0).reshape(3, 4)
    assert sharding.split_over_vocab(x) is x and sharding.rows_over_data(x) is x
    foreign = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,), devices=jax.devices()[:1])
    explicit = jax.make_mesh((1, 1, 1), sharding.AXES, axis_types=(jax.sharding.AxisType.Explicit,) * 3,
                             devices=jax.devices()[:1])
    for mesh in (foreign, explicit):
        with jax.set_mesh(mesh):
            assert jax.jit(lambda a: sharding.split_over_vocab(a) * 2)(x).tolist() == (x * 2).tolist()
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
        text = jax.jit(lambda a: (sharding.split_over_vocab(a), sharding.rows_over_data(a[None]))).lower(x).as_text()
    assert text.count("sharding_constraint") == 2, text
    assert sharding.rows_over_data(jnp.ones(3)).shape == (3,)  # a single row: nothing to split


def test_make_mesh_rejects_a_wrong_device_count() -> None:
    with pytest.raises(ValueError, match="needs 2 devices, got 1"):
        sharding.make_mesh(data=2, devices=jax.devices()[:1])
    with pytest.raises(ValueError, match="'model' must be a positive integer"):
        sharding.make_mesh(model=0)


def test_expert_parallel_needs_a_mesh() -> None:
    x, weights, ids = jnp.ones((4, 8)), jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32)
    with pytest.raises(ValueError, match="needs a \\(data, expert, model\\) mesh"):
        sharding.experts_expert_parallel(x, weights, ids, jnp.ones((4, 8, 6)), jnp.ones((4, 3, 8)))


def test_expert_parallel_on_a_one_device_mesh_is_the_grouped_moe() -> None:
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (6, 8))
    weights = jax.random.uniform(keys[1], (6, 2))
    ids = jax.random.randint(keys[2], (6, 2), 0, 4)
    gate_up, down = jax.random.normal(keys[3], (4, 8, 6)), jax.random.normal(keys[4], (4, 3, 8))
    with jax.set_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
        out = sharding.experts_expert_parallel(x, weights, ids, gate_up, down)
    assert jnp.array_equal(out, experts_grouped(x, weights, ids, gate_up, down))
