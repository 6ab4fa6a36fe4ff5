"""GPU micro-benchmark of the kernels against their plain-JAX twins at the released 26B-A4B shapes.

    python -m diffjax.kernels.bench --out kernels.json          # on the GPU, bf16, < 3 minutes on an H100
    python -m diffjax.kernels.bench --tiny --out tiny.json      # CPU smoke run: tiny shapes, interpret mode

For decoder batch rows {1, 4, 8, 16} x 256 canvas tokens it times, best of `--repeats` warm samples of
`--calls` calls queued back to back (the device's time per call, not one call's dispatch and wait):

* `moe`: one layer's experts (128 experts top-8, hidden 2816, inter 704) as the Pallas kernel (`pallas`),
  `jax.lax.ragged_dot` (`ragged_dot`), ragged_dot with `--xla_gpu_experimental_use_ragged_dot_fusion`
  (`ragged_dot_fusion`, in a child process because XLA flags are process-wide) and every expert on every
  token (`dense`); `pallas_fp8` is the Pallas kernel on float8_e4m3fn experts (`diffjax.quantize`), and
  `pallas_pretiled` / `pallas_fp8_pretiled` the same on weights laid out by `moe.pretile_experts`;
  `pallas_mgpu` / `pallas_mgpu_fp8` / `pallas_mgpu_pretiled` the Mosaic GPU kernel pair of `moe_mgpu`
  (TMA + wgmma) on bf16 / fp8 / pretiled bf16 experts, `ragged_dot_mgpu` the grouped
  form through JAX's own Mosaic GPU ragged-dot example kernel (Hopper only);
* `vocab`: the LM-head statistics pass over the 262144-token vocabulary (`pallas`; `pallas_with_logits`
  also stores the bf16 logits, as `generate(statistics="pallas")` runs it) against float32 logits followed
  by the statistics (`logits_then_stats`);
* `attention`: one global layer's attention (16 query heads, 2 kv heads, head_dim 512) of the canvas over a
  prompt cache of 1K and 32K tokens plus the canvas (`pallas` split-K against `attend`);
* `sliding`: one sliding layer's attention (16 query heads, 8 kv heads, head_dim 256) of the canvas over a
  full ring of 1023 slots plus the canvas: `attend` (ours, XLA) and the split-K kernel (`pallas`) against
  `jax.nn.dot_product_attention` with XLA (`sdpa_xla`) and cuDNN (`sdpa_cudnn`);
* `routing`: one layer's router (projection onto the 128 experts and top-8) as `route_pallas` (`pallas`)
  against its XLA twin `route` (`xla`);
* `mlp`: one layer's experts and its dense MLP (inter 2112) together: the MLP's programs inside the two
  expert launches (`pallas_with_mlp`, `Config.mlp_implementation="pallas"`) against the expert kernels
  followed by the MLP in XLA (`pallas_then_xla_mlp`, three more launches), and the XLA MLP alone (`xla_mlp`).

`--sweep` instead times each Pallas kernel under the tile settings of `MOE_TILES` (`MGPU_MOE_TILES` for
`pallas_mgpu`), `VOCAB_TILES`, `ATTENTION_TILES`, `ROUTE_TILES` and `MLP_TILES` beside its defaults, and
lists the fastest per problem (`best_tiles` in the JSON), and per batch rows the winners as `--tiles` text for
`diffjax bench --full-size`, which times them in the whole step (`best_kernel_tiles`).

Each entry records ms, the bytes it must read at least (weights touched + inputs + outputs) and those bytes
over the time (GB/s, to set against the device copy bandwidth also recorded), and the multiply-adds its
problem needs (x2 FLOPs: routed tokens only for the experts) over the time (TFLOP/s: the batch-8 experts and
long-prompt attention are bound by these, not by bytes). A failing entry records its error and the others
still run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from diffjax.bench import best_time, copy_bandwidth, output_file, write_json
from diffjax.config import Config
from diffjax.kernels import largest_power_of_two_divisor
from diffjax.layers import experts_dense, experts_grouped

RAGGED_DOT_FUSION_FLAG = "--xla_gpu_experimental_use_ragged_dot_fusion=true"
# The Pallas expert kernels: (fp8 weights, pretiled weights) of each.
PALLAS_MOE_IMPLS = {"pallas": (False, False), "pallas_fp8": (True, False), "pallas_pretiled": (False, True),
                    "pallas_fp8_pretiled": (True, True)}
# The Mosaic GPU expert kernels: (fp8 weights, pretiled weights) of each.
MGPU_MOE_IMPLS = {"pallas_mgpu": (False, False), "pallas_mgpu_fp8": (True, False),
                  "pallas_mgpu_pretiled": (False, True)}
# Kernels with tile settings (`--sweep`): the Triton ones and the Mosaic GPU ones.
TILED_MOE_IMPLS = (*PALLAS_MOE_IMPLS, *MGPU_MOE_IMPLS)
MOE_IMPLS = (*TILED_MOE_IMPLS, "ragged_dot", "ragged_dot_fusion", "ragged_dot_mgpu", "dense")
SECTIONS = ("moe", "vocab", "attention", "sliding", "routing", "mlp")
# `--sweep`: tile settings tried beside each kernel's defaults (keyword arguments of its *Tiles class).
MOE_TILES = (
    # The launch order and warps before `column_tiles_first` and `warps_for`.
    {"column_tiles_first": False}, {"num_warps": 4}, {"column_tiles_first": False, "num_warps": 4},
    {"gate_up_block_k": 128}, {"num_stages": 4}, {"num_warps": 8},
    # Gate/up column tiles cannot be wider than 64: inter 704 = 11 x 64 (blocks are powers of two dividing it).
    {"gate_up_block_n": 32, "down_block_n": 64}, {"down_block_n": 64}, {"down_block_n": 256},
    # The row tile before `row_tile` sized it for busy experts (at batch 1: 16 rows, now 32), and 64 rows
    # (an H100's batch-8 sweep favoured it, with 256-wide down tiles, over the then 4-warp defaults by ~8%).
    {"block_rows": 16}, {"block_rows": 64}, {"block_rows": 64, "down_block_n": 256},
    # Transposed products (`MoeTiles.swap_ab`): weight columns on the MMA's M side, where Hopper's wgmma
    # wants >= 64, instead of the expert's 16-32 rows. The weight tile is then the MMA's A operand, which may
    # come from registers: fp8 tiles widened there no longer make the loop wait on every MMA (batch 8).
    {"swap_ab": True}, {"swap_ab": True, "block_rows": 16}, {"swap_ab": True, "block_rows": 64, "down_block_n": 256},
    {"swap_ab": True, "num_warps": 4}, {"swap_ab": True, "block_rows": 64},
    # Each program's k-loop starting at its own k-step (`MoeTiles.skew_k`): DRAM channel camping or not.
    {"skew_k": True},
)
VOCAB_TILES = (
    {"block_rows": 128, "num_warps": 8}, {"block_v": 256, "num_warps": 8},
    {"block_rows": 128, "block_v": 256, "num_warps": 8}, {"block_k": 128}, {"num_stages": 4},
    {"block_rows": 128, "block_k": 32, "num_stages": 4},
    # One row block per canvas at batch 1: the embedding is streamed once instead of once per 64 rows.
    {"block_rows": 256, "block_v": 64, "num_warps": 8}, {"block_rows": 256, "block_v": 32, "num_warps": 8},
    # The defaults use all 255 registers and spill 32 bytes outside the k-loop (`python -m
    # diffjax.kernels.codegen`); these do not.
    {"num_warps": 8}, {"block_v": 64}, {"block_v": 64, "num_warps": 8},
)
MGPU_MOE_TILES = (
    # 128-row blocks: each expert's weights streamed by half as many tiles at batch >= 8 (mean 128 rows).
    {"block_rows": 128}, {"block_rows": 128, "max_concurrent_steps": 3},
    # Ring depth: more bytes in flight per SM (batch 1 is bound by DRAM latency x bandwidth) or more blocks.
    {"max_concurrent_steps": 3}, {"max_concurrent_steps": 6}, {"block_k": 128, "max_concurrent_steps": 3},
    # Wider down tiles: fewer programs re-reading each h block; narrower: more programs for batch 1.
    {"down_block_n": 256, "max_concurrent_steps": 3}, {"down_block_n": 64},
    {"block_rows": 128, "down_block_n": 256, "max_concurrent_steps": 2},
    # Warp-specialised: a copy warpgroup and two compute warpgroups of 64 rows each.
    {"block_rows": 128, "compute_warpgroups": 2},
    {"block_rows": 128, "compute_warpgroups": 2, "down_block_n": 256, "max_concurrent_steps": 3},
)
ATTENTION_TILES = (
    {"block_k": 16, "num_warps": 4}, {"num_warps": 4, "num_stages": 1}, {"block_q": 32, "num_warps": 4},
    {"block_k": 64, "num_stages": 1},
    # Batch 8 ran the defaults at ~110 TFLOP/s on an H200 (13 of its 66 ms a step): wider blocks, fewer
    # softmax rounds per product. At head_dim 256 none spills (161-193 KiB of shared memory); at 512 they
    # do not fit and fail.
    {"block_k": 64}, {"block_q": 128}, {"block_q": 128, "block_k": 64}, {"block_k": 64, "num_stages": 3},
    # Grouped-query packing (`pack_heads`): the query heads of a kv head share a program and its key loads
    # (sliding layers: 2 a kv head; global: 8, where 64-row packs spill and 32-row ones do not). A pack wider
    # than a layer type's group fails that layer's entry.
    {"pack_heads": 2}, {"pack_heads": 2, "block_q": 128}, {"pack_heads": 8, "block_q": 32}, {"pack_heads": 8},
    # At head_dim 512 the defaults take 192 KiB of shared memory, one program per SM (`python -m
    # diffjax.kernels.codegen`); 32- and 16-row query blocks take half (mma.sync instead of wgmma).
    {"block_q": 32, "num_warps": 8}, {"block_q": 32, "block_k": 16, "num_warps": 4}, {"block_q": 16, "num_warps": 4},
)

ROUTE_TILES = (
    # Deeper pipelines: more of the router weight in flight per SM (batch 1 is one SM's bandwidth a program).
    {"num_stages": 2}, {"num_stages": 4}, {"block_hidden": 64, "num_stages": 5}, {"block_hidden": 256},
    # More, smaller programs; or fewer, larger ones at batch 8.
    {"block_tokens": 16}, {"block_tokens": 16, "num_stages": 4}, {"block_tokens": 64, "num_warps": 8},
    {"num_warps": 8},
    # The projection by XLA's matmul (many SMs share the weight), the pick alone in the kernel: two launches.
    {"project": False}, {"project": False, "block_tokens": 16},
)

MLP_TILES = (
    # The MLP's token rows x columns per program (default `moe.mlp_tile`): fewer, wider programs re-read the
    # weights from L2 less often (at batch 1, 64 x 64 costs the launch 2 of 5 programs per SM).
    {"mlp_block_rows": 64, "mlp_block_n": 32}, {"mlp_block_rows": 128, "mlp_block_n": 16},
    {"mlp_block_rows": 64, "mlp_block_n": 64}, {"mlp_block_rows": 32, "mlp_block_n": 32},
    {"mlp_block_rows": 128, "mlp_block_n": 128},
)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """Sizes of the timed problems (defaults: the released model, one layer)."""

    hidden: int
    experts: int
    top_k: int
    moe_inter: int
    mlp_inter: int
    vocab: int
    canvas: int
    heads: int
    kv_heads: int
    head_dim: int
    softcap: float | None
    sliding_kv_heads: int
    sliding_head_dim: int
    sliding_window: int

    @classmethod
    def released(cls) -> Shapes:
        c = Config.diffusiongemma_26b_a4b()
        return cls(
            hidden=c.hidden_size, experts=c.num_experts, top_k=c.top_k_experts, moe_inter=c.moe_intermediate_size,
            mlp_inter=c.intermediate_size, vocab=c.vocab_size, canvas=c.canvas_length, heads=c.num_heads,
            kv_heads=c.full.num_kv_heads, head_dim=c.full.head_dim, softcap=c.final_logit_softcapping,
            sliding_kv_heads=c.sliding.num_kv_heads, sliding_head_dim=c.sliding.head_dim,
            sliding_window=c.sliding_window,
        )

    @classmethod
    def tiny(cls) -> Shapes:
        return cls(hidden=64, experts=8, top_k=2, moe_inter=32, mlp_inter=48, vocab=512, canvas=16, heads=4,
                   kv_heads=2, head_dim=32, softcap=30.0, sliding_kv_heads=2, sliding_head_dim=16, sliding_window=24)


@dataclasses.dataclass(frozen=True)
class Settings:
    rows: tuple[int, ...] = (1, 4, 8, 16)
    prompts: tuple[int, ...] = (1024, 32768)
    sections: tuple[str, ...] = SECTIONS
    moe_impls: tuple[str, ...] = MOE_IMPLS
    repeats: int = 5
    # Calls per timed sample, queued without waiting: a sliding layer's attention takes ~0.1 ms, the scale of
    # the host's dispatch and wait around a single call.
    calls: int = 10
    tiny: bool = False
    sweep: bool = False  # time the Pallas kernels under several tile settings instead of against the twins
    seed: int = 0


def _nbytes(*arrays: Any) -> int:
    return sum(math.prod(a.shape) * np.dtype(a.dtype).itemsize for a in arrays)


def _entry(section: str, impl: str, rows: int, timed: Callable[[], tuple[float, float]], nbytes: int, flops: int,
           **extra: Any) -> dict[str, Any]:
    """Run one timing (first call s, best ms); a failure is recorded, not raised."""
    record: dict[str, Any] = {"section": section, "impl": impl, "rows": rows, **extra}
    try:
        first_s, ms = timed()
        record.update(first_call_s=first_s, ms=ms, bytes=nbytes, gb_per_s=nbytes / ms / 1e6, flops=flops,
                      tflop_per_s=flops / ms / 1e9)
    except Exception as exc:  # one broken kernel must not lose the other figures
        record["error"] = f"{type(exc).__name__}: {exc}"[:2000]
        record["traceback"] = traceback.format_exc(limit=8)[-4000:]
    return record


# --------------------------------------------------------------------------------------------- moe


def random_moe_problem(shapes: Shapes, tokens: int, seed: int) -> tuple[jax.Array, ...]:
    """Random bf16 activations, routing (top-k of random scores) and expert weights, made on the device."""
    keys = jax.random.split(jax.random.key(seed), 4)

    @jax.jit
    def make() -> tuple[jax.Array, ...]:
        x = jax.random.normal(keys[0], (tokens, shapes.hidden), jnp.bfloat16)
        scores = jax.random.normal(keys[1], (tokens, shapes.experts), jnp.float32)
        top, ids = jax.lax.top_k(scores, shapes.top_k)
        weights = jax.nn.softmax(top, axis=-1)
        gate_up = (0.02 * jax.random.normal(keys[2], (shapes.experts, shapes.hidden, 2 * shapes.moe_inter),
                                            jnp.bfloat16))
        down = 0.02 * jax.random.normal(keys[3], (shapes.experts, shapes.moe_inter, shapes.hidden), jnp.bfloat16)
        return x, weights, ids.astype(jnp.int32), gate_up, down

    return make()


def moe_flops(shapes: Shapes, tokens: int) -> int:
    """Each token through its top-k experts: gate/up `[hidden, 2 * inter]` and down `[inter, hidden]`."""
    return 2 * tokens * shapes.top_k * 3 * shapes.hidden * shapes.moe_inter


def attention_flops(shapes: Shapes, batch: int, length: int, head_dim: int) -> int:
    """Scores and the weighted sum of values, every canvas query over `length` keys."""
    return 2 * 2 * batch * shapes.canvas * shapes.heads * head_dim * length


def moe_bytes(x: jax.Array, weights: jax.Array, ids: jax.Array, gate_up: jax.Array, down: jax.Array) -> int:
    """Weights of the experts hit, the activations in and the output."""
    hit = len(np.unique(np.asarray(ids)))
    per_expert = _nbytes(gate_up, down) // gate_up.shape[0]
    return hit * per_expert + 2 * _nbytes(x) + _nbytes(weights, ids)


def _pallas_variants(make: Callable[[Any], Callable[..., Any]], tiles_class: type, candidates: Sequence[dict],
                     sweep: bool, name: str = "pallas") -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """`{name: (jitted kernel, {})}`, or with `sweep` one entry per tile candidate, the defaults first."""
    if not sweep:
        return {name: (jax.jit(make(tiles_class())), {})}
    variants = [tiles_class(), *(tiles_class(**c) for c in candidates)]
    return {f"{name}[{i}]": (jax.jit(make(t)), {"tiles": dataclasses.asdict(t)}) for i, t in enumerate(variants)}


def _time_all(section: str, rows: int, args: tuple, nbytes: int, flops: int,
              impls: dict[str, tuple[Callable[..., Any], dict[str, Any]]], s: Settings,
              log: Callable[[str], None], **problem: Any) -> list[dict[str, Any]]:
    out = []
    for impl, (fn, extra) in impls.items():
        name = " ".join([section, impl, f"rows={rows}", *(f"{k}={v}" for k, v in problem.items())])
        log(name)

        def timed(fn: Callable[..., Any] = fn) -> tuple[float, float]:
            first_s, best_s = best_time(lambda: fn(*args), s.repeats, s.calls)
            return first_s, 1e3 * best_s

        out.append(_entry(section, impl, rows, timed, nbytes, flops, **problem, **extra))
        # Each result as it comes: a run cut short by a time limit keeps what it measured in its log.
        log(f"{name}: " + (f"{out[-1]['ms']:.3f} ms" if "ms" in out[-1] else out[-1]["error"].splitlines()[0][:200]))
    return out


def bench_moe(s: Settings, shapes: Shapes, impls: Sequence[str], log: Callable[[str], None]) -> list[dict[str, Any]]:
    from diffjax.kernels.moe import MoeTiles, experts_pallas, pretile_experts
    from diffjax.kernels.moe_mgpu import MgpuMoeTiles, experts_mgpu
    from diffjax.quantize import quantize

    def expert_kernel(kernel: Callable[..., Any], tiles: Any, pretiled: bool) -> Callable[..., Any]:
        def run(x, w, ids, gate_up, down, gate_up_scale=None, down_scale=None):
            return kernel(x, w, ids, gate_up, down, gate_up_scale=gate_up_scale, down_scale=down_scale,
                          tiles=tiles, pretiled=pretiled, interpret=s.tiny)
        return run

    twins: dict[str, tuple[Callable[..., Any], dict[str, Any]]] = {}
    # (fp8, pretiled) -> the Pallas variants taking such weights. Pretiled sweep variants all read weights tiled
    # under the default tiles: the stacks' tile widths override the candidates' column blocks.
    kernels: dict[tuple[bool, bool], dict[str, tuple[Callable[..., Any], dict[str, Any]]]] = {}
    for impl in impls:
        if impl in TILED_MOE_IMPLS:
            mgpu = impl in MGPU_MOE_IMPLS
            fp8, pretiled = (MGPU_MOE_IMPLS if mgpu else PALLAS_MOE_IMPLS)[impl]
            kernel, tiles_class = (experts_mgpu, MgpuMoeTiles) if mgpu else (experts_pallas, MoeTiles)
            # fp8 weights are widened by the Mosaic compute warpgroup itself: no warp-specialised variant.
            candidates = [c for c in (MGPU_MOE_TILES if mgpu else MOE_TILES)
                          if not (fp8 and c.get("compute_warpgroups", 1) > 1)]
            kernels.setdefault((fp8, pretiled), {}).update(_pallas_variants(
                functools.partial(expert_kernel, kernel, pretiled=pretiled), tiles_class, candidates, s.sweep,
                name=impl))
        elif impl in ("ragged_dot", "ragged_dot_fusion"):
            twins[impl] = (jax.jit(experts_grouped), {})
        elif impl == "ragged_dot_mgpu":
            twins[impl] = (jax.jit(functools.partial(experts_grouped, ragged_dot=jax_ragged_dot_mgpu)), {})
        elif impl == "dense":
            twins[impl] = (jax.jit(experts_dense), {})
        else:
            raise ValueError(f"unknown moe implementation {impl!r}; expected one of {MOE_IMPLS}")
    out = []
    for rows in s.rows:
        args = random_moe_problem(shapes, rows * shapes.canvas, s.seed)
        flops = moe_flops(shapes, rows * shapes.canvas)
        for (fp8, pretiled), functions in kernels.items():
            x, weights, ids, gate_up, down = args
            scales: tuple[jax.Array, ...] = ()
            if fp8:
                (gate_up, gate_up_scale), (down, down_scale) = quantize(gate_up), quantize(down)
                scales = (gate_up_scale, down_scale)
            nbytes = moe_bytes(x, weights, ids, gate_up, down) + _nbytes(*scales)
            if pretiled:
                gate_up, down = pretile_experts(gate_up, down)
            out += _time_all("moe", rows, (x, weights, ids, gate_up, down, *scales), nbytes, flops, functions, s,
                             log)
            del gate_up, down, scales
        out += _time_all("moe", rows, args, moe_bytes(*args), flops, twins, s, log)
        del args
    return out


def jax_ragged_dot_mgpu(rows: jax.Array, weights: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """`jax.lax.ragged_dot` through the Hopper ragged-dot kernel JAX ships as an example
    (`jax.experimental.pallas.ops.gpu.ragged_dot_mgpu`, Mosaic GPU), at the block sizes of its own tuning
    range: the reference point for `pallas_mgpu` (JAX's unfused kernel, XLA's activation between). Hopper
    GPUs only (elsewhere JAX refuses it)."""
    from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu

    return ragged_dot_mgpu.ragged_dot(
        rows, weights, group_sizes=group_sizes, block_m=64, block_n=largest_power_of_two_divisor(weights.shape[-1], 128),
        block_k=largest_power_of_two_divisor(rows.shape[1], 64), max_concurrent_steps=4, grid_block_n=1)


def bench_moe_fusion_child(s: Settings, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """ragged_dot under the cuDNN ragged-dot fusion flag, in a fresh process (XLA flags are process-wide)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = pathlib.Path(tmp) / "fusion.json"
        cmd = [sys.executable, "-m", "diffjax.kernels.bench", "--sections", "moe", "--moe-impls", "ragged_dot_fusion",
               "--child", "--repeats", str(s.repeats), "--calls", str(s.calls), "--rows", *map(str, s.rows),
               "--out", str(out)]
        if s.tiny:
            cmd.append("--tiny")
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {RAGGED_DOT_FUSION_FLAG}".strip())
        log("moe ragged_dot_fusion (child process)")
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, check=False)
        if proc.returncode != 0 or not out.exists():
            return [{"section": "moe", "impl": "ragged_dot_fusion", "rows": rows,
                     "error": f"child process exited {proc.returncode}: {proc.stderr[-2000:]}"} for rows in s.rows]
        return json.loads(out.read_text())["entries"]


# ------------------------------------------------------------------------------------------- vocab


def vocab_inputs(shapes: Shapes, rows: int, seed: int) -> tuple[jax.Array, jax.Array]:
    keys = jax.random.split(jax.random.key(seed + 1), 2)

    @jax.jit
    def make() -> tuple[jax.Array, jax.Array]:
        hidden = jax.random.normal(keys[0], (rows, shapes.hidden), jnp.bfloat16)
        embedding = 0.05 * jax.random.normal(keys[1], (shapes.vocab, shapes.hidden), jnp.bfloat16)
        return hidden, embedding

    return make()


def bench_vocab(s: Settings, shapes: Shapes, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from diffjax.kernels.vocab import VocabTiles, vocab_stats_pallas, vocab_stats_reference

    functions = _pallas_variants(
        lambda t: lambda h, e, temp: vocab_stats_pallas(
            h, e, temp, seed=7, softcap=shapes.softcap, tiles=t, interpret=s.tiny),
        VocabTiles, VOCAB_TILES, s.sweep,
    )
    if not s.sweep:
        # What generate(statistics="pallas") runs: the statistics plus the bf16 logits for self-conditioning.
        functions["pallas_with_logits"] = (
            jax.jit(lambda h, e, temp: vocab_stats_pallas(
                h, e, temp, seed=7, softcap=shapes.softcap, return_logits=True, interpret=s.tiny)), {})
        functions["logits_then_stats"] = (
            jax.jit(lambda h, e, temp: vocab_stats_reference(h, e, temp, seed=7, softcap=shapes.softcap)), {})
    out = []
    for batch in s.rows:
        hidden, embedding = vocab_inputs(shapes, batch * shapes.canvas, s.seed)
        args = (hidden, embedding, jnp.float32(0.8))
        flops = 2 * batch * shapes.canvas * shapes.vocab * shapes.hidden
        out += _time_all("vocab", batch, args, _nbytes(hidden, embedding), flops, functions, s, log)
        del hidden, embedding, args
    return out


# --------------------------------------------------------------------------------------- attention


def random_attention_problem(shapes: Shapes, batch: int, context: int, kv_heads: int, head_dim: int,
                             seed: int) -> tuple[jax.Array, ...]:
    """What a decoder layer attends with: canvas queries `[batch, canvas, heads, head_dim]`, `context` cached
    keys/values with an all-True `valid`, and the canvas's own keys/values `[batch, canvas, kv_heads,
    head_dim]`."""
    keys = jax.random.split(jax.random.key(seed + 2), 3)
    length = context + shapes.canvas

    @jax.jit
    def make() -> tuple[jax.Array, ...]:
        q = jax.random.normal(keys[0], (batch, shapes.canvas, shapes.heads, head_dim), jnp.bfloat16)
        k = jax.random.normal(keys[1], (batch, length, kv_heads, head_dim), jnp.bfloat16)
        v = jax.random.normal(keys[2], (batch, length, kv_heads, head_dim), jnp.bfloat16)
        # The unit-RMS q/k of Gemma's q/k norms make scale-1.0 scores of size ~sqrt(head_dim): shrink them.
        q = q * jnp.asarray(head_dim**-0.25, q.dtype)
        k = k * jnp.asarray(head_dim**-0.25, k.dtype)
        valid = jnp.ones((batch, context), bool)
        return q, k[:, :context], v[:, :context], valid, k[:, context:], v[:, context:]

    return make()


def concatenating(attention: Callable[..., jax.Array]) -> Callable[..., jax.Array]:
    """`attention(q, keys, values, valid)` in the split-K kernel's calling convention with the canvas's keys
    apart: it concatenates them to the cache's first, as the decoder does for every path but the kernel."""
    from diffjax.kernels.attention import append_keys

    def run(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array, new_k: jax.Array,
            new_v: jax.Array) -> jax.Array:
        return attention(q, *append_keys(k, v, valid, new_k, new_v))
    return run


def _split_k_variants(s: Settings) -> dict[str, tuple[Callable[..., Any], dict[str, Any]]]:
    """The split-K attention kernel under its default tiles, or with `sweep` under each of `ATTENTION_TILES`."""
    from diffjax.kernels.attention import AttentionTiles, global_attention_pallas

    return _pallas_variants(
        lambda t: lambda q, k, v, valid, nk, nv: global_attention_pallas(q, k, v, valid, nk, nv, tiles=t,
                                                                         interpret=s.tiny),
        AttentionTiles, ATTENTION_TILES, s.sweep,
    )


def bench_attention(s: Settings, shapes: Shapes, log: Callable[[str], None]) -> list[dict[str, Any]]:
    from diffjax.kernels.attention import attend_padding_only

    functions = _split_k_variants(s)
    if not s.sweep:
        functions["attend"] = (jax.jit(concatenating(attend_padding_only)), {})
    out = []
    for prompt in s.prompts:
        for batch in s.rows:
            args = random_attention_problem(shapes, batch, prompt, shapes.kv_heads, shapes.head_dim, s.seed)
            nbytes = _nbytes(*args) + _nbytes(args[0])  # + the output, the size of the queries
            flops = attention_flops(shapes, batch, prompt + shapes.canvas, shapes.head_dim)
            out += _time_all("attention", batch, args, nbytes, flops, functions, s, log, prompt=prompt)
            del args
    return out


def bench_sliding(s: Settings, shapes: Shapes, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The decoder's sliding layers: the canvas over a full ring (window - 1 slots) plus itself, no mask (the
    ring is full once the context reaches the window). Ours (`attend`, XLA; the split-K kernel, which takes
    the canvas's keys apart) against `jax.nn.dot_product_attention` with XLA and with cuDNN (GPU only; recorded
    as an error elsewhere); every path but the kernel concatenates ring and canvas first, as the decoder does.
    With `sweep` the split-K kernel alone, under each tile setting (head_dim 256 here, 512 on the global
    layers)."""
    from diffjax.kernels.attention import attend_padding_only

    def sdpa(implementation: str) -> Callable[..., jax.Array]:
        def run(q: jax.Array, k: jax.Array, v: jax.Array, valid: jax.Array) -> jax.Array:
            del valid  # all True here
            out = jax.nn.dot_product_attention(q, k, v, scale=1.0, implementation=implementation)
            return out.reshape(*out.shape[:2], -1)
        return run

    functions = _split_k_variants(s)
    if not s.sweep:
        functions["attend"] = (jax.jit(concatenating(attend_padding_only)), {})
        functions |= {f"sdpa_{impl}": (jax.jit(concatenating(sdpa(impl))), {}) for impl in ("xla", "cudnn")}
    ring = shapes.sliding_window - 1
    out = []
    for batch in s.rows:
        args = random_attention_problem(shapes, batch, ring, shapes.sliding_kv_heads, shapes.sliding_head_dim,
                                        s.seed)
        nbytes = _nbytes(*args) + _nbytes(args[0])
        flops = attention_flops(shapes, batch, ring + shapes.canvas, shapes.sliding_head_dim)
        out += _time_all("sliding", batch, args, nbytes, flops, functions, s, log, prompt=ring)
        del args
    return out


# ----------------------------------------------------------------------------------------- routing


def bench_routing(s: Settings, shapes: Shapes, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One layer's router: projection onto the experts and top-k, `route_pallas` (under each of `ROUTE_TILES`
    with `sweep`) against its XLA twin `route`."""
    from diffjax.kernels.routing import RouteTiles, route_pallas
    from diffjax.layers import route

    functions = _pallas_variants(
        lambda t: lambda x, scale, proj, per_expert: route_pallas(x, scale, proj, per_expert, shapes.top_k,
                                                                  tiles=t, interpret=s.tiny),
        RouteTiles, ROUTE_TILES, s.sweep,
    )
    if not s.sweep:
        functions["xla"] = (jax.jit(lambda *args: route(*args, shapes.top_k)), {})
    keys = jax.random.split(jax.random.key(s.seed + 3), 4)
    out = []
    for batch in s.rows:
        tokens = batch * shapes.canvas
        args = (jax.random.normal(keys[0], (tokens, shapes.hidden), jnp.bfloat16),
                jax.random.uniform(keys[1], (shapes.hidden,), jnp.bfloat16, 0.5, 2.0),
                jax.random.normal(keys[2], (shapes.hidden, shapes.experts), jnp.bfloat16),
                jax.random.uniform(keys[3], (shapes.experts,), jnp.float32, 0.5, 2.0))
        nbytes = _nbytes(*args) + tokens * shapes.top_k * 8  # weights (float32) and ids (int32) out
        out += _time_all("routing", batch, args, nbytes, 2 * tokens * shapes.hidden * shapes.experts, functions, s,
                         log)
    return out


def bench_mlp(s: Settings, shapes: Shapes, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """One layer's experts and dense MLP: the MLP in the expert kernels' launches (under each of `MLP_TILES`
    with `sweep`) against the expert kernels then the MLP in XLA, and the XLA MLP alone."""
    from diffjax.kernels.moe import MlpInputs, MoeTiles, experts_pallas, mlp_reference

    def together(tiles: MoeTiles) -> Callable[..., Any]:
        def run(x, weights, ids, gate_up, down, mlp_x, mlp_gate_up, mlp_down):
            return experts_pallas(x, weights, ids, gate_up, down, mlp=MlpInputs(mlp_x, mlp_gate_up, mlp_down),
                                  tiles=tiles, interpret=s.tiny)
        return run

    def apart(x, weights, ids, gate_up, down, mlp_x, mlp_gate_up, mlp_down):
        return (experts_pallas(x, weights, ids, gate_up, down, interpret=s.tiny),
                mlp_reference(mlp_x, mlp_gate_up, mlp_down))

    functions = _pallas_variants(together, MoeTiles, MLP_TILES, s.sweep, name="pallas_with_mlp")
    if not s.sweep:
        functions["pallas_then_xla_mlp"] = (jax.jit(apart), {})
    keys = jax.random.split(jax.random.key(s.seed + 4), 3)
    mlp_weights = (0.02 * jax.random.normal(keys[1], (shapes.hidden, 2 * shapes.mlp_inter), jnp.bfloat16),
                   0.02 * jax.random.normal(keys[2], (shapes.mlp_inter, shapes.hidden), jnp.bfloat16))
    out = []
    for rows in s.rows:
        tokens = rows * shapes.canvas
        experts = random_moe_problem(shapes, tokens, s.seed)
        mlp_x = jax.random.normal(keys[0], (tokens, shapes.hidden), jnp.bfloat16)
        mlp_bytes = _nbytes(*mlp_weights) + 2 * _nbytes(mlp_x)
        mlp_flops = 2 * tokens * 3 * shapes.hidden * shapes.mlp_inter
        out += _time_all("mlp", rows, (*experts, mlp_x, *mlp_weights), moe_bytes(*experts) + mlp_bytes,
                         moe_flops(shapes, tokens) + mlp_flops, functions, s, log)
        if not s.sweep:
            out += _time_all("mlp", rows, (mlp_x, *mlp_weights), mlp_bytes, mlp_flops,
                             {"xla_mlp": (jax.jit(mlp_reference), {})}, s, log)
        del experts
    return out


# ------------------------------------------------------------------------------------------- driver


def run(s: Settings, log: Callable[[str], None] = lambda _: None, child: bool = False) -> dict[str, Any]:
    shapes = Shapes.tiny() if s.tiny else Shapes.released()
    if s.sweep:  # tile variants of the Pallas kernels only; the twins have no tiles
        s = dataclasses.replace(s, moe_impls=tuple(i for i in s.moe_impls if i in TILED_MOE_IMPLS) or ("pallas",))
    # The child runs first, while this process has not yet claimed (preallocated) the GPU's memory.
    fusion = (bench_moe_fusion_child(s, log) if "moe" in s.sections and "ragged_dot_fusion" in s.moe_impls
              and not child else [])
    device = jax.devices()[0]
    result: dict[str, Any] = {
        "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "device": str(device),
        "device_kind": device.device_kind, "jax": jax.__version__, "settings": dataclasses.asdict(s),
        "shapes": dataclasses.asdict(shapes), "entries": [],
    }
    if not child:
        log("measuring device copy bandwidth")
        result["copy_bandwidth_gb_per_s"] = copy_bandwidth(
            (64 << 20) if device.platform == "cpu" else (2 << 30)) / 1e9
    entries = result["entries"]
    if "moe" in s.sections:
        in_process = [i for i in s.moe_impls if i != "ragged_dot_fusion" or child]
        entries += bench_moe(s, shapes, in_process, log) + fusion
    sections: dict[str, Callable[[], list[dict[str, Any]]]] = {
        "vocab": lambda: bench_vocab(s, shapes, log), "attention": lambda: bench_attention(s, shapes, log),
        "sliding": lambda: bench_sliding(s, shapes, log), "routing": lambda: bench_routing(s, shapes, log),
        "mlp": lambda: bench_mlp(s, shapes, log),
    }
    for name in s.sections:  # in the order asked: a run cut short by a time limit has the first ones
        if name in sections:
            try:
                entries += sections[name]()
            except Exception as exc:  # e.g. the section's module failing to import
                entries.append({"section": name, "error": f"{type(exc).__name__}: {exc}"[:2000]})
    if s.sweep:
        result["best_tiles"] = best_tiles(entries)
        result["best_kernel_tiles"] = best_kernel_tiles(result["best_tiles"])
    return result


def _base_impl(entry: dict[str, Any]) -> str:
    """An entry's implementation without its sweep index: "pallas[3]" -> "pallas"."""
    return entry.get("impl", "").split("[")[0]


def best_tiles(entries: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The fastest tile setting per kernel and problem (section, implementation, rows, prompt) among the entries
    that ran: a sweep's implementations (e.g. bf16 and fp8 experts, or a kernel and its twin) each keep their
    winner."""
    best: dict[tuple, dict[str, Any]] = {}
    for e in entries:
        key = (e["section"], _base_impl(e), e.get("rows"), e.get("prompt"))
        if "ms" in e and (key not in best or e["ms"] < best[key]["ms"]):
            best[key] = e
    return [{k: e[k] for k in ("section", "impl", "rows", "prompt", "ms", "tiles") if k in e} for e in best.values()]


# Sections -> the `Config.kernel_tiles` field whose kernel they time (the MoE section's by implementation: only
# the bf16 plain-layout ones the step runs by default).
_KERNEL_TILES_FIELDS = {"sliding": "sliding_attention", "attention": "global_attention", "routing": "routing",
                        "vocab": "vocab", "mlp": "experts", "moe:pallas": "experts", "moe:pallas_mgpu": "experts_mgpu"}


def best_kernel_tiles(best: Sequence[dict[str, Any]]) -> dict[int, str]:
    """Per batch rows, the `best_tiles` winners as `config.KernelTiles.parse` text (`diffjax bench --full-size
    --tiles`): only the settings where a winner differs from its kernel's defaults; where a section was timed at
    several prompts, at its shortest. "" where every winner is a default."""
    from diffjax.config import KernelTiles

    shortest: dict[str, int] = {}
    for e in best:
        if e.get("prompt") is not None:
            shortest[e["section"]] = min(shortest.get(e["section"], e["prompt"]), e["prompt"])
    per_rows: dict[int, dict[str, dict[str, Any]]] = {}
    for e in best:
        field = _KERNEL_TILES_FIELDS.get(e["section"] if e["section"] != "moe" else f"moe:{_base_impl(e)}")
        if field is None or "tiles" not in e or e.get("prompt") != shortest.get(e["section"]):
            continue
        defaults = dataclasses.asdict(KernelTiles.tiles_class(field)())
        changed = {k: v for k, v in e["tiles"].items() if defaults.get(k) != v}
        per_rows.setdefault(e["rows"], {}).setdefault(field, {}).update(changed)
    return {rows: ",".join(f"{field}.{name}={str(value).lower()}" for field, changed in fields.items()
                           for name, value in changed.items())
            for rows, fields in sorted(per_rows.items())}


def render(result: dict[str, Any]) -> str:
    """A plain-text table of the entries, one line each."""
    lines = [f"{result['device_kind']} ({result['device']}), jax {result['jax']}, {result['date_utc']} UTC"]
    if "copy_bandwidth_gb_per_s" in result:
        lines.append(f"device copy bandwidth: {result['copy_bandwidth_gb_per_s']:.0f} GB/s")
    lines.append(f"{'section':<10} {'impl':<22} {'rows':>4} {'prompt':>6} {'ms':>9} {'GB/s':>8} {'TFLOP/s':>8}  note")
    for e in result["entries"]:
        ms = f"{e['ms']:9.3f}" if "ms" in e else f"{'-':>9}"
        gbs = f"{e['gb_per_s']:8.0f}" if "gb_per_s" in e else f"{'-':>8}"
        tflops = f"{e['tflop_per_s']:8.1f}" if "tflop_per_s" in e else f"{'-':>8}"
        if "error" in e:
            note = e["error"].splitlines()[0][:100]
        else:
            note = " ".join(f"{k}={v}" for k, v in e.get("tiles", {}).items() if v is not None)
        lines.append(f"{e['section']:<10} {e.get('impl', '-'):<22} {e.get('rows', '-'):>4} "
                     f"{e.get('prompt', ''):>6} {ms} {gbs} {tflops}  {note}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffjax.kernels.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=output_file, help="write the result as JSON here")
    p.add_argument("--tiny", action="store_true", help="tiny shapes in Pallas interpret mode (CPU smoke run)")
    p.add_argument("--rows", type=int, nargs="+", help="decoder batch rows (default 1 4 8 16; tiny: 1 2)")
    p.add_argument("--prompts", type=int, nargs="+", help="attention prompt lengths (default 1024 32768)")
    p.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    p.add_argument("--moe-impls", nargs="+", choices=MOE_IMPLS, default=list(MOE_IMPLS))
    p.add_argument("--repeats", type=int, default=5, help="warm samples per entry, the best is kept (default 5)")
    p.add_argument("--calls", type=int, help="calls queued back to back per sample (default 10; tiny: 1)")
    p.add_argument("--sweep", action="store_true",
                   help="time each Pallas kernel under several tile settings (no twins); report the fastest")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    calls = (1 if args.tiny else 10) if args.calls is None else args.calls
    if any(n <= 0 for n in [*(args.rows or []), *(args.prompts or []), args.repeats, calls]):
        p.error("--rows, --prompts, --repeats and --calls must be positive")
    settings = Settings(
        rows=tuple(args.rows or ((1, 2) if args.tiny else (1, 4, 8, 16))),
        prompts=tuple(args.prompts or ((32,) if args.tiny else (1024, 32768))),
        sections=tuple(args.sections), moe_impls=tuple(args.moe_impls), repeats=args.repeats,
        calls=calls, tiny=args.tiny, sweep=args.sweep,
    )
    start = time.perf_counter()
    result = run(settings, log=lambda m: print(f"[{time.perf_counter() - start:6.1f}s] {m}", file=sys.stderr,
                                                flush=True), child=args.child)
    result["total_s"] = time.perf_counter() - start
    if not args.child:
        print(render(result))
        for rows, tiles in result.get("best_kernel_tiles", {}).items():
            print(f"the winners at {rows} rows, to time in the step: diffjax bench --full-size --tiles '' {tiles!r}"
                  if tiles else f"the winners at {rows} rows: every kernel's defaults")
    if args.out:
        write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
