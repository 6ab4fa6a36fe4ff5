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

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import largest_power_of_two_divisor, resolve_interpret
from diffjax.layers import gelu_tanh

Array = jax.Array

# Triton's tensor-core dot needs every block dimension >= 16.
_MIN_BLOCK = 16


def row_tile(num_assignments: int, num_experts: int) -> int:
    """Row tile for a given load: about the mean group size (less padding), 16..128 rows, a power of two."""
    mean_rows = max(1, num_assignments // num_experts)
    tile = _MIN_BLOCK
    while tile < 128 and tile < mean_rows:
        tile *= 2
    return tile


@functools.partial(jax.jit, static_argnames=("block_rows", "interpret"))
def experts_pallas(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array,
    *, block_rows: int | None = None, interpret: bool | None = None,
) -> Array:
    """Mixture of experts over the routed (token, expert) pairs only; same maths as `experts_grouped`.

    x `[tokens, hidden]`, weights/expert_ids `[tokens, k]`, gate_up `[experts, hidden, 2 * inter]` (gate first
    half, up second), down `[experts, inter, hidden]`. hidden and inter must be multiples of 16.
    block_rows: row tile (a power of two >= 16; default `row_tile`). Returns `[tokens, hidden]` in x's dtype.
    """
    tokens, hidden = x.shape
    num_experts, _, two_inter = gate_up.shape
    inter = two_inter // 2
    top_k = expert_ids.shape[1]
    _check_shapes(x, weights, expert_ids, gate_up, down)
    block_rows = row_tile(tokens * top_k, num_experts) if block_rows is None else block_rows
    if block_rows < _MIN_BLOCK or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= {_MIN_BLOCK}, got {block_rows}")
    interpret = resolve_interpret(interpret)

    layout = _padded_layout(expert_ids, num_experts, block_rows)
    token_of = layout.order // top_k
    xs = jnp.zeros((layout.padded_rows, hidden), x.dtype).at[layout.dest].set(x[token_of])
    row_weights = jnp.zeros((layout.padded_rows,), jnp.float32).at[layout.dest].set(
        weights.reshape(-1)[layout.order].astype(jnp.float32)
    )
    h = _gate_up_call(xs, layout.tile_expert, gate_up.astype(x.dtype), inter, block_rows, interpret)
    ys = _down_call(h, row_weights, layout.tile_expert, down.astype(x.dtype), block_rows, interpret)
    # Assignment a = token * top_k + j sits at padded row dest_of[a]: gather and sum each token's k rows.
    dest_of = jnp.zeros_like(layout.dest).at[layout.order].set(layout.dest)
    per_assignment = ys[dest_of].reshape(tokens, top_k, hidden)
    return jnp.sum(per_assignment.astype(jnp.float32), axis=1).astype(x.dtype)


class _Layout:
    """Where each expert-sorted assignment goes in the row-tile-padded buffer."""

    def __init__(self, order: Array, dest: Array, tile_expert: Array, padded_rows: int) -> None:
        self.order = order  # [A] assignment indices sorted by expert (stable)
        self.dest = dest  # [A] padded row of the i-th sorted assignment
        self.tile_expert = tile_expert  # [padded_rows // block_rows] expert of each row tile, -1 = unused
        self.padded_rows = padded_rows


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
        if size % _MIN_BLOCK:
            raise ValueError(f"experts_pallas needs {name} to be a multiple of {_MIN_BLOCK}, got {size}")


def _gate_up_kernel(tile_expert_ref, x_ref, w_ref, h_ref, *, block_rows, block_k, block_n, hidden, inter):
    row_tile_index, col_tile = pl.program_id(0), pl.program_id(1)
    expert = tile_expert_ref[row_tile_index]

    @pl.when(expert >= 0)
    def _():
        rows = pl.ds(row_tile_index * block_rows, block_rows)
        gate_cols = pl.ds(col_tile * block_n, block_n)
        up_cols = pl.ds(inter + col_tile * block_n, block_n)

        def step(k, acc):
            acc_gate, acc_up = acc
            ks = pl.ds(k * block_k, block_k)
            xk = x_ref[rows, ks]
            acc_gate += jnp.dot(xk, w_ref[expert, ks, gate_cols], preferred_element_type=jnp.float32)
            acc_up += jnp.dot(xk, w_ref[expert, ks, up_cols], preferred_element_type=jnp.float32)
            return acc_gate, acc_up

        zeros = jnp.zeros((block_rows, block_n), jnp.float32)
        acc_gate, acc_up = jax.lax.fori_loop(0, hidden // block_k, step, (zeros, zeros))
        h_ref[...] = (gelu_tanh(acc_gate) * acc_up).astype(h_ref.dtype)


def _gate_up_call(
    xs: Array, tile_expert: Array, gate_up: Array, inter: int, block_rows: int, interpret: bool
) -> Array:
    padded_rows, hidden = xs.shape
    block_k = largest_power_of_two_divisor(hidden, 64)
    block_n = largest_power_of_two_divisor(inter, 64)
    kernel = functools.partial(
        _gate_up_kernel, block_rows=block_rows, block_k=block_k, block_n=block_n, hidden=hidden, inter=inter
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, inter), xs.dtype),
        grid=(padded_rows // block_rows, inter // block_n),
        in_specs=[pl.no_block_spec, pl.no_block_spec, pl.no_block_spec],
        out_specs=pl.BlockSpec((block_rows, block_n), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="moe_gate_up",
    )(tile_expert, xs, gate_up)


def _down_kernel(tile_expert_ref, h_ref, row_weight_ref, w_ref, y_ref, *, block_rows, block_k, block_n, inter):
    row_tile_index, col_tile = pl.program_id(0), pl.program_id(1)
    expert = tile_expert_ref[row_tile_index]

    @pl.when(expert >= 0)
    def _():
        rows = pl.ds(row_tile_index * block_rows, block_rows)
        cols = pl.ds(col_tile * block_n, block_n)

        def step(k, acc):
            ks = pl.ds(k * block_k, block_k)
            return acc + jnp.dot(h_ref[rows, ks], w_ref[expert, ks, cols], preferred_element_type=jnp.float32)

        acc = jax.lax.fori_loop(0, inter // block_k, step, jnp.zeros((block_rows, block_n), jnp.float32))
        y_ref[...] = (acc * row_weight_ref[rows][:, None]).astype(y_ref.dtype)


def _down_call(
    h: Array, row_weights: Array, tile_expert: Array, down: Array, block_rows: int, interpret: bool
) -> Array:
    padded_rows, inter = h.shape
    hidden = down.shape[2]
    block_k = largest_power_of_two_divisor(inter, 64)
    block_n = largest_power_of_two_divisor(hidden, 128)
    kernel = functools.partial(
        _down_kernel, block_rows=block_rows, block_k=block_k, block_n=block_n, inter=inter
    )
    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((padded_rows, hidden), h.dtype),
        grid=(padded_rows // block_rows, hidden // block_n),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=pl.BlockSpec((block_rows, block_n), lambda i, j: (i, j)),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=interpret,
        name="moe_down",
    )(tile_expert, h, row_weights, down)
