"""Statistics of the next-token distribution in one pass over the vocabulary, without float32 logits.

Per row, with `z = softcap(h @ E^T) / temperature` over the vocabulary: logsumexp, entropy, argmax, and a
Gumbel-max sample `argmax(z + g)`, with their log-probabilities (`diffjax.sampling.TokenStatistics`). The
kernel (Pallas, Triton lowering) runs a grid of (row block, vocabulary split); each program walks its
split's vocabulary tiles keeping a running max, sum of exponentials, entropy accumulator, argmax and best
perturbed logit in registers, and writes only these per-row partials; a small XLA step combines the
splits (the split-K of flash-decoding, over the vocabulary). The float32 `[rows, vocab]` logits never reach
memory; with `return_logits` the kernel also stores `z` once in the hidden state's dtype (bf16 for the
released model), the copy self-conditioning reads at the next step.

The Gumbel noise is a counter-based hash of (seed, row, token id) (`diffjax.sampling.gumbel_noise`), so
the kernel and its twin (`vocab_stats_reference`: logits materialised, then
`diffjax.sampling.token_statistics`) draw the same samples.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
from jax.sharding import PartitionSpec as P

from diffjax.kernels import (
    FINITE_NEG,
    MIN_BLOCK,
    largest_power_of_two_divisor,
    require_block,
    require_launch,
    resolve_interpret,
)
from diffjax.model import tied_logits
from diffjax.sampling import TokenStatistics, gumbel_noise, scale_logits, token_statistics

Array = jax.Array

# Programs to aim for: a few waves of an H100's 132 SMs.
_TARGET_PROGRAMS = 512
# Above every token id: the "no token yet" of running argmaxes (min over ids picks the first among ties).
_NO_TOKEN = 2**31 - 1


def vocab_stats_reference(
    hidden: Array, embedding: Array, temperature: Array | float, *, seed: Array | int, softcap: float | None,
    return_logits: bool = False,
) -> TokenStatistics | tuple[TokenStatistics, Array]:
    """The plain-JAX twin: float32 logits `[..., vocab]`, then `token_statistics`; with `return_logits`,
    also `z` in the hidden state's dtype, as the kernel returns it."""
    z = scale_logits(tied_logits(hidden, embedding, softcap), temperature)
    stats = token_statistics(z, seed)
    return (stats, z.astype(hidden.dtype)) if return_logits else stats


@dataclasses.dataclass(frozen=True)
class VocabTiles:
    """Block sizes (powers of two >= 16; block_v and block_k are caps, lowered to divide vocab and hidden),
    vocabulary splits and Triton launch parameters of the statistics kernel."""

    block_rows: int = 64  # lowered for fewer rows
    block_v: int = 128
    block_k: int = 64
    splits: int | None = None  # must divide the number of vocabulary tiles; None: enough to fill the GPU
    num_warps: int = 4
    num_stages: int = 3

    def validate(self) -> None:
        """Raise `ValueError` naming a setting that no shape can run (splits must also divide the vocabulary
        tiles: checked against the shapes)."""
        for name in ("block_rows", "block_v", "block_k"):
            require_block(f"VocabTiles.{name}", getattr(self, name))
        require_launch("VocabTiles", self.num_warps, self.num_stages, self.splits)


@functools.partial(jax.jit, static_argnames=("softcap", "return_logits", "tiles", "interpret"))
def vocab_stats_pallas(
    hidden: Array, embedding: Array, temperature: Array | float, *, seed: Array | int, softcap: float | None,
    return_logits: bool = False, tiles: VocabTiles = VocabTiles(), interpret: bool | None = None,
) -> TokenStatistics | tuple[TokenStatistics, Array]:
    """Same outputs as `vocab_stats_reference`, in one pass over `embedding [vocab, hidden]`.

    hidden `[..., hidden]`, embedding `[vocab, hidden]`, temperature > 0 (a traced scalar is fine). With
    `return_logits`, also `z [..., vocab]` in hidden's dtype. Sizes that are not multiples of 16 (Triton's
    smallest dot) are zero-padded, the padded vocabulary masked out; that costs a padded copy of the
    embedding per call, which the released shapes (hidden 2816, vocab 262144) never need.

    Under a `diffjax.sharding` mesh (`jax.set_mesh`) the same kernel runs per device as a `jax.shard_map`:
    rows split over `data`, the vocabulary over the expert group (as `shard_params` places the embedding),
    each device's per-split partials all-gathered over the group (a few floats per row) and combined; the
    logits come out split the same way. Same numbers, same draws as one device. Without that, XLA would
    replicate the embedding onto every device to feed the custom call.
    """
    width = hidden.shape[-1]
    if embedding.ndim != 2 or embedding.shape[1] != width:
        raise ValueError(f"embedding must be [vocab, hidden={width}], got {embedding.shape}")
    tiles.validate()
    temperature = jnp.asarray(temperature, jnp.float32).reshape(1)
    seed = jnp.asarray(seed).astype(jnp.uint32).reshape(1)
    local = functools.partial(
        _local_stats, softcap=softcap, return_logits=return_logits, tiles=tiles, interpret=resolve_interpret(interpret)
    )
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return local(hidden, embedding.astype(hidden.dtype), temperature, seed, row_axis=None, group_axes=())
    return _sharded_stats(local, mesh, hidden, embedding.astype(hidden.dtype), temperature, seed, return_logits)


def _sharded_stats(
    local: Any, mesh: Any, hidden: Array, embedding: Array, temperature: Array, seed: Array, return_logits: bool,
) -> TokenStatistics | tuple[TokenStatistics, Array]:
    """`_local_stats` as a shard_map over a (data, expert, model) mesh (see `vocab_stats_pallas`)."""
    from diffjax.sharding import AXES, DATA, EXPERT_GROUP  # sharding imports the model, as this module does

    if tuple(mesh.axis_names) != AXES:
        raise ValueError(f"the fused vocabulary pass needs a diffjax mesh {AXES}, got {tuple(mesh.axis_names)}")
    group = math.prod(mesh.shape[a] for a in EXPERT_GROUP)
    # Split the vocabulary only as `shard_params` does: where the group divides it (else it is replicated).
    group_axes = EXPERT_GROUP if embedding.shape[0] % group == 0 else ()
    row_axis = DATA if hidden.shape[0] % mesh.shape[DATA] == 0 else None
    rows = P(row_axis)
    stats_spec = TokenStatistics(*(rows,) * len(TokenStatistics._fields))
    logits_spec = P(*rows, *(None,) * (hidden.ndim - 2), group_axes or None)
    sharded = jax.shard_map(
        functools.partial(local, row_axis=row_axis, group_axes=group_axes), mesh=mesh,
        in_specs=(rows, P(group_axes or None, None), P(), P()),
        out_specs=(stats_spec, logits_spec) if return_logits else stats_spec,
        # pallas_call outputs carry no varying-axes type; the stats are equal over the group by construction
        # (every member combines the same gathered partials).
        check_vma=False,
    )
    return sharded(hidden, embedding, temperature, seed)


def _local_stats(
    hidden: Array, embedding: Array, temperature: Array, seed: Array, *, row_axis: str | None,
    group_axes: tuple[str, ...], softcap: float | None, return_logits: bool, tiles: VocabTiles, interpret: bool,
) -> TokenStatistics | tuple[TokenStatistics, Array]:
    """The kernel over this device's rows and vocabulary slice. Inside a shard_map, `row_axis` names the mesh
    axis splitting the rows and `group_axes` those splitting the vocabulary: the offsets of this device's
    pieces make row and token ids (hence the Gumbel noise) global, and the partials are gathered over the
    group."""
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    vocab = embedding.shape[0]
    rows = hidden.size // width
    row_offset = jax.lax.axis_index(row_axis) * rows if row_axis else jnp.zeros((), jnp.int32)
    vocab_offset = jax.lax.axis_index(group_axes) * vocab if group_axes else jnp.zeros((), jnp.int32)
    padded_width = -(-width // MIN_BLOCK) * MIN_BLOCK
    # A vocabulary that needs padding anyway is padded to whole tiles of block_v (not 16-wide ones).
    padded_vocab = vocab if vocab % MIN_BLOCK == 0 else -(-vocab // tiles.block_v) * tiles.block_v
    if (padded_vocab, padded_width) != (vocab, width):  # never at the released shapes: no 1.5 GB copy
        embedding = jnp.pad(embedding, ((0, padded_vocab - vocab), (0, padded_width - width)))
    block_rows = min(tiles.block_rows, max(MIN_BLOCK, pl.next_power_of_2(rows)))
    block_v = largest_power_of_two_divisor(padded_vocab, tiles.block_v)
    block_k = largest_power_of_two_divisor(padded_width, tiles.block_k)
    num_tiles = padded_vocab // block_v
    row_blocks = pl.cdiv(rows, block_rows)
    splits = tiles.splits or largest_power_of_two_divisor(num_tiles, max(1, _TARGET_PROGRAMS // row_blocks))
    if num_tiles % splits:
        raise ValueError(f"splits ({splits}) must divide the {num_tiles} vocabulary tiles of {block_v}")

    padded = row_blocks * block_rows
    h = jnp.pad(hidden.reshape(rows, width), ((0, padded - rows), (0, padded_width - width)))
    kernel = functools.partial(
        _stats_kernel, block_rows=block_rows, block_v=block_v, block_k=block_k, width=padded_width,
        tiles_per_split=num_tiles // splits, vocab=vocab, mask_tail=padded_vocab != vocab, softcap=softcap,
        return_logits=return_logits,
    )
    f32, i32 = jnp.float32, jnp.int32
    partial_shapes = [jax.ShapeDtypeStruct((splits * padded,), d) for d in (f32, f32, f32, f32, i32, f32, i32, f32)]
    out_specs = [pl.BlockSpec((block_rows,), lambda i, s: (s * row_blocks + i,))] * len(partial_shapes)
    if return_logits:
        # Whole-array output: each program stores its own (row block, vocabulary tile) pieces.
        partial_shapes.append(jax.ShapeDtypeStruct((padded, padded_vocab), hidden.dtype))
        out_specs.append(pl.no_block_spec)
    outputs = pl.pallas_call(
        kernel,
        out_shape=partial_shapes,
        grid=(row_blocks, splits),
        in_specs=[pl.no_block_spec] * 5,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=interpret,
        name="vocab_stats",
    )(temperature, seed, jnp.stack([row_offset, vocab_offset]), h, embedding)
    partials = [p.reshape(splits, padded)[:, :rows] for p in outputs[:8]]
    if group_axes:  # every member's splits, member-major: token order, as one device would have them
        partials = [jax.lax.all_gather(p, group_axes, axis=0, tiled=True) for p in partials]
    stats = TokenStatistics(*(s.reshape(lead) for s in _combine(*partials)))
    if not return_logits:
        return stats
    # At the released shapes rows = batch x 256 is a whole number of row blocks: no slice, no copy.
    logits = outputs[8] if (padded, padded_vocab) == (rows, vocab) else outputs[8][:rows, :vocab]
    return stats, logits.reshape(*lead, vocab)


def _stats_kernel(temp_ref, seed_ref, offsets_ref, h_ref, e_ref, max_ref, sum_ref, ent_ref, top_ref, top_id_ref,
                  race_ref, race_id_ref, race_z_ref, *logits_ref, block_rows, block_v, block_k, width,
                  tiles_per_split, vocab, mask_tail, softcap, return_logits):
    """vocab: this slice's token count; offsets (row, token) make the ids in the noise and outputs global."""
    row_block, split = pl.program_id(0), pl.program_id(1)
    temperature, seed = temp_ref[0], seed_ref[0]
    row_offset, vocab_offset = offsets_ref[0], offsets_ref[1]
    rows = pl.ds(row_block * block_rows, block_rows)
    row_ids = row_offset + row_block * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)

    def tile(t, carry):
        m, s, w, top, top_id, race, race_id, race_z = carry
        v0 = (split * tiles_per_split + t) * block_v
        tokens = pl.ds(v0, block_v)

        def k_step(k, acc):
            ks = pl.ds(k * block_k, block_k)
            return acc + jax.lax.dot_general(h_ref[rows, ks], e_ref[tokens, ks], (((1,), (1,)), ((), ())),
                                             preferred_element_type=jnp.float32)

        logits = jax.lax.fori_loop(0, width // block_k, k_step, jnp.zeros((block_rows, block_v), jnp.float32))
        if softcap is not None:
            logits = softcap * jnp.tanh(logits / softcap)
        z = logits / temperature
        if return_logits:
            logits_ref[0][rows, tokens] = z.astype(logits_ref[0].dtype)
        local_cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
        if mask_tail:  # the zero-padded tokens past the vocabulary have probability 0
            z = jnp.where(local_cols < vocab, z, FINITE_NEG)
        cols = vocab_offset + local_cols
        # Online logsumexp; w = sum exp(z - m) * (z - m), so entropy = log(s) - w / s, free of cancellation.
        tile_max = jnp.max(z, axis=1)
        m_new = jnp.maximum(m, tile_max)
        alpha = jnp.exp(m - m_new)
        shifted = z - m_new[:, None]
        p = jnp.exp(shifted)
        s_new = alpha * s + jnp.sum(p, axis=1)
        w_new = alpha * (w + (m - m_new) * s) + jnp.sum(p * shifted, axis=1)
        # Later tiles replace the running best only when strictly greater: ties keep the first index.
        tile_top_id = jnp.min(jnp.where(z == tile_max[:, None], cols, _NO_TOKEN), axis=1)
        better = tile_max > top
        top, top_id = jnp.where(better, tile_max, top), jnp.where(better, tile_top_id, top_id)
        perturbed = z + gumbel_noise(seed, row_ids, cols)
        tile_race = jnp.max(perturbed, axis=1)
        tile_race_id = jnp.min(jnp.where(perturbed == tile_race[:, None], cols, _NO_TOKEN), axis=1)
        tile_race_z = jnp.sum(jnp.where(cols == tile_race_id[:, None], z, 0.0), axis=1)
        better = tile_race > race
        race = jnp.where(better, tile_race, race)
        race_id = jnp.where(better, tile_race_id, race_id)
        race_z = jnp.where(better, tile_race_z, race_z)
        return m_new, s_new, w_new, top, top_id, race, race_id, race_z

    neg = jnp.full((block_rows,), FINITE_NEG, jnp.float32)
    zero = jnp.zeros((block_rows,), jnp.float32)
    none = jnp.full((block_rows,), _NO_TOKEN, jnp.int32)
    init = (neg, zero, zero, neg, none, neg, none, zero)
    outs = jax.lax.fori_loop(0, tiles_per_split, tile, init)
    for ref, value in zip(
        (max_ref, sum_ref, ent_ref, top_ref, top_id_ref, race_ref, race_id_ref, race_z_ref), outs, strict=True
    ):
        ref[...] = value


def _combine(m, s, w, top, top_id, race, race_id, race_z) -> tuple[Array, ...]:
    """Merge the per-split partials `[splits, rows]` into per-row statistics `[rows]`."""
    m_all = jnp.max(m, axis=0)
    alpha = jnp.exp(m - m_all)
    s_all = jnp.sum(alpha * s, axis=0)
    w_all = jnp.sum(alpha * (w + (m - m_all) * s), axis=0)
    lse = m_all + jnp.log(s_all)
    entropy = jnp.log(s_all) - w_all / s_all
    # jnp.argmax takes the first split among equal maxima, i.e. the lowest token id.
    best = jnp.argmax(top, axis=0)[None]
    argmax = jnp.take_along_axis(top_id, best, axis=0)[0]
    winner = jnp.argmax(race, axis=0)[None]
    sample = jnp.take_along_axis(race_id, winner, axis=0)[0]
    sample_z = jnp.take_along_axis(race_z, winner, axis=0)[0]
    return lse, entropy, argmax, jnp.max(top, axis=0) - lse, sample, sample_z - lse
