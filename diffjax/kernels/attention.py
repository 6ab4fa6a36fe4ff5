"""Split-K (flash-decoding) attention of the canvas over a long cache, for the global layers.

Global layers have few kv heads (2) and many query heads per kv head (8), a wide head (512), scale 1.0 and
no mask beyond padding. Per kv head, the (canvas rows x query heads of that kv head) form one query matrix
of `canvas * group` rows that shares every key and value; it is cut into row blocks, and the keys into
`splits` contiguous ranges, giving a grid (batch, kv head, row block, key split). Each program streams its
key range in tiles with an online softmax (float32), and writes its normalised output and logsumexp; an
XLA step combines the splits. The decoder's keys come from two places, the cache and the canvas itself: each
gets splits of its own in the same launch, so their concatenation is never written; and the cache's keys may
be a stack of every block's, read in place at a layer index, so no block's slice is copied out either. Twin:
`diffjax.layers.attend` with a padding-only mask.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import FINITE_NEG, MIN_BLOCK, require_block, resolve_interpret, with_twin_backward
from diffjax.layers import attend

Array = jax.Array

_TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    """Query-row and key blocks (powers of two >= 16; block_k is lowered to fit the keys), key splits and
    Triton launch parameters of the split-K kernel."""

    block_q: int = 64
    block_k: int = 32
    splits: int | None = None  # key ranges per (batch, kv head, row block) and key source; None: fill the GPU
    num_warps: int = 8
    num_stages: int = 2


@functools.partial(jax.jit, static_argnames=("tiles", "interpret"))
def global_attention_pallas(
    query: Array, keys: Array, values: Array, valid: Array, new_keys: Array | None = None,
    new_values: Array | None = None, layer: Array | int | None = None, *, tiles: AttentionTiles = AttentionTiles(),
    interpret: bool | None = None,
) -> Array:
    """`attend(query, keys, values, mask)` for a mask that only hides padded keys.

    query `[batch, q, heads, head_dim]`, keys/values `[batch, k, kv_heads, head_dim]`, valid `[batch, k]`
    bool (True = a real key). Optional new_keys/new_values `[batch, n, kv_heads, head_dim]`: keys every row
    sees (the canvas's own), attended as if appended to `keys`, without writing the concatenation (at batch 8
    the decoder's concatenations took 4 of 72 ms per step on an H200). Returns `[batch, q, heads * head_dim]`
    in values' dtype; a row whose keys are all padding gives zeros, as `attend` does. head_dim a multiple of
    16, k (or k + n) >= 16. With `layer` (an int32 scalar, traced is fine), keys/values are stacks `[layers,
    batch, k, kv_heads, head_dim]` (the decoder's cache holds every block's) and layer `layer`'s are read in
    place: slicing the stack first copies the slice on a GPU (~1 GB per batch-8 step at full size).
    Differentiable: the backward is `attend`'s (the kernel has no derivative rule of its own).
    """
    if (new_keys is None) != (new_values is None):
        raise ValueError("new_keys and new_values go together")
    if layer is not None:
        layer = jnp.asarray(layer, jnp.int32)
    kernel = functools.partial(_global_attention_pallas, tiles=tiles, interpret=interpret)
    differentiable = (0, 1, 2) if new_keys is None else (0, 1, 2, 4, 5)
    return with_twin_backward(kernel, _attend_appended, lambda _: differentiable)(
        query, keys, values, valid, new_keys, new_values, layer)


def attend_padding_only(query: Array, keys: Array, values: Array, valid: Array) -> Array:
    """`attend` with every query row seeing the `valid` keys (the decoder's padding-only mask): the kernel's
    twin, in its calling convention."""
    mask = jnp.broadcast_to(valid[:, None, :], (query.shape[0], query.shape[1], valid.shape[1]))
    return attend(query, keys, values, mask)


def append_keys(keys: Array, values: Array, valid: Array, new_keys: Array,
                new_values: Array) -> tuple[Array, Array, Array]:
    """(keys ++ new_keys, values ++ new_values, valid ++ True): the one-source form of the kernel's two sources,
    the concatenation every other attention path writes."""
    return (jnp.concatenate([keys, new_keys.astype(keys.dtype)], axis=1),
            jnp.concatenate([values, new_values.astype(values.dtype)], axis=1),
            jnp.concatenate([valid, jnp.ones(new_keys.shape[:2], bool)], axis=1))


def _attend_appended(query: Array, keys: Array, values: Array, valid: Array, new_keys: Array | None,
                     new_values: Array | None, layer: Array | None) -> Array:
    """The twin, in the kernel's calling convention: `attend_padding_only` over layer `layer` of the stacks
    (if given) `++ new_keys` (if given, every new key visible)."""
    if layer is not None:
        keys, values = keys[layer], values[layer]
    if new_keys is not None:
        keys, values, valid = append_keys(keys, values, valid, new_keys, new_values)
    return attend_padding_only(query, keys, values, valid)


@dataclasses.dataclass(frozen=True)
class _KeyRange:
    """How one key source is cut: `splits` contiguous ranges of `tiles_per_split` tiles of `block_k` keys."""

    length: int
    block_k: int
    splits: int
    tiles_per_split: int


def _key_ranges(lengths: list[int], tiles: AttentionTiles, programs_per_split: int) -> list[_KeyRange]:
    """Each source's cut. Without `tiles.splits`, enough splits in all to fill the GPU, shared out by key tiles
    (the canvas's 256 keys beside a 1023-slot ring get one of four), at least one each: every split's partial
    output is float32 traffic for the combine step."""
    blocks = [min(tiles.block_k, 1 << (length.bit_length() - 1)) for length in lengths]
    num_tiles = [pl.cdiv(length, block) for length, block in zip(lengths, blocks, strict=True)]
    if tiles.splits:
        splits = [tiles.splits] * len(lengths)
    else:
        total = max(1, min(sum(num_tiles), _TARGET_PROGRAMS // programs_per_split))
        splits = [max(1, round(total * n / sum(num_tiles))) for n in num_tiles[1:]]
        splits = [max(1, total - sum(splits)), *splits]
    return [_KeyRange(length, block, n, pl.cdiv(tile_count, n))
            for length, block, n, tile_count in zip(lengths, blocks, splits, num_tiles, strict=True)]


def _global_attention_pallas(
    query: Array, keys: Array, values: Array, valid: Array, new_keys: Array | None, new_values: Array | None,
    layer: Array | None, *, tiles: AttentionTiles, interpret: bool | None,
) -> Array:
    batch, q_len, heads, head_dim = query.shape
    for name in ("block_q", "block_k"):
        require_block(f"AttentionTiles.{name}", getattr(tiles, name))
    if layer is not None and (keys.ndim != 5 or layer.shape != ()):
        raise ValueError(f"with a layer index, keys must be a [layers, batch, k, kv_heads, head_dim] stack and the "
                         f"index a scalar, got keys {keys.shape} and layer {layer.shape}")
    if new_keys is not None:
        _check_new(keys if layer is None else keys[0], new_keys, new_values)
        if min(keys.shape[-3], new_keys.shape[1]) < MIN_BLOCK:  # too short for a key tile of its own: one source
            if layer is not None:
                keys, values, layer = keys[layer], values[layer], None
            keys, values, valid = append_keys(keys, values, valid, new_keys, new_values)
            new_keys = new_values = None
    if layer is None:  # one layer's keys: the kernel reads a stack of one
        keys, values, layer = keys[None], values[None], jnp.zeros((), jnp.int32)
    _check(query, keys[0], values[0], valid)
    _, _, _, kv_heads, _ = keys.shape
    block_q = tiles.block_q
    group = heads // kv_heads
    rows = q_len * group
    row_blocks = pl.cdiv(rows, block_q)
    sources = [keys, values.astype(keys.dtype), valid.astype(jnp.int32)]
    lengths = [keys.shape[2]]
    if new_keys is not None:
        sources += [new_keys.astype(keys.dtype), new_values.astype(keys.dtype)]
        lengths.append(new_keys.shape[1])
    ranges = _key_ranges(lengths, tiles, batch * kv_heads * row_blocks)
    splits = sum(r.splits for r in ranges)

    # [batch, kv_heads, q * group, head_dim]: the query rows sharing a kv head, padded to the row block.
    grouped = query.reshape(batch, q_len, kv_heads, group, head_dim).transpose(0, 2, 1, 3, 4)
    grouped = jnp.pad(grouped.reshape(batch, kv_heads, rows, head_dim),
                      ((0, 0), (0, 0), (0, row_blocks * block_q - rows), (0, 0)))
    padded_rows = row_blocks * block_q
    out_dtype = jnp.float32 if splits > 1 else values.dtype
    kernel = functools.partial(_split_kernel, block_q=block_q, ranges=tuple(ranges))
    partial_out, partial_lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((splits, batch, kv_heads, padded_rows, head_dim), out_dtype),
            jax.ShapeDtypeStruct((splits, batch, kv_heads, padded_rows), jnp.float32),
        ],
        grid=(batch, kv_heads, row_blocks, splits),
        in_specs=[pl.no_block_spec] * (2 + len(sources)),
        out_specs=[
            pl.BlockSpec((None, None, None, block_q, head_dim), lambda b, h, i, s: (s, b, h, i, 0)),
            pl.BlockSpec((None, None, None, block_q), lambda b, h, i, s: (s, b, h, i)),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=resolve_interpret(interpret),
        name="global_attention_split_k",
    )(layer.reshape(1), grouped.astype(keys.dtype), *sources)
    if splits == 1:
        out = partial_out[0]
    else:
        weights = jnp.exp(partial_lse - jnp.max(partial_lse, axis=0))  # all-padding rows: every split equal
        out = jnp.sum(weights[..., None] * partial_out, axis=0) / jnp.sum(weights, axis=0)[..., None]
    out = out[:, :, :rows].reshape(batch, kv_heads, q_len, group, head_dim).transpose(0, 2, 1, 3, 4)
    return out.reshape(batch, q_len, heads * head_dim).astype(values.dtype)


def _check_new(keys: Array, new_keys: Array, new_values: Array) -> None:
    if new_keys.ndim != 4 or new_keys.shape[0] != keys.shape[0] or new_keys.shape[2:] != keys.shape[2:]:
        raise ValueError(f"new_keys must be [batch, n, kv_heads, head_dim] = [{keys.shape[0]}, n, "
                         f"{keys.shape[2]}, {keys.shape[3]}], got {new_keys.shape}")
    if new_values.shape != new_keys.shape:
        raise ValueError(f"new_values {new_values.shape} must have the shape of new_keys {new_keys.shape}")


def _check(query: Array, keys: Array, values: Array, valid: Array) -> None:
    batch, _, heads, head_dim = query.shape
    if keys.ndim != 4 or keys.shape[0] != batch or keys.shape[3] != head_dim:
        raise ValueError(f"keys must be [batch={batch}, k, kv_heads, head_dim={head_dim}], got {keys.shape}")
    if values.shape != keys.shape:
        raise ValueError(f"values {values.shape} must have the shape of keys {keys.shape}")
    if heads % keys.shape[2]:
        raise ValueError(f"kv_heads ({keys.shape[2]}) must divide the query heads ({heads})")
    if valid.shape != keys.shape[:2]:
        raise ValueError(f"valid must be [batch, k] = {keys.shape[:2]}, got {valid.shape}")
    if head_dim % MIN_BLOCK or keys.shape[1] < MIN_BLOCK:
        raise ValueError(
            f"global_attention_pallas needs head_dim a multiple of {MIN_BLOCK} and >= {MIN_BLOCK} keys, "
            f"got head_dim {head_dim} and {keys.shape[1]} keys"
        )


def _split_kernel(layer_ref, q_ref, *refs, block_q: int, ranges: tuple[_KeyRange, ...]):
    """One (batch, kv head, row block, split) program. Splits `[0, ranges[0].splits)` cover the first key
    source (layer `layer_ref[0]` of the key and value stacks, and valid), the rest the second (new keys and
    values, all visible), if any."""
    out_ref, lse_ref = refs[-2:]
    b, h, row_block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    q = q_ref[b, h, pl.ds(row_block * block_q, block_q), :]
    layer = layer_ref[0]

    def attend_range(k_ref, v_ref, valid_ref, key_range: _KeyRange, local_split):
        # The cache's keys and values are stacks `[layers, batch, k, ...]`; the new ones `[batch, n, ...]`.
        at = (layer, b) if valid_ref is not None else (b,)
        block_k, length = key_range.block_k, key_range.length

        def tile(t, carry):
            m, total, acc = carry
            start = (local_split * key_range.tiles_per_split + t) * block_k
            # The last tile is shifted back to end at `length` (no out-of-bounds reads); the keys it re-covers,
            # and whole tiles past the end, are masked out.
            load = jnp.minimum(start, length - block_k)
            keys = pl.ds(load, block_k)
            scores = jax.lax.dot_general(q, k_ref[(*at, keys, h, slice(None))], (((1,), (1,)), ((), ())),
                                         preferred_element_type=jnp.float32)
            keep = load + jax.lax.broadcasted_iota(jnp.int32, (1, block_k), 1) >= start
            if valid_ref is not None:
                keep = keep & (valid_ref[b, keys] > 0)[None, :]
            scores = jnp.where(keep, scores, FINITE_NEG)
            m_new = jnp.maximum(m, jnp.max(scores, axis=1))
            p = jnp.where(keep, jnp.exp(scores - m_new[:, None]), 0.0)
            alpha = jnp.exp(m - m_new)
            values = v_ref[(*at, keys, h, slice(None))]
            acc = alpha[:, None] * acc + jnp.dot(p.astype(values.dtype), values, preferred_element_type=jnp.float32)
            return m_new, alpha * total + jnp.sum(p, axis=1), acc

        head_dim = q.shape[-1]
        init = (jnp.full((block_q,), FINITE_NEG, jnp.float32), jnp.zeros((block_q,), jnp.float32),
                jnp.zeros((block_q, head_dim), jnp.float32))
        m, total, acc = jax.lax.fori_loop(0, key_range.tiles_per_split, tile, init)
        seen = total > 0  # False: no visible key in this split
        safe_total = jnp.where(seen, total, 1.0)
        out_ref[...] = jnp.where(seen[:, None], acc / safe_total[:, None], 0.0).astype(out_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), FINITE_NEG)

    first = ranges[0]
    if len(ranges) == 1:
        attend_range(*refs[:3], first, split)
        return
    pl.when(split < first.splits)(lambda: attend_range(*refs[:3], first, split))
    pl.when(split >= first.splits)(lambda: attend_range(*refs[3:5], None, ranges[1], split - first.splits))
