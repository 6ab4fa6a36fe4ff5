"""Mixture-of-experts as a block-sparse grouped matmul (Pallas, Triton lowering).

The tokens * top_k (token, expert) assignments are sorted by expert and each expert's group is padded to a
multiple of the row tile, so every row tile belongs to exactly one expert (`diffjax.kernels.routing`'s
layout). Small int32 arrays map each row tile to its expert (-1 for unused tiles, which do nothing) and each
padded row to its assignment; a program of the grid (row tile, output column tile) reads only its expert's
weight columns. Two kernels:

1. gate/up: `h = gelu_tanh(x @ W_gate[e]) * (x @ W_up[e])`, both halves accumulated in float32 in the same
   k-loop (one pass over x), the activation fused before the single store of `h [padded_rows, inter]`. Its
   rows of x are gathered straight from x in token order.
2. down: `y = weight * (h @ W_down[e])`, the routing weight of each row fused into the store, which scatters
   each row to its assignment's row of `y [tokens * top_k (+1 spare for padding rows), hidden]`.

Each token's top_k rows of y are then summed. Neither x nor y is ever copied in expert order and padded: at
batch 8 those copies (zero-filled, scattered, gathered back) moved ~0.5 GB per layer.

The layer's dense MLP (`mlp=`, `Config.mlp_implementation="pallas"`) can ride in the same two launches:
programs of their own, first in the grid, tile its gate/up and down products over (token tile, column tile),
from its own input and weights. XLA ran it as three launches per layer (two matmuls, one activation fusion),
each a split-k matmul with its own reduction.

FP8 experts (`diffjax.quantize`: float8_e4m3fn weights, a float32 scale per output column): the kernels load
e4m3 weight tiles (half the bytes), convert them to the activation dtype in registers (exact), accumulate in
float32 and multiply the accumulators by their columns' scales once, after the k-loop: gate and up before the
activation, down before the routing weight. The Triton cast from e4m3 needs compute capability >= 8.9.
Twin: `diffjax.layers.experts_grouped` (ragged_dot) and `experts_dense`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.config import ROUTING_IMPLEMENTATIONS, Config
from diffjax.kernels import (
    INT32_OFFSET_LIMIT,
    MIN_BLOCK,
    WIDE_OFFSETS,
    largest_power_of_two_divisor,
    require_block,
    require_launch,
    resolve_interpret,
    with_twin_backward,
)
from diffjax.kernels.routing import ExpertRows, expert_rows_pallas, expert_rows_reference
from diffjax.layers import experts_grouped, experts_grouped_rows, gelu_tanh
from diffjax.quantize import FP8, dequantize

Array = jax.Array


def row_tile(num_assignments: int, num_experts: int) -> int:
    """Row tile for a given load: a power of two (16..128) that holds a busy expert's group whole.

    Group sizes are about Poisson(mean). Every row tile of an expert streams that expert's weights, so a group
    spilling into a second tile reads them twice: at batch 1 (mean 16) a mean-sized tile would do so for ~40%
    of the experts, i.e. ~1.4x the weight bytes of a memory-bound step. mean + 3 sqrt(mean) rows cover all but
    a few experts; the padding rows cost compute only, which is cheap where the step is memory-bound, and the
    128-row cap bounds it where it is not (batch >= 4: mean >= 64)."""
    mean_rows = num_assignments / num_experts
    busy_rows = mean_rows + 3.0 * mean_rows**0.5
    tile = MIN_BLOCK
    while tile < 128 and tile < busy_rows:
        tile *= 2
    return tile


@dataclasses.dataclass(frozen=True)
class MoeTiles:
    """Block sizes (powers of two >= 16; the k and n blocks are caps, lowered to divide the model's sizes)
    and Triton launch parameters of the two MoE kernels."""

    block_rows: int | None = None  # None: `row_tile` of the load
    gate_up_block_k: int = 64
    gate_up_block_n: int = 64
    down_block_k: int = 64
    down_block_n: int = 128
    # None: per kernel, the fewest warps (4 or 8) that hold its float32 accumulators in <= 64 registers per
    # thread (`warps_for`). With 128-row tiles (batch >= 8) that is 8 warps: 122/94 registers per thread
    # instead of 220/184 on 4, at the same 2 programs per SM (`python -m diffjax.kernels.codegen`).
    num_warps: int | None = None
    num_stages: int = 3
    # Launch all the column tiles of a row tile together (the grid's fastest axis): the programs that read one
    # expert's weight rows run side by side, so they stream whole rows of it, and its activation rows are read
    # from DRAM once and then from L2. Row tiles first re-read every activation row once per column tile, which
    # at batch 8 (~100 MB of expert-sorted rows, twice the H100's L2) means from DRAM.
    column_tiles_first: bool = True
    # Accumulate the transposed products (weight tile^T @ rows^T): the weight columns become the MMA's M side
    # and the few rows of an expert its N side. Hopper's wgmma needs M >= 64 per warpgroup, which a 16-32-row
    # tile (batch 1) cannot give the plain product; the swap is the usual small-batch MoE remedy. Same maths.
    swap_ab: bool = False
    # Start each program's k-loop at its own k-step (from its grid indices, mod the steps; wrapping around): the
    # programs running side by side then read different parts of their experts' weights instead of the same
    # offset in each (the expert stride is a multiple of 64 KiB, which could put them all on the same DRAM
    # channels). A sweep option testing that hypothesis; same maths, float32 sums in another order.
    skew_k: bool = False
    # The dense MLP's programs (`experts_pallas(..., mlp=...)`): token rows per program (lowered to the tokens'
    # next power of two) and the column cap of both its products. Every token tile streams the MLP's weight
    # columns once, from L2 for all but the first of the programs launched side by side (token tiles first).
    # None: `mlp_tile` of the experts' row tile, which keeps each launch's registers and shared memory those
    # of the experts alone (a launch's programs all get the resources of its larger part).
    mlp_block_rows: int | None = None
    mlp_block_n: int | None = None

    def validate(self) -> None:
        for name in ("gate_up_block_k", "gate_up_block_n", "down_block_k", "down_block_n"):
            require_block(f"MoeTiles.{name}", getattr(self, name))
        for name in ("block_rows", "mlp_block_rows", "mlp_block_n"):
            if getattr(self, name) is not None:
                require_block(f"MoeTiles.{name}", getattr(self, name))
        require_launch("MoeTiles", self.num_warps, self.num_stages)


# Float32 accumulator elements per thread above which `warps_for` doubles the warps.
ACCUMULATORS_PER_THREAD = 64


def warps_for(accumulator_elements: int) -> int:
    """Warps (4 or 8) for a kernel whose program holds `accumulator_elements` float32 accumulators."""
    return 4 if accumulator_elements <= ACCUMULATORS_PER_THREAD * 4 * 32 else 8


@functools.partial(jax.jit, static_argnames=("tiles", "pretiled", "routing", "sum_rows", "interpret"))
def experts_pallas(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None = None,
    *, gate_up_scale: Array | None = None, down_scale: Array | None = None, mlp: MlpInputs | None = None,
    tiles: MoeTiles = MoeTiles(), pretiled: bool = False, routing: str = "xla", sum_rows: bool = True,
    interpret: bool | None = None,
) -> Array | tuple[Array, Array]:
    """Mixture of experts over the routed (token, expert) pairs only; same maths as `experts_grouped`.

    x `[tokens, hidden]`, weights/expert_ids `[tokens, k]`, gate_up `[experts, hidden, 2 * inter]` (gate first
    half, up second), down `[experts, inter, hidden]`. hidden and inter must be multiples of 16.
    Returns `[tokens, hidden]` in x's dtype.

    With `layer` (an int32 scalar, traced is fine), gate_up/down are stacks `[layers, experts, ...]` and the
    kernels read layer `layer`'s experts in place: slicing the stack first (e.g. a scan over layers) would
    materialise a copy of the slice, since a custom call cannot take a view of a dynamic slice.

    FP8 experts: gate_up and down float8_e4m3fn with `gate_up_scale [(layers,) experts, 2 * inter]` and
    `down_scale [(layers,) experts, hidden]` (float32, `diffjax.quantize`), read in place like the weights.

    `mlp`: the layer's dense MLP run in the same two launches (`MlpInputs`: its input and fused weights, with
    the layers axis exactly when the experts have one). Returns `(experts [tokens, hidden], mlp [tokens,
    hidden])` then, the MLP's as `mlp_reference`.

    `pretiled`: gate_up and down as `pretile_experts` lays them out (each column tile contiguous), the column
    tiles' widths taken from them instead of from `tiles`.

    `routing`: how the row layout is made, "xla" (`routing.expert_rows_reference`) or "pallas" (one launch,
    `routing.expert_rows_pallas`); the same layout either way.

    `sum_rows=False`: the experts' output before each token's sum, as the down kernel writes it: `[tokens * k +
    1, hidden]`, row `token * k + j` the token's j-th expert's weighted output and the last row scratch (for
    a kernel that sums them itself, `diffjax.kernels.norms.feedforward_outputs_pallas`: a slice of it would be
    a copy).

    Differentiable: gradients come from the plain-JAX twin (`with_twin_gradients`).
    """
    if routing not in ROUTING_IMPLEMENTATIONS:
        raise ValueError(f"routing must be one of {ROUTING_IMPLEMENTATIONS}, got {routing!r}")
    kernel = functools.partial(_experts_pallas, tiles=tiles, pretiled=pretiled, routing=routing, sum_rows=sum_rows,
                               interpret=interpret)
    return with_twin_gradients(kernel, pretiled, sum_rows)(x, weights, expert_ids, gate_up, down, layer,
                                                           gate_up_scale, down_scale, *(mlp or (None,) * 3))


class MlpInputs(NamedTuple):
    """The dense MLP that `experts_pallas` runs beside the experts: its input x `[tokens, hidden]` (the layer's
    own norm of the residual, not the experts'), gate_up `[(layers,) hidden, 2 * inter]` (gate first, the
    fused projection layout) and down `[(layers,) inter, hidden]`."""

    x: Array
    gate_up: Array
    down: Array


class _MlpPart(NamedTuple):
    """The dense MLP's programs in one expert kernel: the first `token_tiles * column_tiles` of the grid, token
    tiles fastest, each a `[block_rows, block_n]` output tile summed over `block_k` steps."""

    block_rows: int
    block_k: int
    block_n: int
    token_tiles: int
    column_tiles: int

    @property
    def programs(self) -> int:
        return self.token_tiles * self.column_tiles


def _experts_pallas(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None,
    gate_up_scale: Array | None, down_scale: Array | None, mlp_x: Array | None, mlp_gate_up: Array | None,
    mlp_down: Array | None, *, tiles: MoeTiles, pretiled: bool, routing: str, sum_rows: bool,
    interpret: bool | None,
) -> Array | tuple[Array, Array]:
    mlp = None if mlp_x is None else _check_mlp(x, MlpInputs(mlp_x, mlp_gate_up, mlp_down), layer)
    stacks = expert_stacks(x, weights, expert_ids, gate_up, down, layer, gate_up_scale, down_scale, pretiled)
    gate_up, down, gate_up_scale, down_scale, layer = stacks
    quantized = gate_up_scale is not None
    gate_up_shape = _untiled_shape(gate_up.shape, pretiled)
    tokens, hidden = x.shape
    _, num_experts, _, two_inter = gate_up_shape
    inter = two_inter // 2
    top_k = expert_ids.shape[1]
    if pretiled:
        _check_pretiled(gate_up.shape, down.shape, inter)
    tiles.validate()
    block_rows = tiles.block_rows or row_tile(tokens * top_k, num_experts)
    interpret = resolve_interpret(interpret)
    if quantized and not interpret and not WIDE_OFFSETS:
        for name, stack in (("gate_up", gate_up), ("down", down)):
            if stack.size >= INT32_OFFSET_LIMIT:
                raise ValueError(
                    f"the fp8 {name} stack {stack.shape} has >= 2**31 weights, which this JAX's Triton lowering "
                    "indexes with wrapping 32-bit offsets (see diffjax.kernels.WIDE_OFFSETS); pass fewer layers "
                    "per stack or use moe_implementation='grouped'"
                )

    # The kernels gather their rows of x and scatter their output rows themselves, by these row maps: no
    # expert-sorted, padded copy of the activations or of the output is ever written (at batch 8 those were
    # ~180 MB each per layer, zero-filled first, against an 11 MB x that stays in L2).
    if routing == "pallas":
        rows = expert_rows_pallas(expert_ids, weights, num_experts, block_rows, interpret=interpret)
    else:
        rows = expert_rows_reference(expert_ids, weights, num_experts, block_rows)
    assignments = tokens * top_k  # assignment a = token * top_k + j; padding rows write row `assignments`
    h, h_mlp = _gate_up_call(x, rows, layer, gate_up, gate_up_scale, inter, block_rows, tiles, pretiled, mlp,
                             interpret)
    ys, y_mlp = _down_call(h, rows, assignments + 1, layer, down, down_scale, hidden, block_rows, tiles, pretiled,
                           mlp, h_mlp, interpret)
    if sum_rows:
        ys = sum_expert_rows(ys, tokens, top_k)
    return ys if mlp is None else (ys, y_mlp[:tokens])


def sum_expert_rows(rows: Array, tokens: int, top_k: int) -> Array:
    """Each token's sum of its experts' rows as the down kernel writes them (`[>= tokens * top_k, hidden]`, row
    `token * top_k + j`), in float32, rounded to the rows' dtype: `[tokens, hidden]`."""
    per_token = rows[:tokens * top_k].reshape(tokens, top_k, rows.shape[1])
    return jnp.sum(per_token.astype(jnp.float32), axis=1).astype(rows.dtype)


def _check_mlp(x: Array, mlp: MlpInputs, layer: Array | int | None) -> MlpInputs:
    """The dense MLP's arguments checked against the experts' x and `layer`, with a layers axis (of 1 if
    `layer` is None) and in x's dtype."""
    lead = () if layer is None else mlp.gate_up.shape[:1]
    if mlp.x.shape != x.shape:
        raise ValueError(f"the MLP's x must be shaped as the experts' x {x.shape}, got {mlp.x.shape}")
    hidden = x.shape[1]
    rank = 2 + (layer is not None)
    if mlp.gate_up.ndim != rank or mlp.down.ndim != rank or mlp.gate_up.shape[-2] != hidden or \
            mlp.gate_up.shape[-1] % 2 or mlp.down.shape != (*lead, mlp.gate_up.shape[-1] // 2, hidden):
        raise ValueError(
            f"the MLP's gate_up and down must be [{'layers, ' * (layer is not None)}hidden={hidden}, 2 * inter] and "
            f"[{'layers, ' * (layer is not None)}inter, hidden={hidden}] (a layers axis exactly when the experts "
            f"are stacks), got {mlp.gate_up.shape} and {mlp.down.shape}")
    if mlp.down.shape[-2] % MIN_BLOCK:
        raise ValueError(f"the MLP kernels need its inter to be a multiple of {MIN_BLOCK}, got {mlp.down.shape[-2]}")
    gate_up, down = (w.astype(x.dtype) if layer is not None else w[None].astype(x.dtype)
                     for w in (mlp.gate_up, mlp.down))
    return MlpInputs(mlp.x.astype(x.dtype), gate_up, down)


def mlp_reference(x: Array, gate_up: Array, down: Array) -> Array:
    """The dense MLP in plain JAX, fused layout: `down(gelu_tanh(gate(x)) * up(x))`, x `[tokens, hidden]`,
    gate_up `[hidden, 2 * inter]`, down `[inter, hidden]`."""
    gate, up = jnp.split(x @ gate_up.astype(x.dtype), 2, axis=-1)
    return (gelu_tanh(gate) * up) @ down.astype(x.dtype)


def pretile_experts(gate_up: Array, down: Array, tiles: MoeTiles = MoeTiles()) -> tuple[Array, Array]:
    """Lay the expert weights out column tile by column tile, for `experts_pallas(..., pretiled=True)`.

    gate_up `[..., hidden, 2 * inter]` -> `[..., 2 * inter / n, hidden, n]` and down `[..., inter, hidden]` ->
    `[..., hidden / m, inter, m]`, with n, m the kernels' column tile widths under `tiles`; leading axes
    (layers, experts) and the dtype (fp8 too; the scales keep their layout) are kept. Why: a program of the
    kernels streams one column tile of one expert down the contraction axis. In the plain layout each of its
    k-steps reads 64 pieces of n * itemsize bytes (128 for bf16, 64 for fp8), a whole weight row apart; here it
    reads one contiguous block. A one-time copy: do it when loading the weights, not per call.
    """
    gate_up_width, down_width = _tile_widths(gate_up.shape, down.shape, tiles)
    return _tile_columns(gate_up, gate_up_width), _tile_columns(down, down_width)


def untile_experts(gate_up: Array, down: Array) -> tuple[Array, Array]:
    """The inverse of `pretile_experts`: the plain layout back (a copy)."""
    return _untile_columns(gate_up), _untile_columns(down)


def pretiled_shapes(gate_up_shape: tuple[int, ...], down_shape: tuple[int, ...], tiles: MoeTiles = MoeTiles()
                    ) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The shapes `pretile_experts` gives weights of these (plain) shapes."""
    gate_up, down = jax.eval_shape(
        functools.partial(pretile_experts, tiles=tiles), *(jax.ShapeDtypeStruct(s, jnp.float32)
                                                           for s in (gate_up_shape, down_shape)))
    return gate_up.shape, down.shape


def pretile_model(config: Config, params: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """`(config, params)` with every MoE layer's experts pretiled (`pretile_experts` under the default
    tiles) and `config.expert_layout="pretiled"`; fp8 experts too (quantize first: the scales are per plain
    column and keep their layout). One stack at a time, each a device copy."""
    return _relayout_experts(config, params, "pretiled", _pretile_jit)


def untile_model(config: Config, params: dict[str, Any]) -> tuple[Config, dict[str, Any]]:
    """The inverse of `pretile_model`: plain-layout experts and `config.expert_layout="plain"`."""
    return _relayout_experts(config, params, "plain", _untile_jit)


def _relayout_experts(config: Config, params: dict[str, Any], layout: str, relayout: Any
                      ) -> tuple[Config, dict[str, Any]]:
    from diffjax.quantize import map_experts

    if config.expert_layout == layout:
        raise ValueError(f"config.expert_layout is already {layout!r}")

    def relayout_node(experts: Any) -> dict[str, Any]:
        out = dict(experts)
        out["gate_up_proj"], out["down_proj"] = relayout(experts["gate_up_proj"], experts["down_proj"])
        return out

    return config.replace(expert_layout=layout), map_experts(params, relayout_node)


_pretile_jit = jax.jit(pretile_experts)
_untile_jit = jax.jit(untile_experts)


def _tile_widths(gate_up_shape: tuple[int, ...], down_shape: tuple[int, ...], tiles: MoeTiles) -> tuple[int, int]:
    """Column tile widths of gate/up and down: the kernels' column blocks for these sizes."""
    tiles.validate()
    hidden, two_inter = gate_up_shape[-2:]
    inter = down_shape[-2]
    if two_inter != 2 * inter or down_shape[-1] != hidden:
        raise ValueError(f"gate_up [..., hidden, 2 * inter] {tuple(gate_up_shape)} does not match down [..., "
                         f"inter, hidden] {tuple(down_shape)}")
    return (largest_power_of_two_divisor(inter, tiles.gate_up_block_n),
            largest_power_of_two_divisor(hidden, tiles.down_block_n))


def _tile_columns(w: Array, width: int) -> Array:
    """`[..., rows, cols]` -> `[..., cols / width, rows, width]`."""
    *lead, rows, cols = w.shape
    return jnp.moveaxis(w.reshape(*lead, rows, cols // width, width), -2, -3)


def _untile_columns(w: Array) -> Array:
    """`[..., tiles, rows, width]` -> `[..., rows, tiles * width]`."""
    return jnp.moveaxis(w, -3, -2).reshape(_untiled_shape(w.shape, pretiled=True))


def _untiled_shape(shape: tuple[int, ...], pretiled: bool) -> tuple[int, ...]:
    """The plain-layout shape of a weight stack: `[..., tiles, rows, width]` -> `[..., rows, tiles * width]`."""
    if not pretiled:
        return shape
    *lead, num_tiles, rows, width = shape
    return (*lead, rows, num_tiles * width)


def _check_pretiled(gate_up_shape: tuple[int, ...], down_shape: tuple[int, ...], inter: int) -> None:
    for name, width in (("gate_up", gate_up_shape[-1]), ("down", down_shape[-1])):
        require_block(f"the column tile width of the pretiled {name}", width)
    if inter % gate_up_shape[-1]:
        raise ValueError(f"the pretiled gate_up's column tiles ({gate_up_shape[-1]} wide) must divide inter "
                         f"({inter}): a tile may not hold both gate and up columns")


def experts_reference(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None = None,
    gate_up_scale: Array | None = None, down_scale: Array | None = None, mlp_x: Array | None = None,
    mlp_gate_up: Array | None = None, mlp_down: Array | None = None, pretiled: bool = False, sum_rows: bool = True,
) -> Array | tuple[Array, Array]:
    """The expert kernels' maths in plain JAX, with their calling convention (a layer of a stack, fp8
    scales, pretiled layout, the dense MLP beside them, the rows unsummed): layer `layer`'s experts, untiled and
    dequantized to x's dtype, through `experts_grouped` (`experts_grouped_rows` and a zero scratch row), and
    the MLP's through `mlp_reference`."""
    if mlp_x is not None:
        if layer is not None:
            mlp_gate_up, mlp_down = mlp_gate_up[layer], mlp_down[layer]
        experts = experts_reference(x, weights, expert_ids, gate_up, down, layer, gate_up_scale, down_scale,
                                    pretiled=pretiled, sum_rows=sum_rows)
        return experts, mlp_reference(mlp_x, mlp_gate_up, mlp_down)
    if pretiled:
        gate_up, down = untile_experts(gate_up, down)
    if layer is not None:
        gate_up, down = gate_up[layer], down[layer]
        if gate_up_scale is not None:
            gate_up_scale, down_scale = gate_up_scale[layer], down_scale[layer]
    if gate_up_scale is not None:
        gate_up, down = dequantize(gate_up, gate_up_scale, x.dtype), dequantize(down, down_scale, x.dtype)
    if sum_rows:
        return experts_grouped(x, weights, expert_ids, gate_up, down)
    rows = experts_grouped_rows(x, weights, expert_ids, gate_up, down)
    return jnp.concatenate([rows, jnp.zeros_like(rows[:1])])


def with_twin_gradients(kernel: Any, pretiled: bool, sum_rows: bool = True) -> Any:
    """An expert kernel `kernel(x, weights, expert_ids, gate_up, down, layer, gate_up_scale, down_scale, mlp_x,
    mlp_gate_up, mlp_down)` differentiated through `experts_reference` (`diffjax.kernels.with_twin_backward`):
    gradients for x, the routing weights and the weight stacks, or for fp8 experts their scales (not the e4m3
    weights), and for the MLP's input and weights where given."""
    def differentiable(args: tuple[Any, ...]) -> tuple[int, ...]:
        experts = (0, 1, 6, 7) if args[6] is not None else (0, 1, 3, 4)
        return experts + ((8, 9, 10) if len(args) > 8 and args[8] is not None else ())

    return with_twin_backward(kernel, functools.partial(experts_reference, pretiled=pretiled, sum_rows=sum_rows),
                              differentiable)


class ExpertStacks(NamedTuple):
    """The expert kernels' weights as `[layers, experts, ...]` stacks, their fp8 scales (float32; None if
    unquantized) and the layer index as an int32 `[1]` array."""

    gate_up: Array
    down: Array
    gate_up_scale: Array | None
    down_scale: Array | None
    layer: Array


def expert_stacks(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None,
    gate_up_scale: Array | None, down_scale: Array | None, pretiled: bool = False,
) -> ExpertStacks:
    """Check the arguments the expert kernels share (`experts_pallas`, `moe_mgpu.experts_mgpu`) and give the
    weights as stacks: one layer's `[experts, ...]` weights (no `layer`) gain a layers axis of 1; unquantized
    weights are cast to x's dtype (a copy if they differ), fp8 ones kept as they are, their scales in
    float32 (they multiply float32 accumulators)."""
    quantized = check_quantization(gate_up, down, gate_up_scale, down_scale)
    rank = (5 if pretiled else 4) - (layer is None)  # [layers,] experts, (column tiles,) rows, columns
    if gate_up.ndim != rank or down.ndim != rank:
        expected = "[layers, experts, ...] stacks (with a layer index)" if layer is not None else f"{rank}-d"
        raise ValueError(f"gate_up and down must be {expected}{' of column tiles (pretiled)' * pretiled}, got "
                         f"{gate_up.shape} and {down.shape}")
    if layer is None:
        gate_up, down, layer = gate_up[None], down[None], 0
        if quantized:
            gate_up_scale, down_scale = gate_up_scale[None], down_scale[None]
    gate_up_shape, down_shape = _untiled_shape(gate_up.shape, pretiled), _untiled_shape(down.shape, pretiled)
    check_expert_shapes(x, weights, expert_ids, gate_up_shape[1:], down_shape[1:])
    if down.shape[0] != gate_up.shape[0]:
        raise ValueError(f"gate_up has {gate_up.shape[0]} layers but down has {down.shape[0]}")
    if quantized:
        for name, scale, shape in (("gate_up_scale", gate_up_scale, gate_up_shape), ("down_scale", down_scale,
                                                                                    down_shape)):
            expected = (*shape[:2], shape[3])
            if scale.shape != expected:
                raise ValueError(f"{name} must be [(layers,) experts, outputs] = {list(expected)}, got {list(scale.shape)}")
        gate_up_scale, down_scale = gate_up_scale.astype(jnp.float32), down_scale.astype(jnp.float32)
    else:
        gate_up, down = gate_up.astype(x.dtype), down.astype(x.dtype)
    return ExpertStacks(gate_up, down, gate_up_scale, down_scale, jnp.asarray(layer, jnp.int32).reshape(1))


def check_quantization(
    gate_up: Array, down: Array, gate_up_scale: Array | None, down_scale: Array | None
) -> bool:
    """Whether the experts are fp8; raises unless the weights are fp8 exactly when both scales are given."""
    fp8 = {jnp.dtype(gate_up.dtype) == FP8, jnp.dtype(down.dtype) == FP8}
    scaled = {gate_up_scale is not None, down_scale is not None}
    if len(fp8) > 1 or len(scaled) > 1 or fp8 != scaled:
        raise ValueError(
            f"fp8 experts need float8_e4m3fn gate_up and down with both scales (and unquantized ones neither "
            f"scale): got gate_up {gate_up.dtype}, down {down.dtype}, gate_up_scale "
            f"{'given' if gate_up_scale is not None else 'None'}, down_scale "
            f"{'given' if down_scale is not None else 'None'}"
        )
    return fp8 == {True}


def check_expert_shapes(x: Array, weights: Array, expert_ids: Array, gate_up: tuple[int, ...], down: tuple[int, ...]
                  ) -> None:
    """Checks one layer's (plain-layout) weight shapes against x and the routing."""
    tokens, hidden = x.shape
    num_experts, gate_up_in, two_inter = gate_up
    if weights.shape != expert_ids.shape or expert_ids.shape[0] != tokens:
        raise ValueError(
            f"weights {weights.shape} and expert_ids {expert_ids.shape} must both be [tokens={tokens}, k]"
        )
    if gate_up_in != hidden or two_inter % 2:
        raise ValueError(f"gate_up must be [experts, hidden={hidden}, 2 * inter], got {gate_up}")
    if down != (num_experts, two_inter // 2, hidden):
        raise ValueError(f"down must be [experts={num_experts}, inter={two_inter // 2}, hidden={hidden}], got {down}")
    for name, size in (("hidden", hidden), ("inter", two_inter // 2)):
        if size % MIN_BLOCK:
            raise ValueError(f"the expert kernels need {name} to be a multiple of {MIN_BLOCK}, got {size}")


def _accumulate(products: Any, accumulators: int, num_k: int, block_k: int, skew: Array | None,
                shape: tuple[int, int], swap_ab: bool) -> list[Array]:
    """A kernel's k-loop: for each k-block `ks` (from step `skew` on, wrapping around; None: from 0, with no
    modulo in the loop), `products(ks)` loads
    `accumulators` `(rows, weights)` tile pairs and each pair's `rows @ weights` adds into its own float32
    accumulator of `shape` `[rows, cols]`. With `swap_ab` the products are accumulated transposed
    (`weights^T @ rows^T`) and turned back at the end."""
    def product(acc: Array, rows: Array, weights: Array) -> Array:
        if swap_ab:
            return acc + jax.lax.dot_general(weights, rows, (((0,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)
        return acc + jnp.dot(rows, weights, preferred_element_type=jnp.float32)

    def step(k: Array, accs: tuple[Array, ...]) -> tuple[Array, ...]:
        k_step = k if skew is None else jax.lax.rem(k + skew, num_k)
        pairs = products(pl.ds(k_step * block_k, block_k))
        return tuple(product(acc, rows, weights) for acc, (rows, weights) in zip(accs, pairs, strict=True))

    zeros = jnp.zeros(shape[::-1] if swap_ab else shape, jnp.float32)
    accs = jax.lax.fori_loop(0, num_k, step, (zeros,) * accumulators)
    return [acc.T for acc in accs] if swap_ab else list(accs)


def _tile_indices(program: Array, row_tiles: int, column_tiles: int, column_tiles_first: bool
                  ) -> tuple[Array, Array]:
    """(row tile, column tile) of the experts' `program` (counted from their first) under the launch order of
    `_row_tiled_call`."""
    # Program ids are non-negative: lax's truncating div/rem are floor division and mod here, without the sign
    # fix-ups (another remainder each) that jnp's // and % lower to.
    if column_tiles_first:
        return jax.lax.div(program, column_tiles), jax.lax.rem(program, column_tiles)
    return jax.lax.rem(program, row_tiles), jax.lax.div(program, row_tiles)


def _k_skew(skew_k: bool, num_k: int, program: Array) -> Array | None:
    """The k-step this program starts at (`MoeTiles.skew_k`): 7 x its index among the experts' programs, mod
    `num_k`, so neighbours in launch order start apart. None without `skew_k`: the loop then carries no
    modulo (it cost the batch-1 kernels 13-15 registers per thread and the down kernel a program per SM)."""
    if not skew_k:
        return None
    return jax.lax.rem(program * 7, num_k)  # non-negative: rem is mod


def _weight_tile(w_ref: Any, layer: Array, expert: Array, ks: Any, col_tile: Array, block_n: int, pretiled: bool
                 ) -> Array:
    """Column tile `col_tile` (`block_n` wide), rows `ks`, of one expert's weights, in either layout."""
    if pretiled:
        return w_ref[layer, expert, col_tile, ks, :]
    return w_ref[layer, expert, ks, pl.ds(col_tile * block_n, block_n)]


def _run_parts(mlp: _MlpPart | None, experts_part: Any, mlp_part: Any) -> None:
    """Run this program's part: the dense MLP's programs come first in the grid (the longer ones: all tokens'
    rows over the whole contraction, started before the experts' many short ones), then the experts'."""
    if mlp is None:
        experts_part(pl.program_id(0))
        return
    program = pl.program_id(0)
    pl.when(program < mlp.programs)(lambda: mlp_part(jax.lax.rem(program, mlp.token_tiles),
                                                     jax.lax.div(program, mlp.token_tiles)))
    pl.when(program >= mlp.programs)(lambda: experts_part(program - mlp.programs))


def _mlp_rows(token_tile: Array, mlp: _MlpPart, tokens: int) -> Any:
    """The MLP's token rows of `token_tile`: a slice when the tiles divide the tokens; else the tail tile's
    rows past the end repeat the last token (in-bounds loads; their outputs land in padding rows)."""
    first = token_tile * mlp.block_rows
    if tokens % mlp.block_rows == 0:
        return pl.ds(first, mlp.block_rows)
    return jnp.minimum(first + jnp.arange(mlp.block_rows, dtype=jnp.int32), tokens - 1)


def _gate_up_kernel(*refs, block_rows, block_k, block_n, hidden, inter, quantized, swap_ab, column_tiles_first,
                    pretiled, skew_k, row_tiles, mlp, tokens):
    """refs: layer, tile_expert, x (token order), row_token, w, (scale if quantized), (with `mlp`: its x and
    gate_up), then the outputs h (and the MLP's)."""
    layer_ref, tile_expert_ref, x_ref, row_token_ref, w_ref = refs[:5]
    scale_ref = refs[5] if quantized else None
    layer = layer_ref[0]
    num_k = hidden // block_k

    def experts_part(program: Array) -> None:
        row_tile_index, col_tile = _tile_indices(program, row_tiles, inter // block_n, column_tiles_first)
        expert = tile_expert_ref[row_tile_index]
        skew = _k_skew(skew_k, num_k, program)
        h_ref = refs[-2 if mlp else -1]

        @pl.when(expert >= 0)
        def _():
            tokens = row_token_ref[pl.ds(row_tile_index * block_rows, block_rows)]
            gate_cols = pl.ds(col_tile * block_n, block_n)
            up_cols = pl.ds(inter + col_tile * block_n, block_n)
            up_tile = inter // block_n + col_tile  # up's columns of gate's column tile

            def products(ks: Any) -> list[tuple[Array, Array]]:
                xk = x_ref[tokens, ks]
                return [(xk, _weight_tile(w_ref, layer, expert, ks, tile, block_n, pretiled).astype(xk.dtype))
                        for tile in (col_tile, up_tile)]

            acc_gate, acc_up = _accumulate(products, 2, num_k, block_k, skew, (block_rows, block_n), swap_ab)
            if quantized:
                acc_gate *= scale_ref[layer, expert, gate_cols][None, :]
                acc_up *= scale_ref[layer, expert, up_cols][None, :]
            h_ref[pl.ds(row_tile_index * block_rows, block_rows), gate_cols] = (
                gelu_tanh(acc_gate) * acc_up).astype(h_ref.dtype)

    def mlp_part(token_tile: Array, col_tile: Array) -> None:
        mlp_x_ref, mlp_w_ref = refs[5 + quantized:7 + quantized]
        h_mlp_ref = refs[-1]
        mlp_inter = mlp_w_ref.shape[-1] // 2
        rows = _mlp_rows(token_tile, mlp, tokens)
        cols = [pl.ds(offset + col_tile * mlp.block_n, mlp.block_n) for offset in (0, mlp_inter)]

        def products(ks: Any) -> list[tuple[Array, Array]]:
            xk = mlp_x_ref[rows, ks]
            return [(xk, mlp_w_ref[layer, ks, c]) for c in cols]

        acc_gate, acc_up = _accumulate(products, 2, num_k, mlp.block_k, None, (mlp.block_rows, mlp.block_n), False)
        h_mlp_ref[pl.ds(token_tile * mlp.block_rows, mlp.block_rows), cols[0]] = (
            gelu_tanh(acc_gate) * acc_up).astype(h_mlp_ref.dtype)

    _run_parts(mlp, experts_part, mlp_part)


def _gate_up_call(
    x: Array, rows: ExpertRows, layer: Array, gate_up: Array, scale: Array | None, inter: int, block_rows: int,
    tiles: MoeTiles, pretiled: bool, mlp: MlpInputs | None, interpret: bool,
) -> tuple[Array, Array | None]:
    """h `[padded_rows, inter]` of the experts and, with `mlp`, the MLP's `[token tiles * rows, its inter]`."""
    tokens, hidden = x.shape
    block_k = largest_power_of_two_divisor(hidden, tiles.gate_up_block_k)
    block_n = gate_up.shape[-1] if pretiled else largest_power_of_two_divisor(inter, tiles.gate_up_block_n)
    row_tiles = rows.padded_rows // block_rows
    part = None if mlp is None else _mlp_part(tokens, block_k, mlp.gate_up.shape[-1] // 2, block_rows, tiles)
    kernel = functools.partial(
        _gate_up_kernel, block_rows=block_rows, block_k=block_k, block_n=block_n, hidden=hidden, inter=inter,
        quantized=scale is not None, swap_ab=tiles.swap_ab, column_tiles_first=tiles.column_tiles_first,
        pretiled=pretiled, skew_k=tiles.skew_k, row_tiles=row_tiles, mlp=part, tokens=tokens,
    )
    inputs = (layer, rows.tile_expert, x, rows.row_token, gate_up) + ((scale,) if scale is not None else ())
    outputs = [jax.ShapeDtypeStruct((rows.padded_rows, inter), x.dtype)]
    accumulators = 2 * block_rows * block_n  # gate and up
    if part is not None:
        inputs += (mlp.x, mlp.gate_up)
        outputs.append(jax.ShapeDtypeStruct((part.token_tiles * part.block_rows, mlp.gate_up.shape[-1] // 2),
                                            x.dtype))
        accumulators = max(accumulators, 2 * part.block_rows * part.block_n)
    warps = tiles.num_warps or warps_for(accumulators)
    out = _row_tiled_call(kernel, inputs, outputs, row_tiles * (inter // block_n) + (part.programs if part else 0),
                          warps, tiles, interpret, "moe_gate_up")
    return out[0], out[1] if part is not None else None


def mlp_tile(expert_rows: int) -> tuple[int, int]:
    """The MLP's default (token rows, column cap) per program beside experts' row tiles of `expert_rows`: at
    least 64 rows (Hopper's wgmma takes M >= 64 per warpgroup, and fewer token tiles re-read the weights
    less), 16 columns where the experts' tiles are short. Compiled for sm_90a with the default tiles, each
    launch then takes the registers and shared memory of the experts alone: at batch 1 (32-row expert tiles)
    64 x 16 kept 40 KiB and 5 programs per SM, where 64 x 64 took 72 KiB and 3, and 32 x 64 spilled; at
    batch 2 and 8, 64 x 64 and 128 x 64 match the experts' 64 and 128-row tiles."""
    return max(64, expert_rows), 16 if expert_rows < 64 else 64


def _mlp_part(tokens: int, block_k: int, columns: int, expert_rows: int, tiles: MoeTiles) -> _MlpPart:
    """The MLP's programs of a kernel whose products have `columns` output columns over `block_k` steps, beside
    experts' row tiles of `expert_rows`."""
    default_rows, default_n = mlp_tile(expert_rows)
    block_rows = min(tiles.mlp_block_rows or default_rows, max(MIN_BLOCK, pl.next_power_of_2(tokens)))
    block_n = largest_power_of_two_divisor(columns, tiles.mlp_block_n or default_n)
    return _MlpPart(block_rows, block_k, block_n, pl.cdiv(tokens, block_rows), columns // block_n)


def _down_kernel(*refs, block_rows, block_k, block_n, inter, quantized, swap_ab, column_tiles_first, pretiled,
                 skew_k, row_tiles, hidden, mlp):
    """refs: layer, tile_expert, h, row_weight, row_assignment, w, (scale if quantized), (with `mlp`: its h and
    down), then the outputs y (one row per assignment, and a spare row the padding rows write to) and the
    MLP's."""
    layer_ref, tile_expert_ref, h_ref, row_weight_ref, row_assignment_ref, w_ref = refs[:6]
    layer = layer_ref[0]
    num_k = inter // block_k

    def experts_part(program: Array) -> None:
        row_tile_index, col_tile = _tile_indices(program, row_tiles, hidden // block_n, column_tiles_first)
        expert = tile_expert_ref[row_tile_index]
        skew = _k_skew(skew_k, num_k, program)
        y_ref = refs[-2 if mlp else -1]

        @pl.when(expert >= 0)
        def _():
            rows = pl.ds(row_tile_index * block_rows, block_rows)
            cols = pl.ds(col_tile * block_n, block_n)

            def products(ks: Any) -> list[tuple[Array, Array]]:
                hk = h_ref[rows, ks]
                return [(hk, _weight_tile(w_ref, layer, expert, ks, col_tile, block_n, pretiled).astype(hk.dtype))]

            (acc,) = _accumulate(products, 1, num_k, block_k, skew, (block_rows, block_n), swap_ab)
            if quantized:
                acc *= refs[6][layer, expert, cols][None, :]
            y_ref[row_assignment_ref[rows], cols] = (acc * row_weight_ref[rows][:, None]).astype(y_ref.dtype)

    def mlp_part(token_tile: Array, col_tile: Array) -> None:
        h_mlp_ref, mlp_w_ref = refs[6 + quantized:8 + quantized]
        y_mlp_ref = refs[-1]
        rows = pl.ds(token_tile * mlp.block_rows, mlp.block_rows)  # the MLP's h has whole token tiles
        cols = pl.ds(col_tile * mlp.block_n, mlp.block_n)
        num_mlp_k = h_mlp_ref.shape[1] // mlp.block_k

        def products(ks: Any) -> list[tuple[Array, Array]]:
            return [(h_mlp_ref[rows, ks], mlp_w_ref[layer, ks, cols])]

        (acc,) = _accumulate(products, 1, num_mlp_k, mlp.block_k, None, (mlp.block_rows, mlp.block_n), False)
        y_mlp_ref[rows, cols] = acc.astype(y_mlp_ref.dtype)

    _run_parts(mlp, experts_part, mlp_part)


def _down_call(
    h: Array, rows: ExpertRows, out_rows: int, layer: Array, down: Array, scale: Array | None, hidden: int,
    block_rows: int, tiles: MoeTiles, pretiled: bool, mlp: MlpInputs | None, h_mlp: Array | None,
    interpret: bool,
) -> tuple[Array, Array | None]:
    """y `[out_rows, hidden]` of the experts' assignments and, with `mlp`, the MLP's `[h_mlp rows, hidden]`."""
    padded_rows, inter = h.shape
    block_k = largest_power_of_two_divisor(inter, tiles.down_block_k)
    block_n = down.shape[-1] if pretiled else largest_power_of_two_divisor(hidden, tiles.down_block_n)
    row_tiles = padded_rows // block_rows
    part = None
    if mlp is not None:
        tokens = mlp.x.shape[0]
        part = _mlp_part(tokens, largest_power_of_two_divisor(h_mlp.shape[1], tiles.down_block_k), hidden,
                         block_rows, tiles)
    kernel = functools.partial(
        _down_kernel, block_rows=block_rows, block_k=block_k, block_n=block_n, inter=inter,
        quantized=scale is not None, swap_ab=tiles.swap_ab, column_tiles_first=tiles.column_tiles_first,
        pretiled=pretiled, skew_k=tiles.skew_k, row_tiles=row_tiles, hidden=hidden, mlp=part,
    )
    inputs = (layer, rows.tile_expert, h, rows.row_weights, rows.row_assignment, down) + (
        (scale,) if scale is not None else ())
    outputs = [jax.ShapeDtypeStruct((out_rows, hidden), h.dtype)]
    accumulators = block_rows * block_n
    if part is not None:
        inputs += (h_mlp, mlp.down)
        outputs.append(jax.ShapeDtypeStruct((h_mlp.shape[0], hidden), h.dtype))
        accumulators = max(accumulators, part.block_rows * part.block_n)
    warps = tiles.num_warps or warps_for(accumulators)
    out = _row_tiled_call(kernel, inputs, outputs, row_tiles * (hidden // block_n) + (part.programs if part else 0),
                          warps, tiles, interpret, "moe_down")
    return out[0], out[1] if part is not None else None


def _row_tiled_call(
    kernel: Any, inputs: tuple[Array, ...], outputs: list[jax.ShapeDtypeStruct], programs: int, num_warps: int,
    tiles: MoeTiles, interpret: bool, name: str,
) -> list[Array]:
    """Launch `kernel` on a one-dimensional grid of `programs`: the MLP's (if any), then the experts' (row tile,
    output column tile) blocks, column tiles first or row tiles first (`MoeTiles.column_tiles_first`, decoded
    by `_tile_indices`). Inputs and outputs whole: each program picks its expert's weights and writes its
    `[block_rows, block_n]` block (or scatters its rows) itself."""
    return pl.pallas_call(
        kernel,
        out_shape=outputs,
        grid=(programs,),
        in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=[pl.no_block_spec] * len(outputs),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
