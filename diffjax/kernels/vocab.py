"""Statistics of the next-token distribution in one pass over the vocabulary, without float32 logits.

Per row, with `z = softcap(h @ E^T) / temperature` over the vocabulary: logsumexp, entropy, argmax, and a
Gumbel-max sample `argmax(z + g)` with its log-probability. The kernel (Pallas, Triton lowering) runs a grid
of (row block, vocabulary split); each program walks its split's vocabulary tiles keeping a running max,
sum of exponentials, entropy accumulator, argmax and best perturbed logit in registers, and writes only
these per-row partials; a small XLA step combines the splits (the split-K of flash-decoding, over the
vocabulary). The `[rows, vocab]` logits never reach memory.

The Gumbel noise is a counter-based hash of (seed, row, token id), so the kernel and its twin
(`vocab_stats_reference`: logits materialised, then the sampler's statistics) draw the same samples.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import largest_power_of_two_divisor, resolve_interpret
from diffjax.model import tied_logits
from diffjax.sampling import scale_logits, token_entropy

Array = jax.Array

_MIN_BLOCK = 16
# A finite "minus infinity" for running maxima: exp(_NEG - m) is 0 and (_NEG - m) * 0 stays 0, no NaN.
_NEG = -1e30
# Programs to aim for: a few waves of an H100's 132 SMs.
_TARGET_PROGRAMS = 512


class VocabStats(NamedTuple):
    """Per-row statistics of `softmax(z)`, each `[...]` (the hidden's leading shape)."""

    logsumexp: Array  # float32
    entropy: Array  # float32, nats
    argmax: Array  # int32, first index among ties
    sample: Array  # int32, argmax(z + gumbel_noise)
    sample_logprob: Array  # float32, z[sample] - logsumexp


def _mix32(x: Array) -> Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seed: Array, rows: Array, cols: Array) -> Array:
    """Standard Gumbel noise, a pure function of (uint32 seed, row index, token index), broadcasting.

    Distinct (row, token) pairs of one seed hash to distinct words (both mixing rounds are bijections);
    the top 24 bits make a uniform in (0, 1) that never reaches 0 or 1.
    """
    x = _mix32(rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) ^ seed)
    x = _mix32(x ^ cols.astype(jnp.uint32))
    u = ((x >> 8).astype(jnp.float32) + 0.5) * (1.0 / (1 << 24))
    return -jnp.log(-jnp.log(u))


def _seed_array(seed: Array | int) -> Array:
    return jnp.asarray(seed).astype(jnp.uint32).reshape(())


def vocab_stats_reference(
    hidden: Array, embedding: Array, temperature: Array | float, *, seed: Array | int, softcap: float | None,
) -> VocabStats:
    """The plain-JAX twin: float32 logits `[..., vocab]`, then the statistics the samplers compute."""
    z = scale_logits(tied_logits(hidden, embedding, softcap), temperature)
    lse = jax.nn.logsumexp(z, axis=-1)
    rows = jnp.arange(z.size // z.shape[-1], dtype=jnp.uint32).reshape(z.shape[:-1])[..., None]
    cols = jnp.arange(z.shape[-1], dtype=jnp.uint32)
    sample = jnp.argmax(z + gumbel_noise(_seed_array(seed), rows, cols), axis=-1).astype(jnp.int32)
    picked = jnp.take_along_axis(z, sample[..., None], axis=-1)[..., 0]
    return VocabStats(lse, token_entropy(z), jnp.argmax(z, axis=-1).astype(jnp.int32), sample, picked - lse)


@functools.partial(jax.jit, static_argnames=("softcap", "block_rows", "splits", "interpret"))
def vocab_stats_pallas(
    hidden: Array, embedding: Array, temperature: Array | float, *, seed: Array | int, softcap: float | None,
    block_rows: int | None = None, splits: int | None = None, interpret: bool | None = None,
) -> VocabStats:
    """Same outputs as `vocab_stats_reference`, in one pass over `embedding [vocab, hidden]`.

    hidden `[..., hidden]` (hidden a multiple of 16), vocab a multiple of 16, temperature > 0 (a traced
    scalar is fine). block_rows (power of two >= 16) and splits (vocabulary splits, a power of two dividing
    the tile count) default to a choice that fills the GPU.
    """
    lead, width = hidden.shape[:-1], hidden.shape[-1]
    vocab = embedding.shape[0]
    if embedding.ndim != 2 or embedding.shape[1] != width:
        raise ValueError(f"embedding must be [vocab, hidden={width}], got {embedding.shape}")
    for name, size in (("hidden", width), ("vocab", vocab)):
        if size % _MIN_BLOCK:
            raise ValueError(f"vocab_stats_pallas needs {name} to be a multiple of {_MIN_BLOCK}, got {size}")
    rows = hidden.size // width
    block_rows = block_rows or min(64, max(_MIN_BLOCK, pl.next_power_of_2(rows)))
    if block_rows < _MIN_BLOCK or block_rows & (block_rows - 1):
        raise ValueError(f"block_rows must be a power of two >= {_MIN_BLOCK}, got {block_rows}")
    block_v = largest_power_of_two_divisor(vocab, 128)
    block_k = largest_power_of_two_divisor(width, 64)
    num_tiles = vocab // block_v
    row_blocks = pl.cdiv(rows, block_rows)
    splits = splits or largest_power_of_two_divisor(num_tiles, max(1, _TARGET_PROGRAMS // row_blocks))
    if num_tiles % splits:
        raise ValueError(f"splits ({splits}) must divide the {num_tiles} vocabulary tiles of {block_v}")

    h = jnp.pad(hidden.reshape(rows, width), ((0, row_blocks * block_rows - rows), (0, 0)))
    kernel = functools.partial(
        _stats_kernel, block_rows=block_rows, block_v=block_v, block_k=block_k, width=width,
        tiles_per_split=num_tiles // splits, vocab=vocab, softcap=softcap,
    )
    padded = row_blocks * block_rows
    f32, i32 = jnp.float32, jnp.int32
    partial_shapes = [jax.ShapeDtypeStruct((splits * padded,), d) for d in (f32, f32, f32, f32, i32, f32, i32, f32)]
    partials = pl.pallas_call(
        kernel,
        out_shape=partial_shapes,
        grid=(row_blocks, splits),
        in_specs=[pl.no_block_spec] * 4,
        out_specs=[pl.BlockSpec((block_rows,), lambda i, s: (s * row_blocks + i,))] * len(partial_shapes),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=3),
        interpret=resolve_interpret(interpret),
        name="vocab_stats",
    )(
        jnp.asarray(temperature, f32).reshape(1), _seed_array(seed).reshape(1), h,
        embedding.astype(hidden.dtype),
    )
    stats = _combine(*(p.reshape(splits, padded)[:, :rows] for p in partials))
    return VocabStats(*(s.reshape(lead) for s in stats))


def _stats_kernel(temp_ref, seed_ref, h_ref, e_ref, max_ref, sum_ref, ent_ref, top_ref, top_id_ref,
                  race_ref, race_id_ref, race_z_ref, *, block_rows, block_v, block_k, width, tiles_per_split,
                  vocab, softcap):
    row_block, split = pl.program_id(0), pl.program_id(1)
    temperature, seed = temp_ref[0], seed_ref[0]
    rows = pl.ds(row_block * block_rows, block_rows)
    row_ids = row_block * block_rows + jax.lax.broadcasted_iota(jnp.int32, (block_rows, 1), 0)

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
        cols = v0 + jax.lax.broadcasted_iota(jnp.int32, (1, block_v), 1)
        # Online logsumexp; w = sum exp(z - m) * (z - m), so entropy = log(s) - w / s, free of cancellation.
        tile_max = jnp.max(z, axis=1)
        m_new = jnp.maximum(m, tile_max)
        alpha = jnp.exp(m - m_new)
        shifted = z - m_new[:, None]
        p = jnp.exp(shifted)
        s_new = alpha * s + jnp.sum(p, axis=1)
        w_new = alpha * (w + (m - m_new) * s) + jnp.sum(p * shifted, axis=1)
        # Later tiles replace the running best only when strictly greater: ties keep the first index.
        tile_top_id = jnp.min(jnp.where(z == tile_max[:, None], cols, vocab), axis=1)
        better = tile_max > top
        top, top_id = jnp.where(better, tile_max, top), jnp.where(better, tile_top_id, top_id)
        perturbed = z + gumbel_noise(seed, row_ids, cols)
        tile_race = jnp.max(perturbed, axis=1)
        tile_race_id = jnp.min(jnp.where(perturbed == tile_race[:, None], cols, vocab), axis=1)
        tile_race_z = jnp.sum(jnp.where(cols == tile_race_id[:, None], z, 0.0), axis=1)
        better = tile_race > race
        race = jnp.where(better, tile_race, race)
        race_id = jnp.where(better, tile_race_id, race_id)
        race_z = jnp.where(better, tile_race_z, race_z)
        return m_new, s_new, w_new, top, top_id, race, race_id, race_z

    neg = jnp.full((block_rows,), _NEG, jnp.float32)
    zero = jnp.zeros((block_rows,), jnp.float32)
    none = jnp.full((block_rows,), vocab, jnp.int32)
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
    return lse, entropy, argmax, sample, sample_z - lse
