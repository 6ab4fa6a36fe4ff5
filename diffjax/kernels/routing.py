"""The router and the experts' row layout as two Pallas kernels (Triton lowering).

Why: in XLA a layer's routing compiles to 15 small launches on a GPU (the router's matmul and its split-k
reduction, softmax, the top-k sort and its slice, renormalisation, then the layout's bincount, cumsum,
argsort, scatters, gathers and tile search): ~420 of the ~1,130 launches of a full-size decoder step compiled
for an H200 (`diffjax.compiled`), each a few microseconds of almost no work. These two kernels do it in two
launches:

1. `route_pallas`: a program per block of tokens projects them onto the experts' scores (the router's
   [hidden, experts] matmul) and picks each token's top-k experts by k rounds of argmax (ties to the lower
   expert, as `jax.lax.top_k`), weighing them by a softmax over the chosen scores alone (the full softmax's
   denominator cancels in the renormalisation), times the per-expert scale. Twin: `diffjax.layers.route`.
   `RouteTiles(project=False)` leaves the matmul to XLA and only picks in the kernel.
2. `expert_rows_pallas`: a program per expert counts its assignments and those of lower experts, which fixes
   where its tiles start without knowing the other experts' padding (the layout below), then writes its rows'
   maps (token, routing weight, assignment) and its tiles' expert. Twin: `expert_rows_reference`.

The layout (`ExpertRows`): the tokens * k (token, expert) assignments in expert order, stable, each expert's
group starting on a row tile and padded to whole tiles, so a row tile belongs to one expert. Expert e's group
starts at the first tile boundary at or after `(assignments to experts < e) + e * (block_rows - 1)`: every
expert before it is then given room for its worst-case padding, so its start needs no other expert's count,
and the tiles nobody uses (-1) lie between groups instead of only at the end. The row and tile counts stay
within the static bound `assignments + experts * (block_rows - 1)` rows.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import MIN_BLOCK, require_block, require_launch, resolve_interpret, with_twin_backward
from diffjax.layers import route, router_scores

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class RouteTiles:
    """`route_pallas`'s blocks and Triton launch parameters. On an H200 at batch 1 the defaults took 34 us a
    layer: each program streams the whole router weight (0.7 MB at the released shapes) through its SM, so the
    time is one SM's bandwidth, which deeper pipelining (num_stages) or wider steps may raise
    (`python -m diffjax.kernels.bench --sweep --sections routing` times the candidates)."""

    # Tokens per program (a power of two >= 16: Triton's dot): [32, 128] float32 scores are 32 registers per
    # thread on 4 warps.
    block_tokens: int = 32
    # Hidden columns per step of the projection: a [32, 128] input block and a [128, 128] weight block.
    block_hidden: int = 128
    num_warps: int = 4
    num_stages: int | None = None  # None: the Triton lowering's default
    # False: XLA makes the scores (`layers.router_scores`, a matmul spread over many SMs) and the kernel only
    # picks from them, two launches instead of one.
    project: bool = True

    def validate(self) -> None:
        for name in ("block_tokens", "block_hidden"):
            require_block(f"RouteTiles.{name}", getattr(self, name))
        require_launch("RouteTiles", self.num_warps, self.num_stages)


# Assignments per step of `expert_rows_pallas`'s loops over all of them (each program reads every expert id).
ROWS_CHUNK = 1024


def route_pallas(normed_residual: Array, scale: Array, proj: Array, per_expert_scale: Array, k: int, *,
                 tiles: RouteTiles = RouteTiles(), interpret: bool | None = None) -> tuple[Array, Array]:
    """`diffjax.layers.route` (same arguments and results) in one launch: the router's projection, then each
    token's k highest-scoring experts, best first, ties to the lower expert; weights a softmax over the chosen
    scores, times each chosen expert's scale. normed_residual `[tokens, hidden]`, scale `[hidden]`, proj
    `[hidden, experts]`, per_expert_scale `[experts]`. Returns (weights `[tokens, k]` float32, expert ids
    `[tokens, k]` int32). Differentiable in everything but k (through the twin)."""
    if normed_residual.ndim != 2:
        raise ValueError(f"normed_residual must be [tokens, hidden], got shape {normed_residual.shape}")
    hidden = normed_residual.shape[1]
    if scale.shape != (hidden,) or proj.ndim != 2 or proj.shape[0] != hidden:
        raise ValueError(f"scale {scale.shape} and proj {proj.shape} must be [hidden={hidden}] and "
                         f"[hidden={hidden}, experts]")
    num_experts = proj.shape[1]
    if per_expert_scale.shape != (num_experts,):
        raise ValueError(f"per_expert_scale has shape {per_expert_scale.shape}, expected ({num_experts},)")
    if not 1 <= k <= num_experts:
        raise ValueError(f"k must be in 1..{num_experts} (the number of experts), got {k}")
    tiles.validate()
    kernel = functools.partial(_route, k=k, tiles=tiles, interpret=resolve_interpret(interpret))
    return with_twin_backward(kernel, functools.partial(route, k=k), lambda args: (0, 1, 2, 3))(
        normed_residual, scale, proj, per_expert_scale)


@functools.partial(jax.jit, static_argnames=("k", "tiles", "interpret"))
def _route(normed_residual: Array, scale: Array, proj: Array, per_expert_scale: Array, *, k: int,
           tiles: RouteTiles, interpret: bool) -> tuple[Array, Array]:
    tokens, hidden = normed_residual.shape
    dtype = normed_residual.dtype
    block_tokens = min(tiles.block_tokens, max(MIN_BLOCK, pl.next_power_of_2(tokens)))
    block_hidden = min(tiles.block_hidden, max(MIN_BLOCK, pl.next_power_of_2(hidden)))
    kernel = functools.partial(_route_kernel, tokens=tokens, hidden=hidden, num_experts=proj.shape[1], k=k,
                               block_tokens=block_tokens, block_hidden=block_hidden, multiplier=hidden**-0.5)
    inputs = ((normed_residual, scale.astype(dtype), proj.astype(dtype)) if tiles.project
              else (router_scores(normed_residual, scale, proj),))
    return pl.pallas_call(
        kernel,
        grid=(pl.cdiv(tokens, block_tokens),),
        out_shape=(jax.ShapeDtypeStruct((tokens, k), jnp.float32), jax.ShapeDtypeStruct((tokens, k), jnp.int32)),
        in_specs=[pl.no_block_spec] * (len(inputs) + 1),
        out_specs=[pl.no_block_spec] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="route",
    )(*inputs, per_expert_scale)


def _route_kernel(*refs, tokens, hidden, num_experts, k, block_tokens, block_hidden, multiplier):
    """refs: (normed residual, scale, proj) to project here, or the scores made outside; then the per-expert
    scale and the two outputs."""
    *inputs, per_expert_ref, weights_ref, ids_ref = refs
    # Triton blocks are powers of two (a dot's at least 16): the expert, slot and hidden axes are widened and
    # masked.
    experts_width, slots_width = max(MIN_BLOCK, pl.next_power_of_2(num_experts)), pl.next_power_of_2(k)
    first = pl.program_id(0) * block_tokens
    rows = first + jnp.arange(block_tokens, dtype=jnp.int32)
    expert = jnp.arange(experts_width, dtype=jnp.int32)
    slot = jnp.arange(slots_width, dtype=jnp.int32)
    in_rows = (rows < tokens)[:, None]
    in_experts = expert < num_experts
    if len(inputs) == 1:
        scores = plgpu.load(inputs[0].at[pl.ds(first, block_tokens), pl.ds(0, experts_width)],
                            mask=in_rows & in_experts[None, :], other=0.0)
    else:
        scores = _project(*inputs, first, in_rows, experts_width, in_experts, hidden, block_tokens, block_hidden,
                          multiplier)
    remaining = jnp.where(in_experts[None, :], scores.astype(jnp.float32), -jnp.inf)
    scale = plgpu.load(per_expert_ref.at[pl.ds(0, experts_width)], mask=in_experts, other=0.0)
    chosen_scores = jnp.zeros((block_tokens, slots_width), jnp.float32)
    chosen_scale = jnp.zeros((block_tokens, slots_width), jnp.float32)
    chosen = jnp.zeros((block_tokens, slots_width), jnp.int32)
    top = jnp.max(remaining, axis=1)
    for j in range(k):
        pick = jnp.argmax(remaining, axis=1).astype(jnp.int32)  # the first of equal maxima
        picked = expert[None, :] == pick[:, None]
        here = slot[None, :] == j
        chosen_scores = jnp.where(here, jnp.max(remaining, axis=1)[:, None], chosen_scores)
        chosen_scale = jnp.where(here, jnp.sum(jnp.where(picked, scale[None, :], 0.0), axis=1)[:, None],
                                 chosen_scale)
        chosen = jnp.where(here, pick[:, None], chosen)
        remaining = jnp.where(picked, -jnp.inf, remaining)
    in_slots = slot[None, :] < k
    # The empty slots weigh exp(-inf) = 0.
    e = jnp.exp(jnp.where(in_slots, chosen_scores - top[:, None], -jnp.inf))
    weights = e / jnp.sum(e, axis=1, keepdims=True) * chosen_scale
    out = (pl.ds(first, block_tokens), pl.ds(0, slots_width))
    plgpu.store(weights_ref.at[out], weights, mask=in_rows & in_slots)
    plgpu.store(ids_ref.at[out], chosen, mask=in_rows & in_slots)


def _project(x_ref, scale_ref, proj_ref, first, in_rows, experts_width, in_experts, hidden, block_tokens,
             block_hidden, multiplier):
    """This program's tokens' scores `[block_tokens, experts_width]` in the activation dtype, as the unfused
    router rounds them: its input rounded after each product, the matmul's float32 sums once."""
    dtype = x_ref.dtype

    def step_scores(step, scores):
        columns = step * block_hidden + jnp.arange(block_hidden, dtype=jnp.int32)
        at = pl.ds(step * block_hidden, block_hidden)
        x = plgpu.load(x_ref.at[pl.ds(first, block_tokens), at], mask=in_rows & (columns < hidden)[None, :],
                       other=0.0)
        x = x * plgpu.load(scale_ref.at[at], mask=columns < hidden, other=0.0)[None, :]
        x = x * jnp.asarray(multiplier, dtype)
        w = plgpu.load(proj_ref.at[at, pl.ds(0, experts_width)],
                       mask=(columns < hidden)[:, None] & in_experts[None, :], other=0.0)
        return scores + jnp.dot(x, w, preferred_element_type=jnp.float32)

    scores = jax.lax.fori_loop(0, pl.cdiv(hidden, block_hidden), step_scores,
                               jnp.zeros((block_tokens, experts_width), jnp.float32))
    return scores.astype(dtype)


class ExpertRows(NamedTuple):
    """Where each routed row of the grouped matmuls comes from and goes (the layout of this module's doc).

    row_token / row_weights / row_assignment `[>= padded_rows]`: each padded row's token (0 for padding
    rows), routing weight (0) and assignment index `token * k + slot` (`assignments` for padding rows: the
    spare output row they write to). tile_expert `[>= padded_rows // block_rows]`: each row tile's expert,
    -1 where unused. Entries past padded_rows (and its tiles) are scratch the kernel may write: read none."""

    row_token: Array
    row_weights: Array
    row_assignment: Array
    tile_expert: Array
    padded_rows: int


def padded_rows_bound(assignments: int, num_experts: int, block_rows: int) -> int:
    """Rows of the layout (a multiple of block_rows): every group padded by at most block_rows - 1 rows."""
    return -(-(assignments + num_experts * (block_rows - 1)) // block_rows) * block_rows


def expert_rows_reference(expert_ids: Array, weights: Array, num_experts: int, block_rows: int) -> ExpertRows:
    """The layout in plain JAX (exactly sized arrays). expert_ids / weights `[tokens, k]`."""
    tokens, k = expert_ids.shape
    assignments = tokens * k
    flat = expert_ids.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    before = jnp.cumsum(sizes) - sizes  # assignments to lower experts
    starts = _group_start(before, jnp.arange(num_experts, dtype=jnp.int32), block_rows)
    sorted_experts = flat[order]
    dest = starts[sorted_experts] + jnp.arange(assignments, dtype=jnp.int32) - before[sorted_experts]
    padded_rows = padded_rows_bound(assignments, num_experts, block_rows)
    row_assignment = jnp.full((padded_rows,), assignments, jnp.int32).at[dest].set(order)
    row_token = jnp.where(row_assignment < assignments, row_assignment // k, 0)
    row_weights = jnp.append(weights.reshape(-1).astype(jnp.float32), 0.0)[row_assignment]
    tile_starts = jnp.arange(padded_rows // block_rows, dtype=jnp.int32) * block_rows
    # compare_all: one fused comparison; the default method is a while loop (5 GPU launches per iteration).
    tile_owner = jnp.searchsorted(starts, tile_starts, side="right", method="compare_all").astype(jnp.int32) - 1
    tile_expert = jnp.where(tile_starts < starts[tile_owner] + sizes[tile_owner], tile_owner, -1)
    return ExpertRows(row_token, row_weights, row_assignment, tile_expert, padded_rows)


def _group_start(before: Array, expert: Array, block_rows: int) -> Array:
    """First row of each expert's group: the tile boundary at or after before + expert * (block_rows - 1)."""
    return (before + expert * (block_rows - 1) + block_rows - 1) // block_rows * block_rows


def expert_rows_pallas(expert_ids: Array, weights: Array, num_experts: int, block_rows: int, *,
                       interpret: bool | None = None) -> ExpertRows:
    """`expert_rows_reference`'s layout from one launch of `num_experts` programs. Its arrays carry scratch
    entries past the layout (see `ExpertRows`): 2 * block_rows rows and a few tiles."""
    tokens, k = expert_ids.shape
    assignments = tokens * k
    padded_rows = padded_rows_bound(assignments, num_experts, block_rows)
    num_tiles = padded_rows // block_rows
    # An expert owns at most ceil(tokens / block_rows) used tiles and 2 padding ones.
    tile_span = pl.next_power_of_2(-(-tokens // block_rows) + 2)
    kernel = functools.partial(
        _expert_rows_kernel, assignments=assignments, k=k, num_experts=num_experts, block_rows=block_rows,
        padded_rows=padded_rows, tile_span=tile_span, chunk=min(ROWS_CHUNK, pl.next_power_of_2(assignments)))
    rows = padded_rows + 2 * block_rows
    row_token, row_weights, row_assignment, tile_expert = pl.pallas_call(
        kernel,
        grid=(num_experts,),
        out_shape=(jax.ShapeDtypeStruct((rows,), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.float32),
                   jax.ShapeDtypeStruct((rows,), jnp.int32),
                   jax.ShapeDtypeStruct((num_tiles + tile_span,), jnp.int32)),
        in_specs=[pl.no_block_spec] * 2,
        out_specs=[pl.no_block_spec] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=resolve_interpret(interpret),
        name="expert_rows",
    )(expert_ids.reshape(-1).astype(jnp.int32), weights.reshape(-1).astype(jnp.float32))
    return ExpertRows(row_token, row_weights, row_assignment, tile_expert, padded_rows)


def _expert_rows_kernel(ids_ref, weights_ref, row_token_ref, row_weights_ref, row_assignment_ref,
                        tile_expert_ref, *, assignments, k, num_experts, block_rows, padded_rows, tile_span, chunk):
    expert = pl.program_id(0)
    lanes = jnp.arange(chunk, dtype=jnp.int32)

    def load_ids(step: Array) -> tuple[Array, Array]:
        index = step * chunk + lanes
        # Past the end reads as expert `num_experts`: neither this expert nor below it.
        return index, plgpu.load(ids_ref.at[pl.ds(step * chunk, chunk)], mask=index < assignments,
                                 other=num_experts)

    def count(step: Array, counts: tuple[Array, Array]) -> tuple[Array, Array]:
        mine, before = counts
        _, ids = load_ids(step)
        return mine + jnp.sum((ids == expert).astype(jnp.int32)), before + jnp.sum((ids < expert).astype(jnp.int32))

    steps = pl.cdiv(assignments, chunk)
    size, before = jax.lax.fori_loop(0, steps, count, (jnp.int32(0), jnp.int32(0)))
    start = _group_start(before, expert, block_rows)
    end = start + size
    next_start = _group_start(before + size, expert + 1, block_rows)  # padded_rows for the last expert

    def place(step: Array, placed: Array) -> Array:
        index, ids = load_ids(step)
        mine = ids == expert
        # Rows of other experts' assignments point at the scratch row past the layout (a masked lane does not
        # store on a GPU; the interpreter writes its old value back, which must not land on a real row).
        dest = jnp.where(mine, start + placed + jnp.cumsum(mine.astype(jnp.int32)) - 1, padded_rows)
        weight = plgpu.load(weights_ref.at[pl.ds(step * chunk, chunk)], mask=index < assignments, other=0.0)
        plgpu.store(row_token_ref.at[dest], index // k, mask=mine)
        plgpu.store(row_weights_ref.at[dest], weight, mask=mine)
        plgpu.store(row_assignment_ref.at[dest], index, mask=mine)
        return placed + jnp.sum(mine.astype(jnp.int32))

    jax.lax.fori_loop(0, steps, place, jnp.int32(0))
    # The padding rows up to the next group's start: at most 2 * (block_rows - 1).
    padding = pl.ds(end, 2 * block_rows)
    in_padding = end + jnp.arange(2 * block_rows, dtype=jnp.int32) < next_start
    plgpu.store(row_token_ref.at[padding], jnp.zeros((2 * block_rows,), jnp.int32), mask=in_padding)
    plgpu.store(row_weights_ref.at[padding], jnp.zeros((2 * block_rows,), jnp.float32), mask=in_padding)
    plgpu.store(row_assignment_ref.at[padding], jnp.full((2 * block_rows,), assignments, jnp.int32),
                mask=in_padding)
    tile = start // block_rows + jnp.arange(tile_span, dtype=jnp.int32)
    plgpu.store(tile_expert_ref.at[pl.ds(start // block_rows, tile_span)],
                jnp.where(tile * block_rows < end, expert, -1), mask=tile < next_start // block_rows)
