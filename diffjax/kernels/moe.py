"""Mixture-of-experts as a block-sparse grouped matmul (Pallas, Triton lowering).

The tokens * top_k (token, expert) assignments are sorted by expert and each expert's group is padded to a
multiple of the row tile, so every row tile belongs to exactly one expert. A small int32 array maps each row
tile to its expert (-1 for the unused tail tiles, which do nothing); a program of the grid
(row tile, output column tile) reads only its expert's weight columns. Two kernels:

1. gate/up: `h = gelu_tanh(x @ W_gate[e]) * (x @ W_up[e])`, both halves accumulated in float32 in the same
   k-loop (one pass over x), the activation fused before the single store of `h [padded_rows, inter]`.
2. down: `y = weight * (h @ W_down[e])`, the routing weight of each row fused into the store.

The padded rows are then gathered back per token and summed over its top_k experts.
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

from diffjax.kernels import MIN_BLOCK, largest_power_of_two_divisor, require_block, resolve_interpret
from diffjax.layers import gelu_tanh

Array = jax.Array


def row_tile(num_assignments: int, num_experts: int) -> int:
    """Row tile for a given load: about the mean group size (less padding), 16..128 rows, a power of two."""
    mean_rows = max(1, num_assignments // num_experts)
    tile = MIN_BLOCK
    while tile < 128 and tile < mean_rows:
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
    num_warps: int = 4
    num_stages: int = 3

    def validate(self) -> None:
        for name in ("gate_up_block_k", "gate_up_block_n", "down_block_k", "down_block_n"):
            require_block(f"MoeTiles.{name}", getattr(self, name))
        if self.block_rows is not None:
            require_block("MoeTiles.block_rows", self.block_rows)


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def experts_pallas(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None = None,
    *, tiles: MoeTiles = MoeTiles(), interpret: bool | None = None,
) -> Array:
    """Mixture of experts over the routed (token, expert) pairs only; same maths as `experts_grouped`.

    x `[tokens, hidden]`, weights/expert_ids `[tokens, k]`, gate_up `[experts, hidden, 2 * inter]` (gate first
    half, up second), down `[experts, inter, hidden]`. hidden and inter must be multiples of 16.
    Returns `[tokens, hidden]` in x's dtype.

    With `layer` (an int32 scalar, traced is fine), gate_up/down are stacks `[layers, experts, ...]` and the
    kernels read layer `layer`'s experts in place: slicing the stack first (e.g. a scan over layers) would
    materialise a copy of the slice, since a custom call cannot take a view of a dynamic slice.
    """
    if layer is None:
        gate_up, down, layer = gate_up[None], down[None], 0
    elif gate_up.ndim != 4 or down.ndim != 4:
        raise ValueError(
            f"with a layer index, gate_up and down must be [layers, experts, ...] stacks, got {gate_up.shape} "
            f"and {down.shape}"
        )
    tokens, hidden = x.shape
    _, num_experts, _, two_inter = gate_up.shape
    inter = two_inter // 2
    top_k = expert_ids.shape[1]
    _check_shapes(x, weights, expert_ids, gate_up[0], down[0])
    if down.shape[0] != gate_up.shape[0]:
        raise ValueError(f"gate_up has {gate_up.shape[0]} layers but down has {down.shape[0]}")
    tiles.validate()
    layer = jnp.asarray(layer, jnp.int32).reshape(1)
    block_rows = tiles.block_rows or row_tile(tokens * top_k, num_experts)
    interpret = resolve_interpret(interpret)

    layout = _padded_layout(expert_ids, num_experts, block_rows)
    token_of = layout.order // top_k
    xs = jnp.zeros((layout.padded_rows, hidden), x.dtype).at[layout.dest].set(x[token_of])
    row_weights = jnp.zeros((layout.padded_rows,), jnp.float32).at[layout.dest].set(
        weights.reshape(-1)[layout.order].astype(jnp.float32)
    )
    h = _gate_up_call(xs, layer, layout.tile_expert, gate_up.astype(x.dtype), inter, block_rows, tiles, interpret)
    ys = _down_call(h, row_weights, layer, layout.tile_expert, down.astype(x.dtype), block_rows, tiles, interpret)
    # Assignment a = token * top_k + j sits at padded row dest_of[a]: gather and sum each token's k rows.
    dest_of = jnp.zeros_like(layout.dest).at[layout.order].set(layout.dest)
    per_assignment = ys[dest_of].reshape(tokens, top_k, hidden)
    return jnp.sum(per_assignment.astype(jnp.float32), axis=1).astype(x.dtype)


class _Layout(NamedTuple):
    """Where each expert-sorted assignment goes in the row-tile-padded buffer."""

    order: Array  # [A] assignment indices sorted by expert (stable)
    dest: Array  # [A] padded row of the i-th sorted assignment
    tile_expert: Array  # [padded_rows // block_rows] expert of each row tile, -1 = unused
    padded_rows: int


def _padded_layout(expert_ids: Array, num_experts: int, block_rows: int) -> _Layout:
    flat = expert_ids.reshape(-1)
    num_assignments = flat.shape[0]
    order = jnp.argsort(flat, stable=True)
    sorted_experts = flat[order]
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    padded_sizes = (sizes + block_rows - 1) // block_rows * block_rows
    starts = jnp.cumsum(sizes) - sizes
    padded_ends = jnp.cumsum(padded_sizes)
    padded_starts = padded_ends - padded_sizes
    rank = jnp.arange(num_assignments, dtype=jnp.int32) - starts[sorted_experts]
    dest = padded_starts[sorted_experts] + rank
    # Static bound: each expert wastes at most block_rows - 1 padding rows.
    max_rows = num_assignments + min(num_experts, num_assignments) * (block_rows - 1)
    num_tiles = -(-max_rows // block_rows)
    tile_starts = jnp.arange(num_tiles, dtype=jnp.int32) * block_rows
    tile_expert = jnp.searchsorted(padded_ends, tile_starts, side="right").astype(jnp.int32)
    tile_expert = jnp.where(tile_starts < padded_ends[-1], tile_expert, -1)
    return _Layout(order, dest, tile_expert, num_tiles * block_rows)


def _check_shapes(x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array) -> None:
    tokens, hidden = x.shape
    num_experts, gate_up_in, two_inter = gate_up.shape
    if weights.shape != expert_ids.shape or expert_ids.shape[0] != tokens:
        raise ValueError(
            f"weights {weights.shape} and expert_ids {expert_ids.shape} must both be [tokens={tokens}, k]"
        )
    if gate_up_in != hidden or two_inter % 2:
        raise ValueError(f"gate_up must be [experts, hidden={hidden}, 2 * inter], got {gate_up.shape}")
    if down.shape != (num_experts, two_inter // 2, hidden):
        raise ValueError(
            f"down must be [experts={num_experts}, inter={two_inter // 2}, hidden={hidden}], got {down.shape}"
        )
    for name, size in (("hidden", hidden), ("inter", two_inter // 2)):
        if size % MIN_BLOCK:
            raise ValueError(f"experts_pallas needs {name} to be a multiple of {MIN_BLOCK}, got {size}")


def _gate_up_kernel(layer_ref, tile_expert_ref, x_ref, w_ref, h_ref, *, block_rows, block_k, block_n, hidden,
                    inter):
    row_tile_index, col_tile = pl.program_id(0), pl.program_id(1)
    layer, expert = layer_ref[0], tile_expert_ref[row_tile_index]

    @pl.when(expert >= 0)
    def _():
        rows = pl.ds(row_tile_index * block_rows, block_rows)
        gate_cols = pl.ds(col_tile * block_n, block_n)
        up_cols = pl.ds(inter + col_tile * block_n, block_n)

        def step(k, acc):
            acc_gate, acc_up = acc
            ks = pl.ds(k * block_k, block_k)
            xk = x_ref[rows, ks]
            acc_gate += jnp.dot(xk, w_ref[layer, expert, ks, gate_cols], preferred_element_type=jnp.float32)
            acc_up += jnp.dot(xk, w_ref[layer, expert, ks, up_cols], preferred_element_type=jnp.float32)
            return acc_gate, acc_up

        zeros = jnp.zeros((block_rows, block_n), jnp.float32)
        acc_gate, acc_up = jax.lax.fori_loop(0, hidden // block_k, step, (zeros, zeros))
        h_ref[...] = (gelu_tanh(acc_gate) * acc_up).astype(h_ref.dtype)


def _gate_up_call(
    xs: Array, layer: Array, tile_expert: Array, gate_up: Array, inter: int, block_rows: int, tiles: MoeTiles,
    interpret: bool,
) -> Array:
    padded_rows, hidden = xs.shape
    block_k = largest_power_of_two_divisor(hidden, tiles.gate_up_block_k)
    block_n = largest_power_of_two_divisor(inter, tiles.gate_up_block_n)
    kernel = functools.partial(
        _gate_up_kernel, block_rows=block_rows, block_k=block_k, block_n=block_n, hidden=hidden, inter=inter
    )
    return _row_tiled_call(kernel, (layer, tile_expert, xs, gate_up), (padded_rows, inter), xs.dtype, block_rows,
                           block_n, tiles, interpret, "moe_gate_up")


def _down_kernel(layer_ref, tile_expert_ref, h_ref, row_weight_ref, w_ref, y_ref, *, block_rows, block_k, block_n,
                 inter):
    row_tile_index, col_tile = pl.program_id(0), pl.program_id(1)
    layer, expert = layer_ref[0], tile_expert_ref[row_tile_index]

    @pl.when(expert >= 0)
    def _():
        rows = pl.ds(row_tile_index * block_rows, block_rows)
        cols = pl.ds(col_tile * block_n, block_n)

        def step(k, acc):
            ks = pl.ds(k * block_k, block_k)
            w = w_ref[layer, expert, ks, cols]
            return acc + jnp.dot(h_ref[rows, ks], w, preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, inter // block_k, step, jnp.zeros((block_rows, block_n), jnp.float32))
        y_ref[...] = (acc * row_weight_ref[rows][:, None]).astype(y_ref.dtype)


def _down_call(
    h: Array, row_weights: Array, layer: Array, tile_expert: Array, down: Array, block_rows: int, tiles: MoeTiles,
    interpret: bool,
) -> Array:
    padded_rows, inter = h.shape
    hidden = down.shape[3]
    block_k = largest_power_of_two_divisor(inter, tiles.down_block_k)
    block_n = largest_power_of_two_divisor(hidden, tiles.down_block_n)
    kernel = functools.partial(
        _down_kernel, block_rows=block_rows, block_k=block_k, block_n=block_n, inter=inter
    )
    return _row_tiled_call(kernel, (layer, tile_expert, h, row_weights, down), (padded_rows, hidden), h.dtype,
                           block_rows, block_n, tiles, interpret, "moe_down")


def _row_tiled_call(
    kernel: Any, inputs: tuple[Array, ...], out_shape: tuple[int, int], dtype: Any, block_rows: int, block_n: int,
    tiles: MoeTiles, interpret: bool, name: str,
) -> Array:
    """Launch `kernel` over a (row tile, output column tile) grid: inputs whole (each program picks its expert's
    weights itself), each program writing one `[block_rows, block_n]` block of the output."""
    rows, cols = out_shape
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct(out_shape, dtype),
        grid=(rows // block_rows, cols // block_n),
        in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=pl.BlockSpec((block_rows, block_n), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name=name,
    )(*inputs)
