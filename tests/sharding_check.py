"""Sharded runs against the single-device run, on 8 forced CPU devices; prints one JSON report.

Run by tests/test_sharding.py in a subprocess, because the device count is fixed when jax starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_check.py

For each mesh (data, expert, model): the parameters are loaded from a transformers-format folder straight
onto the mesh (`convert.load_hf(mesh=...)`), then a decoder pass (compiled once, its HLO inspected),
`generate` and one `train_step` run with the expert-parallel MoE and are compared with the same calls on
one device with the grouped MoE; on one mesh also a decoder pass with fp8 experts.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import convert
from diffjax import model, sharding, train
from diffjax.config import FULL, SLIDING, Config
from diffjax.generate import generate
from diffjax.quantize import quantize_experts

MESHES = ((8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2))
# A training step compiles for ~20 s of CPU per mesh: by default it runs on the mesh that uses all three axes
# (--train-all: on all four).
TRAIN_MESHES = ((2, 2, 2),)
# fp8 experts (`diffjax.quantize`) run through the expert-parallel MoE on one mesh: one more decoder compile.
FP8_MESH = (1, 4, 2)
# generate(statistics="pallas"): the vocabulary kernel as a shard_map (interpreted on CPU), on the mesh that
# splits both the vocabulary and the rows.
FUSED_MESHES = ((2, 2, 2),)
BATCH, PROMPT = 8, 5  # the odd prompt length makes the MoE pad its tokens


def lap(what: str) -> None:
    """Progress on stderr: wall and CPU seconds since start."""
    print(f"{what}: {time.perf_counter():.0f}s wall, {time.process_time():.0f}s cpu", file=sys.stderr)


def spread(params: dict) -> dict:
    """Weights ~ N(0, 0.05) instead of 0.02 (logits further apart: no near-ties), norms and scalars 1 + noise.

    Drawn with numpy: a jax draw would compile once per leaf shape."""
    rng = np.random.default_rng(7)
    return jax.tree.map(lambda x: jnp.asarray(
        1.0 + 0.1 * rng.standard_normal(x.shape, np.float32) if bool(np.all(np.asarray(x) == 1))
        else 2.5 * np.asarray(x)), params)


def max_diff(a, b) -> float:
    """Max |a - b| over all leaves, on the host (no compile per leaf shape)."""
    return max(float(np.max(np.abs(np.asarray(x, np.float32) - np.asarray(y, np.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def all_gathers_of(hlo: str, *dims: str) -> list[str]:
    """The all-gathers of a compiled module whose result's dims end with one of `dims` ("512,64")."""
    # e.g. `%all-gather.3 = f32[2,8,64,64]{3,2,1,0} all-gather(...)`
    result = re.compile(r"= \w+\[([\d,]*)\]\S* all-gather(-start)?\(")
    return [line.strip()[:160] for line in hlo.splitlines()
            if (m := result.search(line)) and f",{m.group(1)}".endswith(tuple(f",{d}" for d in dims))]


def collectives(hlo: str, config: Config) -> dict:
    """Counts of the collectives in a compiled module, and any all-gather producing a whole expert weight."""
    e, h, i = config.num_experts, config.hidden_size, config.moe_intermediate_size
    counts = {op: len(re.findall(rf"\b{op}(-start)?\(", hlo))
              for op in ("all-to-all", "all-reduce", "reduce-scatter", "all-gather")}
    return {"counts": counts, "expert_weight_all_gathers": all_gathers_of(hlo, f"{e},{h},{2 * i}", f"{e},{i},{h}"),
            "embedding_all_gathers": all_gathers_of(hlo, f"{config.vocab_size},{h}")}


def vocab_pass_collectives(params: dict, config: Config, mesh) -> dict:
    """Collectives of the fused vocabulary pass on the mesh, and any all-gather rebuilding the embedding."""
    from diffjax.kernels.vocab import vocab_stats_pallas

    embedding = params["embedder"]["embedding"]
    hidden = sharding.shard_batch(jnp.ones((BATCH, config.canvas_length, config.hidden_size), jnp.float32), mesh)
    compiled = jax.jit(lambda h, e: vocab_stats_pallas(h, e, 0.7, seed=1, softcap=30.0, return_logits=True)).lower(
        hidden, embedding).compile()
    text = compiled.as_text()
    return {
        "all_gathers": len(re.findall(r"\ball-gather(-start)?\(", text)),
        "embedding_all_gathers": all_gathers_of(text, f"{config.vocab_size},{config.hidden_size}"),
    }


def random_cache(config: Config) -> model.KVCache:
    """A filled cache (random K/V, rows left-padded by 0..2 slots) without compiling the encoder."""
    capacity = PROMPT + config.canvas_length
    cache = model.init_cache(config, BATCH, capacity)
    rng = np.random.default_rng(8)
    kv = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape, np.float32)), (cache.keys, cache.values))
    mask = np.arange(capacity)[None, :] >= (np.arange(BATCH) % 3)[:, None]
    return model.KVCache(keys=kv[0], values=kv[1], mask=jnp.asarray(mask), length=jnp.asarray(PROMPT + 3, jnp.int32))


def main(train_meshes: tuple[tuple[int, int, int], ...]) -> None:
    assert jax.device_count() == 8, "run with XLA_FLAGS=--xla_force_host_platform_device_count=8"
    config = Config.tiny(num_layers=4, layer_types=(SLIDING, FULL, SLIDING, FULL), canvas_length=8)
    parallel = config.replace(moe_implementation="expert_parallel")
    params = spread(model.init_params(config, jax.random.key(0)))
    lap("params")
    folder = tempfile.mkdtemp()
    convert.save_hf(params, config, folder, overwrite=True)
    _, params = convert.load_hf(folder)  # the single-device reference reads the same file

    rng = np.random.default_rng(1)
    ids = jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, PROMPT), np.int32))
    canvas = jnp.asarray(rng.integers(0, config.vocab_size, (BATCH, config.canvas_length), np.int32))
    sc_logits = jnp.asarray(3.0 * rng.standard_normal((BATCH, config.canvas_length, config.vocab_size), np.float32))
    sc_mask = jnp.asarray(np.arange(BATCH) % 3 != 0)
    cache = random_cache(config)
    gen_kwargs = dict(key=jax.random.key(4), max_new_tokens=2 * config.canvas_length, max_denoising_steps=3)
    rng = np.random.default_rng(5)
    batch = train.make_batch(
        config, [rng.integers(3, 500, n).tolist() for n in range(1, BATCH + 1)],
        [rng.integers(3, 500, n).tolist() for n in range(2, 2 * BATCH + 2, 2)], prompt_length=3, num_canvases=2,
    )
    noise = train.draw_noise(jax.random.key(6), batch, config)
    optimizer = optax.sgd(0.1)  # plain SGD: the update is the gradient itself, compared as is

    lap("inputs")
    ref_logits = model.denoise_logits(params, config, cache, canvas, sc_logits, sc_mask)
    lap("reference logits")
    ref_gen = generate(params, config, ids, **gen_kwargs)
    ref_fused = generate(params, config, ids, statistics="pallas", **gen_kwargs)
    lap("reference generation")
    ref_params, _, ref_metrics = train.train_step(
        jax.tree.map(jnp.copy, params), optimizer.init(params), config, optimizer, batch, noise
    )
    fp8 = parallel.replace(expert_quantization="fp8")
    fp8_params = quantize_experts(params)
    ref_fp8_logits = model.denoise_logits(
        fp8_params, config.replace(expert_quantization="fp8"), cache, canvas, sc_logits, sc_mask
    )
    lap("reference")
    report: dict = {"meshes": {}, "reference": {
        "max_abs_logit": float(jnp.max(jnp.abs(ref_logits))), "loss": float(ref_metrics["loss"]),
        "updated_params_moved": max_diff(ref_params, params),
    }}
    for shape in MESHES:
        mesh = sharding.make_mesh(*shape)
        result: dict = {}
        with jax.set_mesh(mesh):
            _, sharded = convert.load_hf(folder, mesh=mesh)
            result["load_max_diff"] = max_diff(sharded, params)
            expected = sharding.param_shardings(parallel, mesh)
            result["load_shardings_match"] = all(
                a.sharding.is_equivalent_to(s, a.ndim)
                for a, s in zip(jax.tree.leaves(sharded), jax.tree.leaves(expected), strict=True))
            result["expert_shard_shape"] = list(
                sharded["blocks"]["layer_0"]["experts"]["gate_up_proj"].addressable_shards[0].data.shape)

            args = (sharded, sharding.shard_cache(cache, parallel, mesh), sharding.shard_batch(canvas, mesh),
                    sharding.shard_batch(sc_logits, mesh), sharding.shard_batch(sc_mask, mesh))
            compiled = model._denoise_logits.lower(args[0], parallel, *args[1:]).compile()
            result["hlo"] = collectives(compiled.as_text(), config)
            result["logits_max_diff"] = max_diff(compiled(*args), ref_logits)

            # Compiled ahead (the one compile the call would make) to read which arrays it gathers whole.
            compiled = jax.jit(lambda p, i: generate(p, parallel, i, **gen_kwargs)).lower(
                sharded, sharding.shard_batch(ids, mesh)).compile()
            text = compiled.as_text()
            result["generate_whole_gathers"] = all_gathers_of(
                text, f"{config.vocab_size},{config.hidden_size}", f"{BATCH},{config.canvas_length},{config.vocab_size}")
            result["lm_head_gathers"] = [line.strip()[:160] for line in text.splitlines()
                                         if re.search(r"\ball-gather(-start)?\(", line) and "embedder.logits" in line]
            result["lm_head_named"] = "embedder.logits" in text  # the names the check reads exist
            out = compiled(sharded, sharding.shard_batch(ids, mesh))
            result["tokens_equal"] = bool(np.array_equal(out.sequences, ref_gen.sequences))
            result["passes_equal"] = bool(np.array_equal(out.decoder_passes, ref_gen.decoder_passes))

            if shape in FUSED_MESHES:
                out = generate(sharded, parallel, sharding.shard_batch(ids, mesh), statistics="pallas", **gen_kwargs)
                result["fused_tokens_equal"] = bool(np.array_equal(out.sequences, ref_fused.sequences))
                result["fused_passes_equal"] = bool(np.array_equal(out.decoder_passes, ref_fused.decoder_passes))
                result["fused_hlo"] = vocab_pass_collectives(sharded, config, mesh)

            if shape == FP8_MESH:
                placed = sharding.shard_params(fp8_params, fp8, mesh)
                compiled = model._denoise_logits.lower(placed, fp8, *args[1:]).compile()
                result["fp8_hlo"] = collectives(compiled.as_text(), config)
                result["fp8_logits_max_diff"] = max_diff(compiled(placed, *args[1:]), ref_fp8_logits)

            if shape in train_meshes:
                new_params, _, metrics = train.train_step(
                    sharded, optimizer.init(sharded), parallel, optimizer, sharding.shard_batch(batch, mesh),
                    sharding.shard_batch(noise, mesh),
                )
                result["loss_diff"] = abs(float(metrics["loss"]) - float(ref_metrics["loss"]))
                result["grad_norm_diff"] = abs(float(metrics["grad_norm"]) - float(ref_metrics["grad_norm"]))
                result["updated_params_max_diff"] = max_diff(new_params, ref_params)
        report["meshes"][",".join(map(str, shape))] = result
        lap(f"mesh {shape}")
    report["errors"] = bad_input_errors()
    report["cli"] = cli_on_a_mesh((1, 4, 2))
    json.dump(report, sys.stdout)


def cli_on_a_mesh(shape: tuple[int, int, int]) -> dict:
    """What `diffjax generate --mesh` prints for the demo model, and whether the weights it loads lie on the
    mesh as the partition rules place them."""
    from diffjax import cli

    mesh = sharding.make_mesh(*shape)
    demo = cli.default_model(mesh=mesh)
    placed = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in zip(
        jax.tree.leaves(demo.params), jax.tree.leaves(sharding.param_shardings(demo.config, mesh)), strict=True))
    printed, errors = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(printed), contextlib.redirect_stderr(errors):
        code = cli.main(["generate", "--no-live", "--no-compile-cache", "--mesh", ",".join(map(str, shape)), "9402751"])
    return {"answer": printed.getvalue(), "exit_status": code, "stderr": errors.getvalue()[-2000:],
            "params_on_their_shards": placed,
            "experts_per_device": demo.params["blocks"]["layer_0"]["experts"]["gate_up_proj"].addressable_shards[0]
            .data.shape[1]}


def bad_input_errors() -> dict[str, str]:
    """The messages of inputs a mesh cannot take (raised before anything compiles)."""
    mesh = sharding.make_mesh(1, 8, 1)
    attempts = {
        "uneven_batch": lambda: sharding.shard_batch(jnp.zeros((3, 2)), sharding.make_mesh(8, 1, 1)),
        "uneven_cache": lambda: sharding.shard_cache(model.init_cache(Config.tiny(), 3, 4), Config.tiny(),
                                                     sharding.make_mesh(8, 1, 1)),
        "experts_not_divisible": lambda: sharding.experts_expert_parallel(
            jnp.ones((4, 8)), jnp.ones((4, 2)), jnp.zeros((4, 2), jnp.int32), jnp.ones((4, 8, 6)),
            jnp.ones((4, 3, 8))),
        "foreign_mesh": lambda: sharding.param_specs(Config.tiny(), jax.make_mesh((8,), ("x",))),
    }
    messages = {}
    for name, attempt in attempts.items():
        try:
            with jax.set_mesh(mesh):
                attempt()
            messages[name] = "no error"
        except ValueError as exc:
            messages[name] = str(exc)
    return messages


if __name__ == "__main__":
    main(MESHES if "--train-all" in sys.argv else TRAIN_MESHES)
