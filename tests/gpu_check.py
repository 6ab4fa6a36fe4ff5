"""Correctness of the GPU-only paths at the released sizes, on a GPU; prints one JSON line per check.

    PYTHONPATH=. python tests/gpu_check.py          # on the GPU machine (about 1 minute, ~30 GB of memory)
    PYTHONPATH=. python tests/gpu_check.py --small  # the same checks at toy sizes (CPU: kernels interpreted)

CPU tests cover the maths of every kernel in interpret mode and their CUDA lowering; what only a GPU shows:
0. The minimal form of the JAX offset bug (a 1-byte ref of more than 2**31 elements read past 2**31), with
   diffjax's wrapper (correct) and, in a child process, without it (expected: wrong bytes or a fault).
1. `experts_pallas` and `experts_mgpu` (bf16 also on 8 canvases) reading block `b` in place from a
   released-size `[5, 128, 2816, 1408]` stack, bf16 and fp8 (2.54e9 one-byte weights: the stack whose 32-bit offsets wrapped, see `diffjax.kernels.WIDE_OFFSETS`),
   against `experts_grouped` on that block's (dequantized) weights, for the first and the last block.
2. The decoder's sliding layers through cuDNN and the split-K kernel (`sliding_attention_implementation=
   "cudnn"` / "pallas"): at kernel level against `attend` on the released sliding shapes, then the whole
   decoder in bf16, each path against the same decoder in float32 (the reference the bf16 error of every
   path is measured from).
3. The load-time layouts (fused projections, unstacked blocks; `diffjax.layout`) through the GPU kernels on a
   three-block toy decoder in float32: the same logits as the separate, stacked model, looped and unrolled.
4. The routing kernels (`diffjax.kernels.routing`) at the released router's shapes against their twins.
5. The attention inputs kernel (`attention_inputs_pallas`: q/k/v norms and RoPE from the fused projection)
   at the released shapes of both layer types, and the feed-forward inputs kernel (`moe_inputs_pallas`) at the
   released hidden size on 8 canvases, bf16 and float32, against their twins.
6. The dense MLP in the expert launches (`experts_pallas(..., mlp=...)`, `Config.mlp_implementation=
   "pallas"`) at the released sizes, on 1 and 8 canvases, reading a block of the stacks in place: the MLP's
   output against `mlp_reference`, the experts' against the kernels without the MLP (bit for bit); then the
   experts' rows unsummed into the outputs kernel (`feedforward_outputs_pallas`, with the next layer's norm)
   against its twin.
"""

from __future__ import annotations

import functools
import json
import os
import sys

# The twins round where their code rounds (as in the CPU tests, tests/conftest.py): by default XLA on a GPU may
# keep a bf16 intermediate in float32, which made the router's twin pick other experts than the kernel and
# transformers (96% of the ids equal on the H200).
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_allow_excess_precision=false").strip()

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.config import AttentionConfig, Config
from diffjax.kernels.attention import attention_inputs_pallas, global_attention_pallas
from diffjax.kernels.moe import MlpInputs, experts_pallas, mlp_reference
from diffjax.kernels.moe_mgpu import experts_mgpu
from diffjax.kernels.norms import feedforward_outputs_pallas, moe_inputs_pallas
from diffjax.layers import (
    attend,
    attend_cudnn,
    attention_inputs,
    experts_grouped,
    feedforward_outputs,
    moe_inputs,
    rms_norm,
    rope_inverse_frequencies,
)
from diffjax.model import _denoise_logits, init_cache, init_params, prefill
from diffjax.quantize import dequantize, quantize


def relative_l2(ours: jax.Array, reference: jax.Array) -> float:
    ours, reference = np.asarray(ours, np.float32), np.asarray(reference, np.float32)
    return float(np.linalg.norm(ours - reference) / np.linalg.norm(reference))


def report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def check_expert_stacks(small: bool) -> None:
    cfg = Config.diffusiongemma_26b_a4b()
    blocks, experts, hidden, inter, tokens, k = 5, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, 256, 8
    if small:
        blocks, experts, hidden, inter, tokens, k = 3, 8, 64, 32, 32, 2
    keys = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(keys[0], (tokens, hidden), jnp.bfloat16)
    weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (tokens, experts))), k)
    gate_up = 0.05 * jax.random.normal(keys[2], (blocks, experts, hidden, 2 * inter), jnp.bfloat16)
    down = 0.05 * jax.random.normal(keys[3], (blocks, experts, inter, hidden), jnp.bfloat16)
    for block in (0, blocks - 1):
        twin = experts_grouped(x, weights, ids, gate_up[block], down[block])
        for name, kernel in (("experts_pallas", experts_pallas), ("experts_mgpu", experts_mgpu)):
            ours = kernel(x, weights, ids.astype(jnp.int32), gate_up, down, jnp.int32(block))
            report(check=f"{name} bf16 stack, block in place", block=block, relative_l2=relative_l2(ours, twin),
                   finite=bool(jnp.isfinite(ours).all()))
    # Batch 8's canvases: ~128 rows per expert, groups spanning row blocks (the Mosaic kernels' ladder stores).
    x8 = jax.random.normal(keys[0], (8 * tokens, hidden), jnp.bfloat16)
    weights8, ids8 = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[1], (8 * tokens, experts))), k)
    ours = experts_mgpu(x8, weights8, ids8.astype(jnp.int32), gate_up, down, jnp.int32(blocks - 1))
    twin = experts_grouped(x8, weights8, ids8, gate_up[blocks - 1], down[blocks - 1])
    report(check="experts_mgpu bf16 stack, 8 canvases", relative_l2=relative_l2(ours, twin),
           finite=bool(jnp.isfinite(ours).all()))
    quantize_stack = jax.jit(quantize)  # one fused pass: eager float32 temporaries of a 2.5e9 stack add up
    q_gate_up, s_gate_up = quantize_stack(gate_up)
    del gate_up
    q_down, s_down = quantize_stack(down)
    del down
    for block in (0, blocks - 1):
        twin = experts_grouped(x, weights, ids, dequantize(q_gate_up[block], s_gate_up[block], jnp.bfloat16),
                               dequantize(q_down[block], s_down[block], jnp.bfloat16))
        for name, kernel in (("experts_pallas", experts_pallas), ("experts_mgpu", experts_mgpu)):
            ours = kernel(x, weights, ids.astype(jnp.int32), q_gate_up, q_down, jnp.int32(block),
                          gate_up_scale=s_gate_up, down_scale=s_down)
            report(check=f"{name} fp8 stack, block in place", block=block, weights=int(q_gate_up.size),
                   relative_l2=relative_l2(ours, twin), finite=bool(jnp.isfinite(ours).all()))


def check_mlp_in_expert_launches(small: bool) -> None:
    cfg = Config.diffusiongemma_26b_a4b()
    blocks, experts, hidden, inter, mlp_inter, k = 2, cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, \
        cfg.intermediate_size, cfg.top_k_experts
    if small:
        blocks, experts, hidden, inter, mlp_inter, k = 2, 8, 64, 32, 48, 2
    keys = jax.random.split(jax.random.key(5), 7)
    gate_up = 0.05 * jax.random.normal(keys[0], (blocks, experts, hidden, 2 * inter), jnp.bfloat16)
    down = 0.05 * jax.random.normal(keys[1], (blocks, experts, inter, hidden), jnp.bfloat16)
    mlp_gate_up = 0.05 * jax.random.normal(keys[2], (blocks, hidden, 2 * mlp_inter), jnp.bfloat16)
    mlp_down = 0.05 * jax.random.normal(keys[3], (blocks, mlp_inter, hidden), jnp.bfloat16)
    block = jnp.int32(blocks - 1)
    for canvases in (1, 8):
        tokens = canvases * (32 if small else cfg.canvas_length)
        x = jax.random.normal(keys[4], (tokens, hidden), jnp.bfloat16)
        mlp_x = jax.random.normal(keys[5], (tokens, hidden), jnp.bfloat16)
        weights, ids = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[6], (tokens, experts))), k)
        ids = ids.astype(jnp.int32)
        experts_out, mlp_out = experts_pallas(x, weights, ids, gate_up, down, block,
                                              mlp=MlpInputs(mlp_x, mlp_gate_up, mlp_down))
        alone = experts_pallas(x, weights, ids, gate_up, down, block)
        twin = mlp_reference(mlp_x.astype(jnp.float32), mlp_gate_up[-1].astype(jnp.float32),
                             mlp_down[-1].astype(jnp.float32))
        report(check="dense MLP in the expert launches", canvases=canvases,
               mlp_relative_l2=relative_l2(mlp_out, twin),
               experts_equal=bool(jnp.array_equal(experts_out, alone)), finite=bool(jnp.isfinite(mlp_out).all()))
        rows, mlp_out = experts_pallas(x, weights, ids, gate_up, down, block,
                                       mlp=MlpInputs(mlp_x, mlp_gate_up, mlp_down), sum_rows=False)
        scales = [1 + 0.2 * jax.random.normal(jax.random.key(20 + i), (hidden,), jnp.bfloat16) for i in range(4)]
        scalar = jnp.array([0.8], jnp.bfloat16)
        out, normed = feedforward_outputs_pallas(x, mlp_out, rows, k, *scales[:3], scalar, cfg.rms_norm_eps,
                                                 scales[3])
        want = feedforward_outputs(x, mlp_out, alone, *scales[:3], scalar, cfg.rms_norm_eps)
        report(check="feedforward outputs kernel on the unsummed rows", canvases=canvases,
               relative_l2=relative_l2(out, want),
               normed_relative_l2=relative_l2(normed, rms_norm(want, scales[3], cfg.rms_norm_eps)),
               finite=bool(jnp.isfinite(out).all() & jnp.isfinite(normed).all()))


def check_sliding_attention() -> None:
    cfg = Config.diffusiongemma_26b_a4b()
    batch, canvas, context = 2, cfg.canvas_length, cfg.sliding_window - 1 + cfg.canvas_length
    heads, kv_heads, head_dim = cfg.num_heads, cfg.sliding.num_kv_heads, cfg.sliding.head_dim
    keys = jax.random.split(jax.random.key(1), 3)
    query = jax.random.normal(keys[0], (batch, canvas, heads, head_dim), jnp.bfloat16)
    k = jax.random.normal(keys[1], (batch, context, kv_heads, head_dim), jnp.bfloat16)
    v = jax.random.normal(keys[2], (batch, context, kv_heads, head_dim), jnp.bfloat16)
    row = jnp.arange(context)[None, :] >= jnp.array([[0], [300]])  # row 1: 300 padded ring slots
    mask = jnp.broadcast_to(row[:, None, :], (batch, canvas, context))
    reference = attend(query, k, v, mask)
    report(check="cudnn sliding attention vs attend, released shapes", relative_l2=relative_l2(
        attend_cudnn(query, k, v, mask), reference))
    report(check="split-K (pallas) sliding attention vs attend, released shapes", relative_l2=relative_l2(
        global_attention_pallas(query, k, v, row), reference))

    tiny = Config.tiny(sliding=AttentionConfig(head_dim=64, num_kv_heads=2, rope_theta=10_000.0))
    params32 = init_params(tiny, jax.random.key(2))
    prompt = jax.random.randint(jax.random.key(3), (3, 40), 0, tiny.vocab_size)  # 40 > the 8-token window
    prompt_mask = jnp.arange(40)[None, :] >= jnp.array([[0], [5], [33]])
    canvas_ids = jax.random.randint(jax.random.key(4), (3, tiny.canvas_length), 0, tiny.vocab_size)

    def decoder_logits(params: object, config: Config, dtype: object) -> jax.Array:
        cache = init_cache(config, 3, 40 + config.canvas_length, dtype)
        cache = prefill(params, config, prompt, prompt_mask, cache, chunk_size=16)
        return _denoise_logits(params, config, cache, canvas_ids, None, None)

    reference = decoder_logits(params32, tiny, jnp.float32)
    params16 = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params32)
    for impl in ("xla", "cudnn", "pallas"):
        logits = decoder_logits(params16, tiny.replace(sliding_attention_implementation=impl), jnp.bfloat16)
        report(check="tiny decoder in bf16 vs float32", sliding_attention=impl,
               relative_l2=relative_l2(logits, reference),
               argmax_agreement=float(jnp.mean(logits.argmax(-1) == reference.argmax(-1))))


def check_load_time_layouts() -> None:
    from diffjax.layout import relayout

    config = Config.tiny(num_layers=6, layer_types=("sliding_attention", "full_attention") * 3, sliding_window=20,
                         sliding=AttentionConfig(head_dim=64, num_kv_heads=2, rope_theta=10_000.0),
                         moe_implementation="pallas", sliding_attention_implementation="pallas",
                         global_attention_implementation="pallas")
    # float32 at the highest matmul precision: in bf16 this random toy's logits move by 0.40 (relative L2) from
    # its float32 logits, so a bf16 comparison of two layouts could not tell a wrong one from rounding.
    params = init_params(config, jax.random.key(5))
    prompt = jax.random.randint(jax.random.key(6), (2, 40), 0, config.vocab_size)
    prompt_mask = jnp.arange(40)[None, :] >= jnp.array([[0], [7]])
    canvas_ids = jax.random.randint(jax.random.key(7), (2, config.canvas_length), 0, config.vocab_size)

    def logits(config: Config, params: object) -> jax.Array:
        with jax.default_matmul_precision("highest"):
            cache = prefill(params, config, prompt, prompt_mask,
                            init_cache(config, 2, 40 + config.canvas_length, jnp.float32), chunk_size=16)
            return _denoise_logits(params, config, cache, canvas_ids, None, None)

    reference = logits(config, params)
    for projections, blocks, unroll in (("fused", "stacked", 3), ("separate", "unstacked", 1),
                                        ("fused", "unstacked", 1)):
        laid_config, laid = relayout(config.replace(scan_unroll=unroll), params, projections, blocks)
        ours = logits(laid_config, laid)
        report(check="toy decoder, load-time layout vs separate stacked (float32, kernels)", projections=projections,
               blocks=blocks, scan_unroll=unroll, relative_l2=relative_l2(ours, reference),
               argmax_agreement=float(jnp.mean(ours.argmax(-1) == reference.argmax(-1))))


def check_routing(small: bool) -> None:
    """The routing kernels at the released router's shapes (batch 1 and 8; --small: 8 experts) on random bf16
    hidden states: the router kernel against `route` (ids may differ where two bf16 scores tie within the
    rounding of the projection's sums), the layout kernel against its twin."""
    from diffjax.kernels.moe import row_tile
    from diffjax.kernels.routing import expert_rows_pallas, expert_rows_reference, route_pallas
    from diffjax.layers import route

    cfg = Config.diffusiongemma_26b_a4b()
    experts, k = (8, 2) if small else (cfg.num_experts, cfg.top_k_experts)
    for batch in (1, 8):
        tokens = batch * (16 if small else cfg.canvas_length)
        keys = jax.random.split(jax.random.key(batch), 4)
        hidden = jax.random.normal(keys[0], (tokens, cfg.hidden_size), jnp.bfloat16)
        router_scale = jax.random.uniform(keys[1], (cfg.hidden_size,), jnp.bfloat16, minval=0.5, maxval=2.0)
        router = jax.random.normal(keys[2], (cfg.hidden_size, experts), jnp.bfloat16)
        scale = jax.random.uniform(keys[3], (experts,), minval=0.5, maxval=2.0)
        args = (hidden, router_scale, router, scale)
        weights, ids = jax.jit(route_pallas, static_argnums=4)(*args, k)
        want_weights, want_ids = jax.jit(route, static_argnums=4)(*args, k)
        block_rows = row_tile(tokens * k, experts)
        rows = expert_rows_pallas(want_ids, want_weights, experts, block_rows)
        want_rows = expert_rows_reference(want_ids, want_weights, experts, block_rows)
        layout_equal = all(bool(jnp.array_equal(getattr(rows, f)[: getattr(want_rows, f).shape[0]],
                                                getattr(want_rows, f)))
                           for f in ("row_token", "row_weights", "row_assignment", "tile_expert"))
        report(check="routing kernels vs twins (bf16)", batch=batch, experts=experts, k=k,
               ids_equal=float(jnp.mean(ids == want_ids)),
               weights_max_abs=float(jnp.abs(weights - want_weights).max()), layout_equal=layout_equal)


def read_past_2_31(start: int) -> bool:
    """Whether a Pallas kernel reads 128 bytes at `start` of a 2**31 + 4096-byte uint8 array correctly: the
    minimal form of the wrapped-offset bug (`diffjax.kernels.WIDE_OFFSETS`), for an upstream report."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    size = 2**31 + 4096
    data = (jnp.arange(size, dtype=jnp.uint32) % 251).astype(jnp.uint8)

    def kernel(start_ref, data_ref, out_ref):
        out_ref[...] = data_ref[pl.ds(start_ref[0], 128)]

    out = pl.pallas_call(kernel, out_shape=jax.ShapeDtypeStruct((128,), jnp.uint8),
                         in_specs=[pl.no_block_spec] * 2,
                         compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),  # Triton
                         )(jnp.array([start], jnp.uint32), data)  # past int32's range
    expected = (np.arange(start, start + 128, dtype=np.uint64) % 251).astype(np.uint8)
    return bool(np.array_equal(np.asarray(out), expected))


def check_attention_inputs(small: bool) -> None:
    cfg = Config.tiny() if small else Config.diffusiongemma_26b_a4b()
    for kind, attention, values in (("full", cfg.full, False), ("sliding", cfg.sliding, True)):
        q_width, kv_width = cfg.num_heads * attention.head_dim, attention.num_kv_heads * attention.head_dim
        offsets = (0, q_width, q_width + kv_width * values)
        keys = jax.random.split(jax.random.key(7), 3)
        projections = 3 * jax.random.normal(keys[0], (2, cfg.canvas_length, q_width + (1 + values) * kv_width))
        scales = [1 + 0.3 * jax.random.normal(k, (attention.head_dim,)) for k in keys[1:]]
        positions = 1000 + jnp.arange(cfg.canvas_length, dtype=jnp.int32)
        for dtype in (jnp.bfloat16, jnp.float32):
            args = ((projections.astype(dtype),) * 3, offsets, cfg.num_heads, attention.num_kv_heads,
                    *(s.astype(dtype) for s in scales), positions, rope_inverse_frequencies(attention),
                    cfg.rms_norm_eps)
            ours, twin = attention_inputs_pallas(*args), attention_inputs(*args)
            report(check="attention inputs kernel vs its twin", layers=kind, dtype=jnp.dtype(dtype).name,
                   relative_l2=[relative_l2(a, b) for a, b in zip(ours, twin, strict=True)])
    keys = jax.random.split(jax.random.key(8), 5)
    shape = (1 if small else 8, cfg.canvas_length, cfg.hidden_size)
    activations = [scale * jax.random.normal(k, shape) for scale, k in zip((4, 2), keys[:2], strict=True)]
    scales = [1 + 0.3 * jax.random.normal(k, (cfg.hidden_size,)) for k in keys[2:]]
    for dtype in (jnp.bfloat16, jnp.float32):
        args = [a.astype(dtype) for a in (*activations, *scales)]
        ours, twin = moe_inputs_pallas(*args, cfg.rms_norm_eps), moe_inputs(*args, cfg.rms_norm_eps)
        report(check="feed-forward inputs kernel vs its twin", dtype=jnp.dtype(dtype).name,
               relative_l2=[relative_l2(a, b) for a, b in zip(ours, twin, strict=True)])


def check_wide_offsets() -> None:
    """With the wrapper, here; without it, in a child process (a faulting kernel poisons its CUDA context)."""
    import subprocess

    start = 2**31 + 1024
    report(check="uint8 ref past 2**31, diffjax's 64-bit offsets", correct=read_past_2_31(start))
    child = subprocess.run([sys.executable, __file__, "--jax-offsets-only"], capture_output=True, text=True,
                           timeout=300)
    report(check="uint8 ref past 2**31, JAX's own offsets", returncode=child.returncode,
           output=(child.stdout.strip() or child.stderr.strip()[-300:]))


if __name__ == "__main__":
    if "--jax-offsets-only" in sys.argv[1:]:
        from jax._src.pallas.triton import lowering

        lowering._compute_offsets_from_indices = lowering._compute_offsets_from_indices.wrapped
        print(json.dumps({"correct": read_past_2_31(2**31 + 1024)}))
        sys.exit(0)
    small = "--small" in sys.argv[1:]
    # Newest kernels first: a device call's time limit may stop this script before the end.
    checks = [functools.partial(check_mlp_in_expert_launches, small), functools.partial(check_routing, small),
              functools.partial(check_attention_inputs, small),
              check_load_time_layouts, functools.partial(check_expert_stacks, small)]
    if jax.default_backend() == "gpu":
        checks += [check_sliding_attention, check_wide_offsets]
    else:
        report(check="sliding attention (cudnn, pallas)", skipped="no GPU backend")
    failed = False
    for check in checks:
        try:
            check()
        except Exception as exc:  # one check failing on the GPU must not cost the others their report
            failed = True
            name = getattr(check, "func", check).__name__
            report(check=name, error=f"{type(exc).__name__}: {str(exc)[:500]}")
    sys.exit(1 if failed else 0)
