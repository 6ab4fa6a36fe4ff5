"""Mixture-of-experts on Hopper through Pallas' Mosaic GPU lowering: TMA copies and warpgroup MMAs.

Beside `diffjax.kernels.moe` (Triton lowering), same maths, for two reasons. JAX 0.11 deprecated Pallas'
Triton backend; Mosaic GPU is the NVIDIA lowering it keeps. And it exposes what Hopper needs to stream
weights at bandwidth and multiply at the tensor-core rate, explicitly: TMA bulk copies of whole tiles into a
ring of shared-memory slots (`plgpu.emit_pipeline`), and asynchronous `wgmma`s reading both operands from
shared memory while the next tiles land. The Triton kernels reached ~90 TFLOP/s at batch 8 on an H100
(2026-11-26), where the batch-8 target needs several hundred.

TMA copies whole boxes of contiguous rows, so the assignments are sorted by expert (the gate/up kernel
reads a sorted copy of x), each expert's group starting on a multiple of 8 rows (Mosaic GPU lays out a
tiled copy only from a tile row; < 8 alignment rows per expert). Each group is cut into ceil(group /
block_rows) *tiles* starting at its own first row: a tile multiplies block_rows rows from there by its
expert's weights and stores only its expert's rows, through a ladder of power-of-two TMA stores (a TMA box
has a static size; any row count is a sum of powers of two). So no tile is shared between experts, each
tile streams its expert's weights once (at batch 1, ~16-row groups, each expert is one tile), and the rows
multiplied are a group padded to whole tiles without a padded copy of anything. There are at most
cdiv(assignments, block_rows) + experts - 1 tiles; the unused tail of the grid returns at once.

1. gate/up: `h = gelu_tanh(x @ W_gate[e]) * (x @ W_up[e])`, both halves in float32 accumulators fed by the
   same x tile in the same k-step, the activation applied once before the store of `h [rows, inter]`.
2. down: `y = h @ W_down[e]` into `y [rows, hidden]` (sorted order).

Each token's top_k rows of y are then weighted and summed by XLA (one fused gather).

Hopper only (sm_90a: TMA and wgmma), bf16 or fp16 activations, plain-layout experts in the activation dtype
or float8_e4m3fn (`diffjax.quantize`: each k-step widens the e4m3 tiles in shared memory for the MMAs, and
the float32 accumulators are scaled per column after the loop; not warp-specialised). On a CPU the kernels
run in Mosaic GPU's interpreter, which simulates shared memory, TMA and barriers. There, reads past the
sorted rows (zeros from TMA on a GPU) and reads of rows no kernel wrote (the alignment rows) give NaN, so a
finite result also shows that no row outside its tile's expert is ever stored. Twin:
`diffjax.layers.experts_grouped`.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from diffjax.kernels import largest_power_of_two_divisor, require_block, resolve_interpret
from diffjax.kernels.moe import expert_stacks, with_twin_gradients
from diffjax.layers import gelu_tanh

Array = jax.Array

# wgmma multiplies 64 rows per warpgroup.
WGMMA_ROWS = 64
# Tiled TMA copies start on a multiple of 8 rows: each expert's group of sorted rows starts on one.
ROW_ALIGN = 8
DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# The row tiles are the grid's second axis, which CUDA caps at 65535 blocks.
MAX_GRID_Y = 65535
# Shared memory one H100/H200 block may hold (227 KiB), less a little for the pipeline's barriers.
SHARED_MEMORY_BYTES = 227 * 1024 - 256


@dataclasses.dataclass(frozen=True)
class MgpuMoeTiles:
    """Block sizes of the two Mosaic GPU expert kernels (the k and n blocks are caps, lowered to powers of
    two dividing the model's sizes) and the depth of their shared-memory rings."""

    block_rows: int = 64  # a multiple of 64 (wgmma's rows per warpgroup)
    block_k: int = 64  # 64 bf16 = 128 bytes: one 128-byte-swizzled row of a tile
    gate_up_block_n: int = 64  # gate and up accumulators of this width each
    down_block_n: int = 128
    # Slots of the copy ring: k-steps in flight. One is held back while its MMAs still read it.
    max_concurrent_steps: int = 4
    # 1: one warpgroup per block issues the copies and the MMAs. 2: warp-specialised, as JAX's Hopper matmul
    # example: a copy warpgroup feeds the ring and two compute warpgroups each multiply 64 of the block's
    # rows (block_rows 128), for the compute-bound batches.
    compute_warpgroups: int = 1

    def validate(self) -> None:
        if self.compute_warpgroups not in (1, 2):
            raise ValueError(f"MgpuMoeTiles.compute_warpgroups must be 1 or 2, got {self.compute_warpgroups}")
        rows = WGMMA_ROWS * self.compute_warpgroups
        if self.block_rows <= 0 or self.block_rows % rows:
            raise ValueError(f"MgpuMoeTiles.block_rows must be a positive multiple of {rows} (64 rows per compute "
                             f"warpgroup), got {self.block_rows}")
        for name in ("block_k", "gate_up_block_n", "down_block_n"):
            require_block(f"MgpuMoeTiles.{name}", getattr(self, name))
        if self.max_concurrent_steps < 2:
            raise ValueError(f"MgpuMoeTiles.max_concurrent_steps must be >= 2 (one slot is held while its MMAs "
                             f"run), got {self.max_concurrent_steps}")


@functools.partial(jax.jit, static_argnames=("tiles", "pretiled", "interpret"))
def experts_mgpu(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None = None,
    *, gate_up_scale: Array | None = None, down_scale: Array | None = None, tiles: MgpuMoeTiles = MgpuMoeTiles(),
    pretiled: bool = False, interpret: bool | None = None,
) -> Array:
    """Mixture of experts over the routed (token, expert) pairs only; same maths as `experts_grouped`.

    x `[tokens, hidden]` (bf16 or fp16), weights/expert_ids `[tokens, k]`, gate_up `[experts, hidden, 2 *
    inter]` (gate first half, up second), down `[experts, inter, hidden]`; hidden and inter multiples of 16.
    Returns `[tokens, hidden]` in x's dtype. With `layer` (an int32 scalar, traced is fine) gate_up/down are
    `[layers, experts, ...]` stacks read in place, as in `experts_pallas`. FP8 experts as `experts_pallas`
    takes them: float8_e4m3fn stacks with `gate_up_scale [(layers,) experts, 2 * inter]` and `down_scale
    [(layers,) experts, hidden]` (float32, `diffjax.quantize`). `pretiled`: weights as
    `moe.pretile_experts` lays them out, each TMA box of a weight tile then one contiguous block; the
    column blocks are the stacks' tile widths instead of `tiles`'. Differentiable: gradients come from the
    plain-JAX twin (`moe.with_twin_gradients`).
    """
    kernel = functools.partial(_experts_mgpu, tiles=tiles, pretiled=pretiled, interpret=interpret)
    return with_twin_gradients(kernel, pretiled)(x, weights, expert_ids, gate_up, down, layer, gate_up_scale,
                                                 down_scale)


def _experts_mgpu(
    x: Array, weights: Array, expert_ids: Array, gate_up: Array, down: Array, layer: Array | int | None,
    gate_up_scale: Array | None, down_scale: Array | None, *, tiles: MgpuMoeTiles, pretiled: bool,
    interpret: bool | None,
) -> Array:
    if jnp.dtype(x.dtype) not in DTYPES:
        raise ValueError(f"experts_mgpu multiplies in bf16 or fp16 (wgmma), got x {x.dtype}: cast the activations "
                         "(a bf16 model: --dtype bfloat16) or use moe_implementation='pallas'")
    interpret = resolve_interpret(interpret)
    if not interpret:
        check_hopper()
    gate_up, down, gate_up_scale, down_scale, layer = expert_stacks(
        x, weights, expert_ids, gate_up, down, layer, gate_up_scale, down_scale, pretiled)
    tiles.validate()
    if gate_up_scale is not None and tiles.compute_warpgroups != 1:
        raise ValueError("experts_mgpu runs fp8 experts with MgpuMoeTiles(compute_warpgroups=1)")
    tokens, hidden = x.shape
    num_experts = gate_up.shape[1]
    top_k = expert_ids.shape[1]
    assignments = tokens * top_k

    layout = sorted_layout(expert_ids.reshape(-1), num_experts, tiles.block_rows)
    if layout.tiles.shape[0] > MAX_GRID_Y:
        raise ValueError(f"{assignments} (token, expert) assignments make {layout.tiles.shape[0]} row tiles of "
                         f"{tiles.block_rows}, over the {MAX_GRID_Y} a CUDA grid's second axis holds: pass fewer "
                         "tokens per call (e.g. a smaller prefill chunk) or larger block_rows")
    sorted_tokens = jnp.zeros((layout.rows,), jnp.int32).at[layout.row].set(  # alignment rows: token 0
        jnp.arange(assignments, dtype=jnp.int32) // top_k)
    run = functools.partial(_call, layer=layer, table=layout.tiles, tiles=tiles, pretiled=pretiled,
                            interpret=interpret)
    h = run(x[sorted_tokens], w=gate_up, scale=gate_up_scale, epilogue=lambda gate, up: gelu_tanh(gate) * up,
            accumulators=2, block_n_cap=tiles.gate_up_block_n, name="moe_mgpu_gate_up")
    ys = run(h, w=down, scale=down_scale, epilogue=lambda y: y, accumulators=1, block_n_cap=tiles.down_block_n,
             name="moe_mgpu_down")
    per_assignment = ys[layout.row].reshape(tokens, top_k, hidden).astype(jnp.float32)
    return jnp.einsum("tkh,tk->th", per_assignment, weights.astype(jnp.float32)).astype(x.dtype)


def check_hopper() -> None:
    """Raise `ValueError` unless JAX's GPU (if it runs on one) is a Hopper: wgmma exists on sm_90 only
    (Blackwell has other matrix instructions). Lowering for CUDA from a CPU host is fine."""
    if jax.default_backend() != "gpu":
        return
    device = jax.devices()[0]
    capability = str(getattr(device, "compute_capability", ""))
    if capability and not capability.startswith("9"):
        raise ValueError(f"the Mosaic GPU expert kernels need a Hopper GPU (TMA and wgmma, compute capability 9.x); "
                         f"this is a {device.device_kind} ({capability}): use moe_implementation='pallas'")


class SortedLayout(NamedTuple):
    """Where the assignments go in the expert-sorted rows the kernels read and write."""

    row: Array  # [A] the sorted row of each assignment (token * top_k + j)
    tiles: Array  # [cdiv(A, block_rows) + experts - 1, 3] (expert, first row, row count); unused: 0 rows
    rows: int  # static row count of the sorted arrays


def sorted_layout(expert_of_assignment: Array, num_experts: int, block_rows: int) -> SortedLayout:
    """The A assignments sorted by expert, each expert's group starting at a multiple of `ROW_ALIGN` rows
    (Mosaic GPU lays out a tiled TMA copy only from a tile row), and the grid's tiles: each group cut into
    ceil(group / block_rows) tiles from its own first row, so no tile holds two experts' rows.
    Bound: sum ceil(n_e / b) <= cdiv(A, b) + experts - 1."""
    (num_assignments,) = expert_of_assignment.shape
    sizes = jnp.bincount(expert_of_assignment, length=num_experts).astype(jnp.int32)
    aligned_sizes = -(-sizes // ROW_ALIGN) * ROW_ALIGN
    starts = jnp.cumsum(aligned_sizes) - aligned_sizes
    order = jnp.argsort(expert_of_assignment, stable=True)
    sorted_experts = expert_of_assignment[order]
    rank = jnp.arange(num_assignments, dtype=jnp.int32) - (jnp.cumsum(sizes) - sizes)[sorted_experts]
    row = jnp.zeros((num_assignments,), jnp.int32).at[order].set(starts[sorted_experts] + rank)

    tiles_per_expert = -(-sizes // block_rows)
    tile_ends = jnp.cumsum(tiles_per_expert)
    tile = jnp.arange(-(-num_assignments // block_rows) + num_experts - 1, dtype=jnp.int32)
    # compare_all: one fused comparison instead of a while loop (see `routing.expert_rows_reference`).
    expert = jnp.minimum(jnp.searchsorted(tile_ends, tile, side="right", method="compare_all"),
                         num_experts - 1).astype(jnp.int32)
    offset = (tile - (tile_ends - tiles_per_expert)[expert]) * block_rows
    count = jnp.where(tile < tile_ends[-1], jnp.minimum(sizes[expert] - offset, block_rows), 0)
    # Static: each group padded by < ROW_ALIGN rows, and each tile views block_rows rows from its first.
    rows = max(num_assignments + min(num_experts, num_assignments) * (ROW_ALIGN - 1), block_rows)
    rows = -(-rows // ROW_ALIGN) * ROW_ALIGN
    return SortedLayout(row, jnp.stack([expert, starts[expert] + offset, count], axis=1), rows)


def _interpret_params(interpret: bool) -> Any:
    """Mosaic GPU's interpreter settings, or None to compile. Out-of-bounds reads give NaN (see the module
    docstring): the interpreter would otherwise raise where TMA reads zeros."""
    if not interpret:
        return None
    try:
        from jax.experimental.pallas.mosaic_gpu import InterpretGPUParams
    except ImportError:  # jax 0.10 keeps it private
        from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams(out_of_bounds_reads="uninitialized")


def _store_rows(o_smem: Any, o_gmem: Any, row0: Array, count: Array, cols: Any, max_rows: int) -> None:
    """Store the first `count` rows of the shared tile `o_smem` to rows `row0 ..` of `o_gmem` (columns
    `cols`): one TMA store per set bit of `count`, largest first."""
    start, size = 0, 1 << (max_rows.bit_length() - 1)
    while size:
        @pl.when((count & size) != 0)
        def _(start=start, size=size):
            plgpu.copy_smem_to_gmem(o_smem.at[pl.ds(start, size)], o_gmem.at[pl.ds(row0 + start, size), cols])

        start = start + (count & size)
        size //= 2
    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def _widen(tile: Array, dtype: Any) -> Array:
    """e4m3 weights to the activation dtype (exact). Hopper converts e4m3 only to f16 in one step; bf16 goes
    through float32."""
    if jnp.dtype(dtype) == jnp.dtype(jnp.float16):
        return tile.astype(dtype)
    return tile.astype(jnp.float32).astype(dtype)


def _tile_kernel(
    epilogue: Any, *, accumulators: int, pretiled: bool, quantized: bool, dtype: Any, num_k: int,
    block_rows: int, block_k: int, block_n: int, stages: int, max_rows: int, compute_warpgroups: int,
    interpret: bool,
) -> Any:
    """The kernel body of both: refs (layer, tile table, rows `[R, K]`, weight stack `[..., K, N]` or pretiled
    `[..., N / block_n, K, block_n]`, (scales `[..., N]` if quantized), output `[R, N / accumulators]`).
    Accumulator i multiplies the tile's rows by the weight columns `i * N / accumulators + col_tile * block_n
    ..` of the tile's expert (gate/up: two, gate and up; down: one); `epilogue(*accumulated)` makes the
    stored tile. fp8 weights: each k-step widens its e4m3 tiles into shared buffers the MMAs read, and the
    accumulators are scaled per column after the loop. With `compute_warpgroups` > 1 the block is
    warp-specialised: one more warpgroup only issues the TMA copies, and each compute warpgroup multiplies
    its own 64-row slice of the row tile and stores its own rows."""
    rows_per_warpgroup = block_rows // compute_warpgroups
    weight_bytes = 1 if quantized else 2
    # Single warpgroup: the ring is freed before the output tile is allocated; specialised: the output tiles
    # are allocated first, for all warpgroups together. The fp8 buffers live throughout. 2-byte activations.
    slots = min(stages, num_k)  # the pipelines allocate no more slots than steps
    ring = slots * (2 * block_rows * block_k + weight_bytes * accumulators * block_k * block_n)
    out_tile = 2 * block_rows * block_n
    fp8_buffers = accumulators * (2 * block_k * block_n + 4 * block_n) if quantized else 0
    smem = (max(ring, out_tile) if compute_warpgroups == 1 else ring + out_tile) + fp8_buffers
    if smem > SHARED_MEMORY_BYTES:
        raise ValueError(
            f"MgpuMoeTiles too large for shared memory: {slots} slots of a {block_rows}x{block_k} row tile and "
            f"{accumulators} {block_k}x{block_n} weight tile(s) take {smem} bytes of the {SHARED_MEMORY_BYTES} a "
            "block may use: lower max_concurrent_steps or a block size"
        )
    store_rows = min(rows_per_warpgroup, max_rows)

    def body(layer_ref: Any, table_ref: Any, rows_ref: Any, w_ref: Any, *refs: Any) -> None:
        *scale_ref, out_ref = refs
        col_tile, tile = jax.lax.axis_index("col_tile"), jax.lax.axis_index("tile")
        expert, first, count = table_ref[tile, 0], table_ref[tile, 1], table_ref[tile, 2]
        layer = layer_ref[0]
        expert_weights = w_ref.at[layer, expert]
        if pretiled:  # [column tiles, K, block_n]: this column tile of each accumulator's part, [K, block_n]
            part_tiles = expert_weights.shape[0] // accumulators
            weight_views = [expert_weights.at[i * part_tiles + col_tile] for i in range(accumulators)]
        else:  # [K, N]: each accumulator's part [K, N / accumulators], tiled by the pipeline
            width = expert_weights.shape[-1] // accumulators
            weight_views = [expert_weights.at[:, pl.ds(i * width, width)] for i in range(accumulators)]
        cols = pl.ds(col_tile * block_n, block_n)
        # The tile's rows start at its expert's own row, not at a block boundary; the rows past its count
        # (the next expert's, or past the end: zeros on the GPU) are multiplied and never stored.
        specs = [plgpu.BlockSpec((pl.Element(block_rows), block_k), lambda k: (pl.multiple_of(first, ROW_ALIGN), k),
                                 delay_release=1)]
        weight_tile = plgpu.BlockSpec((block_k, block_n), lambda k: (k, 0 if pretiled else col_tile), delay_release=1)
        specs += [weight_tile] * accumulators

        def multiply_step(accs: tuple[Any, ...], rows_smem: Any, weight_smems: tuple[Any, ...],
                          widened: Any) -> None:
            if quantized:
                plgpu.wgmma_wait(0)  # the previous step's MMAs read the widened buffers
                for i, w_smem in enumerate(weight_smems):
                    widened[i] = _widen(w_smem[...], dtype)
                plgpu.commit_smem()
                weight_smems = tuple(widened.at[i] for i in range(accumulators))
            for acc, w_smem in zip(accs, weight_smems, strict=True):
                plgpu.wgmma(acc, rows_smem, w_smem)
            # The step's MMAs stay in flight; the previous step's are done, so its slot can refill.
            plgpu.wgmma_wait(accumulators)

        def start_scale_copies(scales_smem: Any, barriers: Any) -> None:
            part = scale_ref[0].shape[-1] // accumulators  # the scales keep the plain column order
            for i in range(accumulators):
                plgpu.copy_gmem_to_smem(scale_ref[0].at[layer, expert, pl.ds(i * part + col_tile * block_n, block_n)],
                                        scales_smem.at[i], barriers.at[i])

        def scaled(accs: tuple[Any, ...], rows: int, scales_smem: Any, barriers: Any) -> list[Array]:
            values = [acc[...] for acc in accs]
            if not quantized:
                return values
            out = []
            for i, value in enumerate(values):
                plgpu.barrier_wait(barriers.at[i])
                scale = scales_smem[i]
                if not interpret:  # a layout hint the interpreter does not take
                    scale = plgpu.layout_cast(scale, plgpu.Layout.WGMMA.reduce(0))
                out.append(value * jax.lax.broadcast_in_dim(scale, (rows, block_n), [1]))
            return out

        def store(values: list[Array], out_smem: Any, warpgroup: Array | int) -> None:
            """This warpgroup's slice of the tile: epilogue, then its rows of the tile's expert to HBM."""
            out_smem[...] = epilogue(*values).astype(out_ref.dtype)
            plgpu.commit_smem()
            low = warpgroup * rows_per_warpgroup
            _store_rows(out_smem, out_ref, first + low, jnp.clip(count - low, 0, rows_per_warpgroup), cols,
                        store_rows)

        def with_fp8_buffers(run: Any) -> None:
            """`run(widened, scales_smem, barriers)`, with shared buffers for fp8 weights (None otherwise)."""
            if not quantized:
                return run(None, None, None)
            pl.run_scoped(run, plgpu.SMEM((accumulators, block_k, block_n), dtype),
                          plgpu.SMEM((accumulators, block_n), jnp.float32), plgpu.Barrier(num_barriers=accumulators))

        if compute_warpgroups == 1:
            @pl.when(count > 0)
            def _() -> None:
                def run(widened: Any, scales_smem: Any, barriers: Any) -> None:
                    if quantized:
                        start_scale_copies(scales_smem, barriers)

                    def k_loop(*accs: Any) -> None:
                        plgpu.emit_pipeline(
                            lambda _, rows_smem, *weight_smems: multiply_step(accs, rows_smem, weight_smems, widened),
                            grid=(num_k,), in_specs=specs, max_concurrent_steps=stages,
                        )(rows_ref, *weight_views)
                        values = scaled(accs, block_rows, scales_smem, barriers)
                        pl.run_scoped(lambda out_smem: store(values, out_smem, 0),
                                      plgpu.SMEM((block_rows, block_n), out_ref.dtype))

                    pl.run_scoped(k_loop, *[plgpu.ACC((block_rows, block_n))] * accumulators)

                with_fp8_buffers(run)
            return

        warpgroup = jax.lax.axis_index("warpgroup")

        def specialised(out_smem: Any) -> None:
            @pl.when(count > 0)
            def _() -> None:
                def compute_context(run_pipeline: Any) -> None:
                    def with_accumulators(*accs: Any) -> None:
                        run_pipeline(accs)
                        store(scaled(accs, rows_per_warpgroup, None, None), out_smem.at[warpgroup], warpgroup)

                    pl.run_scoped(with_accumulators, *[plgpu.ACC((rows_per_warpgroup, block_n))] * accumulators)

                def step(_: Any, rows_smem: Any, *refs: Any) -> tuple[Any, ...]:
                    *weight_smems, accs = refs
                    own_rows = rows_smem.at[pl.ds(warpgroup * rows_per_warpgroup, rows_per_warpgroup)]
                    multiply_step(accs, own_rows, tuple(weight_smems), None)
                    return accs

                plgpu.emit_pipeline_warp_specialized(
                    step, grid=(num_k,), memory_registers=40, in_specs=specs, wg_axis="warpgroup",
                    num_compute_wgs=compute_warpgroups, max_concurrent_steps=stages, compute_context=compute_context,
                )(rows_ref, *weight_views)

        # Allocated by every warpgroup together (the copy warpgroup included), as the pipeline's ring is.
        pl.run_scoped(specialised, plgpu.SMEM((compute_warpgroups, rows_per_warpgroup, block_n), out_ref.dtype),
                      collective_axes="warpgroup")

    return body


def _call(
    rows_in: Array, layer: Array, table: Array, w: Array, scale: Array | None, epilogue: Any, *, accumulators: int,
    block_n_cap: int, tiles: MgpuMoeTiles, pretiled: bool, interpret: bool, name: str,
) -> Array:
    """One of the two kernels over the tiles of `table`: `rows_in [R, K]` times each tile's expert's
    weights (`w [layers, experts, K, accumulators * n]`, or pretiled) -> `[R, n]`."""
    rows, k = rows_in.shape
    if pretiled:
        block_n = w.shape[-1]
        width = w.shape[2] * block_n // accumulators
    else:
        width = w.shape[-1] // accumulators
        block_n = largest_power_of_two_divisor(width, block_n_cap)
    block_k = largest_power_of_two_divisor(k, tiles.block_k)
    body = _tile_kernel(
        epilogue, accumulators=accumulators, pretiled=pretiled, quantized=scale is not None, dtype=rows_in.dtype,
        num_k=k // block_k, block_rows=tiles.block_rows, block_k=block_k, block_n=block_n,
        stages=tiles.max_concurrent_steps, max_rows=min(tiles.block_rows, rows),
        compute_warpgroups=tiles.compute_warpgroups, interpret=interpret,
    )
    body.__name__ = name  # the kernel's name in profiles
    specialised = ({} if tiles.compute_warpgroups == 1 else
                   {"num_threads": tiles.compute_warpgroups + 1, "thread_name": "warpgroup"})
    # Column tiles are the grid's fastest axis: the programs sharing a tile's rows (and its expert's weight
    # rows) run side by side.
    return plgpu.kernel(
        body,
        out_type=jax.ShapeDtypeStruct((rows, width), rows_in.dtype),
        grid=(width // block_n, table.shape[0]),
        grid_names=("col_tile", "tile"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        interpret=_interpret_params(interpret),
        **specialised,
    )(layer, table, rows_in, w, *(() if scale is None else (scale,)))
