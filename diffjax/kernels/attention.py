"""Split-K (flash-decoding) attention of the canvas over a long cache, for the global layers.

Global layers have few kv heads (2) and many query heads per kv head (8), a wide head (512), scale 1.0 and
no mask beyond padding. Per kv head, the (canvas rows x query heads of that kv head) form one query matrix
of `canvas * group` rows that shares every key and value; it is cut into row blocks (canvas rows of one
query head, or of `AttentionTiles.pack_heads` of them, read where the query lies), and the keys into `splits`
contiguous ranges, giving a grid (batch, kv head, row block, key split). Each program streams its key range
in tiles with an online softmax (float32), and writes its normalised output and logsumexp; a second small
kernel combines the splits. The decoder's keys come from two places, the cache and the canvas itself: each
gets splits of its own in the same launch, so their concatenation is never written; and the cache's keys may
be a stack of every block's, read in place at a layer index, so no block's slice is copied out either. Twin:
`diffjax.layers.attend` with a padding-only mask.

`attention_inputs_pallas` makes the kernel's inputs from the q/k/v projections in one launch: the q and k
RMSNorms with their scales, RoPE, and the v RMSNorm (XLA made five launches of it, the query's transpose for
the kernel included; the kernel now reads the query where it lies). Twin: `diffjax.layers.attention_inputs`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import (
    FINITE_NEG,
    MIN_BLOCK,
    require_block,
    require_launch,
    resolve_interpret,
    with_twin_backward,
)
from diffjax.layers import attend, attention_inputs

Array = jax.Array

_TARGET_PROGRAMS = 264  # two waves of an H100's 132 SMs
# Elements of a program's block in the combine of the splits (4 warps).
_COMBINE_ELEMENTS = 8192
# Elements of a half-head block in `attention_inputs_pallas` (4 warps): 16 float32 registers per thread each
# (at 4096, a 512-wide head's program spilled).
_INPUT_ELEMENTS = 2048


def attention_inputs_pallas(
    sources: tuple[Array, Array, Array], offsets: tuple[int, int, int], heads: int, kv_heads: int,
    q_scale: Array, k_scale: Array, positions: Array, inv_freq: Array, eps: float, *,
    interpret: bool | None = None,
) -> tuple[Array, Array, Array]:
    """`diffjax.layers.attention_inputs` (same arguments) in one launch: q and k RMS-normed with their scales
    and rotated, v RMS-normed, from the columns of the projections where they lie. positions `[n]` int32,
    inv_freq `[head_dim // 2]`. Returns q `[batch, n, heads, head_dim]`, k and v `[batch, n, kv_heads,
    head_dim]` in the sources' dtype. Differentiable in sources and scales (through the twin)."""
    head_dim = q_scale.shape[0]
    batch, n = sources[0].shape[:2]
    if head_dim % 2 or k_scale.shape != (head_dim,) or inv_freq.shape != (head_dim // 2,):
        raise ValueError(f"q_scale {q_scale.shape}, k_scale {k_scale.shape} and inv_freq {inv_freq.shape} must be "
                         f"[head_dim], [head_dim] and [head_dim // 2] for an even head_dim")
    if positions.shape != (n,):
        raise ValueError(f"positions must be [n={n}], got {positions.shape}")
    for source, offset, count in zip(sources, offsets, (heads, kv_heads, kv_heads), strict=True):
        if source.ndim != 3 or source.shape[:2] != (batch, n) or offset % head_dim or \
                offset + count * head_dim > source.shape[2]:
            raise ValueError(f"a source [batch={batch}, n={n}, columns] must hold {count} heads of {head_dim} from "
                             f"column {offset} (a multiple of head_dim), got shape {source.shape}")
    static = dict(offsets=tuple(offsets), heads=heads, kv_heads=kv_heads, eps=eps)
    kernel = functools.partial(_attention_inputs, interpret=resolve_interpret(interpret), **static)

    def twin(q_source, k_source, v_source, *rest):
        return attention_inputs((q_source, k_source, v_source), offsets, heads, kv_heads, *rest, eps)

    return with_twin_backward(kernel, twin, lambda _: (0, 1, 2, 3, 4))(*sources, q_scale, k_scale, positions,
                                                                       inv_freq)


@functools.partial(jax.jit, static_argnames=("offsets", "heads", "kv_heads", "eps", "interpret"))
def _attention_inputs(q_source: Array, k_source: Array, v_source: Array, q_scale: Array, k_scale: Array,
                      positions: Array, inv_freq: Array, *, offsets: tuple[int, int, int], heads: int,
                      kv_heads: int, eps: float, interpret: bool) -> tuple[Array, Array, Array]:
    head_dim = q_scale.shape[0]
    half = head_dim // 2
    batch, n = q_source.shape[:2]
    dtype = q_source.dtype
    # Every array seen as half-heads `[..., half]` (free reshapes): head j's halves are rows 2j and 2j + 1, so
    # each is a load of its own and RoPE's rotate-half needs no slicing inside the kernel.
    halves = [source.reshape(batch, n, -1, half) for source in (q_source, k_source, v_source)]
    block_tokens = min(max(1, _INPUT_ELEMENTS // pl.next_power_of_2(half)), pl.next_power_of_2(n))
    kernel = functools.partial(_attention_inputs_kernel, n=n, half=half, heads=heads, kv_heads=kv_heads, eps=eps,
                               first_halves=tuple(offset // half for offset in offsets), block_tokens=block_tokens)
    q, k, v = pl.pallas_call(
        kernel,
        grid=(batch, pl.cdiv(n, block_tokens), heads + 2 * kv_heads),
        out_shape=[jax.ShapeDtypeStruct((batch, n, 2 * count, half), dtype) for count in (heads, kv_heads, kv_heads)],
        in_specs=[pl.no_block_spec] * 7,
        out_specs=[pl.no_block_spec] * 3,
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=interpret,
        name="attention_inputs",
    )(*halves, q_scale.reshape(2, half), k_scale.reshape(2, half), positions.astype(jnp.int32),
      inv_freq.astype(jnp.float32))
    return (q.reshape(batch, n, heads, head_dim), k.reshape(batch, n, kv_heads, head_dim),
            v.reshape(batch, n, kv_heads, head_dim))


def _attention_inputs_kernel(q_src, k_src, v_src, q_scale_ref, k_scale_ref, positions_ref, inv_freq_ref,
                             q_out, k_out, v_out, *, n, half, heads, kv_heads, eps, first_halves, block_tokens):
    """One (batch row, token block, head) program; heads `[0, heads)` are q's, then k's, then v's."""
    b, first, slot = pl.program_id(0), pl.program_id(1) * block_tokens, pl.program_id(2)
    width = pl.next_power_of_2(half)  # Triton blocks are powers of two: a wider one, masked
    tokens = pl.ds(first, block_tokens)
    columns = pl.ds(0, width)
    in_tokens = first + jnp.arange(block_tokens, dtype=jnp.int32) < n
    in_columns = jnp.arange(width, dtype=jnp.int32) < half
    mask = in_tokens[:, None] & in_columns[None, :]

    def one_head(src, first_half, out, head, scale_ref, rotate):
        lo, hi = (plgpu.load(src.at[b, tokens, first_half + 2 * head + i, columns], mask=mask, other=0.0
                             ).astype(jnp.float32) for i in (0, 1))
        inv_rms = jax.lax.rsqrt((jnp.sum(lo * lo, axis=1) + jnp.sum(hi * hi, axis=1)) / (2 * half) + eps)
        lo, hi = lo * inv_rms[:, None], hi * inv_rms[:, None]
        if scale_ref is not None:  # (the interpreter takes a traced index into a ref here, not a Python int)
            lo, hi = (part * plgpu.load(scale_ref.at[jnp.int32(i), columns], mask=in_columns, other=0.0
                                        ).astype(jnp.float32)[None, :] for i, part in enumerate((lo, hi)))
        lo, hi = lo.astype(out.dtype), hi.astype(out.dtype)
        if rotate:  # as `apply_rope`: cos and sin rounded to the activation dtype, rotate-half
            position = plgpu.load(positions_ref.at[tokens], mask=in_tokens, other=0).astype(jnp.float32)
            angle = position[:, None] * plgpu.load(inv_freq_ref.at[columns], mask=in_columns, other=0.0)[None, :]
            cos, sin = jnp.cos(angle).astype(out.dtype), jnp.sin(angle).astype(out.dtype)
            lo, hi = lo * cos - hi * sin, hi * cos + lo * sin
        plgpu.store(out.at[b, tokens, 2 * head, columns], lo, mask=mask)
        plgpu.store(out.at[b, tokens, 2 * head + 1, columns], hi, mask=mask)

    q_first, k_first, v_first = first_halves
    pl.when(slot < heads)(lambda: one_head(q_src, q_first, q_out, slot, q_scale_ref, True))
    pl.when((slot >= heads) & (slot < heads + kv_heads))(
        lambda: one_head(k_src, k_first, k_out, slot - heads, k_scale_ref, True))
    pl.when(slot >= heads + kv_heads)(lambda: one_head(v_src, v_first, v_out, slot - heads - kv_heads, None, False))


@dataclasses.dataclass(frozen=True)
class AttentionTiles:
    """Query-row and key blocks (powers of two >= 16; block_k is lowered to fit the keys), key splits and
    Triton launch parameters of the split-K kernel."""

    block_q: int = 64
    block_k: int = 32
    splits: int | None = None  # key ranges per (batch, kv head, row block) and key source; None: fill the GPU
    num_warps: int = 8
    num_stages: int = 2
    # Query heads of one kv head per program: its block_q rows are block_q // pack_heads tokens of each, so
    # the heads sharing keys read them once (grouped-query packing; a power of two dividing the group).
    pack_heads: int = 1

    def validate(self) -> None:
        """Raise `ValueError` naming a setting that no shape can run (pack_heads must also divide the query heads
        per kv head: checked against the shapes)."""
        for name in ("block_q", "block_k"):
            require_block(f"AttentionTiles.{name}", getattr(self, name))
        require_launch("AttentionTiles", self.num_warps, self.num_stages, self.splits)
        if self.pack_heads < 1 or self.pack_heads & (self.pack_heads - 1) or self.block_q % self.pack_heads:
            raise ValueError(f"AttentionTiles.pack_heads must be a power of two dividing block_q ({self.block_q}), "
                             f"got {self.pack_heads}")


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
    16; any key and query counts (under one 16-key tile the keys are padded). With `layer` (an int32 scalar,
    traced is fine), keys/values are stacks `[layers, batch, k, kv_heads, head_dim]` (the decoder's cache holds
    every block's) and layer `layer`'s are read in place: slicing the stack first copies the slice on a GPU
    (~1 GB per batch-8 step at full size).
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
    tiles.validate()
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
    if keys.shape[2] < MIN_BLOCK:  # under one key tile (a tiny model's cache and canvas): invisible slots added
        short = ((0, 0), (0, 0), (0, MIN_BLOCK - keys.shape[2]), (0, 0), (0, 0))
        keys, values, valid = jnp.pad(keys, short), jnp.pad(values, short), jnp.pad(valid, short[1:3])
    _, _, _, kv_heads, _ = keys.shape
    block_q, pack = tiles.block_q, tiles.pack_heads
    group = heads // kv_heads
    if group % pack:  # (a power of two dividing block_q: `tiles.validate()` above)
        raise ValueError(f"AttentionTiles.pack_heads must be a power of two dividing the query heads per kv head "
                         f"({group}) and block_q ({block_q}), got {pack}")
    # A program's query rows are `block_q // pack` canvas rows of `pack` query heads of one kv head, read in
    # place from `[batch, q, heads, head_dim]` (a strided block): the head packs sharing a kv head are its row
    # blocks, no transposed copy is made.
    block_tokens = block_q // pack
    token_blocks = pl.cdiv(q_len, block_tokens)
    padded_q = token_blocks * block_tokens
    if padded_q != q_len:
        query = jnp.pad(query, ((0, 0), (0, padded_q - q_len), (0, 0), (0, 0)))
    row_blocks = group // pack * token_blocks
    sources = [keys, values.astype(keys.dtype), valid.astype(jnp.int32)]
    lengths = [keys.shape[2]]
    if new_keys is not None:
        sources += [new_keys.astype(keys.dtype), new_values.astype(keys.dtype)]
        lengths.append(new_keys.shape[1])
    ranges = _key_ranges(lengths, tiles, batch * kv_heads * row_blocks)
    splits = sum(r.splits for r in ranges)

    def rows(b, h, i, s):  # the program's (split, batch, token block, block of `pack` query heads)
        return s, b, i % token_blocks, h * (group // pack) + i // token_blocks

    out_dtype = jnp.float32 if splits > 1 else values.dtype
    packed = None if pack == 1 else pack  # one head: its axis squeezed, as the unpacked kernel was measured
    kernel = functools.partial(_split_kernel, block_tokens=block_tokens, pack=pack, token_blocks=token_blocks,
                               group=group, ranges=tuple(ranges))
    partial_out, partial_lse = pl.pallas_call(
        kernel,
        out_shape=[
            jax.ShapeDtypeStruct((splits, batch, padded_q, heads, head_dim), out_dtype),
            jax.ShapeDtypeStruct((splits, batch, padded_q, heads), jnp.float32),
        ],
        grid=(batch, kv_heads, row_blocks, splits),
        in_specs=[pl.no_block_spec] * (2 + len(sources)),
        out_specs=[
            pl.BlockSpec((None, None, block_tokens, packed, head_dim), lambda *p: (*rows(*p), 0)),
            pl.BlockSpec((None, None, block_tokens, packed), rows),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
        interpret=resolve_interpret(interpret),
        name="global_attention_split_k",
    )(layer.reshape(1), query.astype(keys.dtype), *sources)
    out = partial_out[0] if splits == 1 else _combine_splits(partial_out, partial_lse, values.dtype,
                                                             block_tokens, interpret)
    return out[:, :q_len].reshape(batch, q_len, heads * head_dim).astype(values.dtype)


def _combine_splits(partial_out: Array, partial_lse: Array, dtype: jnp.dtype, block_tokens: int,
                    interpret: bool | None) -> Array:
    """`[batch, q, heads, head_dim]`: the splits' outputs weighed by their share of each row's softmax mass,
    in one launch (XLA made two: the maximum over splits, then the weighted sum)."""
    splits, batch, padded_q, heads, head_dim = partial_out.shape
    # Rows per program: a float32 [rows, head_dim] accumulator and one split's block, 64 registers per thread
    # each (at block_q rows a 512-wide head spilled).
    rows = min(block_tokens, max(1, _COMBINE_ELEMENTS // head_dim))
    return pl.pallas_call(
        functools.partial(_combine_kernel, splits=splits),
        out_shape=jax.ShapeDtypeStruct((batch, padded_q, heads, head_dim), dtype),
        grid=(batch, padded_q // rows, heads),
        in_specs=[pl.BlockSpec((splits, None, rows, None, head_dim), lambda b, t, h: (0, b, t, h, 0)),
                  pl.BlockSpec((splits, None, rows, None), lambda b, t, h: (0, b, t, h))],
        out_specs=pl.BlockSpec((None, rows, None, head_dim), lambda b, t, h: (b, t, h, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=4),
        interpret=resolve_interpret(interpret),
        name="global_attention_combine",
    )(partial_out, partial_lse)


def _combine_kernel(out_ref, lse_ref, combined_ref, *, splits: int):
    # An all-padding row has FINITE_NEG in every split: the weights are then equal and the outputs zeros.
    top = functools.reduce(jnp.maximum, [lse_ref[s, :] for s in range(splits)])
    total = jnp.zeros_like(top)
    acc = jnp.zeros(combined_ref.shape, jnp.float32)
    for s in range(splits):
        weight = jnp.exp(lse_ref[s, :] - top)
        total += weight
        acc += weight[:, None] * out_ref[s, :, :].astype(jnp.float32)
    combined_ref[...] = (acc / total[:, None]).astype(combined_ref.dtype)


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
    if head_dim % MIN_BLOCK:
        raise ValueError(f"global_attention_pallas needs head_dim a multiple of {MIN_BLOCK}, got {head_dim}")


def _split_kernel(layer_ref, q_ref, *refs, block_tokens: int, pack: int, token_blocks: int, group: int,
                  ranges: tuple[_KeyRange, ...]):
    """One (batch, kv head, row block, split) program; row block i is token block `i % token_blocks` of the
    kv head's query heads `pack * (i // token_blocks)` onwards, `pack` of them, as rows token-major. Splits
    `[0, ranges[0].splits)` cover the first key source (layer `layer_ref[0]` of the key and value stacks, and
    valid), the rest the second (new keys and values, all visible), if any."""
    out_ref, lse_ref = refs[-2:]
    b, h, row_block, split = pl.program_id(0), pl.program_id(1), pl.program_id(2), pl.program_id(3)
    first_head = h * group + (row_block // token_blocks) * pack
    block_q = block_tokens * pack
    tokens = pl.ds((row_block % token_blocks) * block_tokens, block_tokens)
    if pack == 1:
        q = q_ref[b, tokens, first_head, :]
    else:
        q = q_ref[b, tokens, pl.ds(first_head, pack), :].reshape(block_q, q_ref.shape[-1])
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
        out = jnp.where(seen[:, None], acc / safe_total[:, None], 0.0).astype(out_ref.dtype)
        out_ref[...] = out.reshape(out_ref.shape)
        lse_ref[...] = jnp.where(seen, m + jnp.log(safe_total), FINITE_NEG).reshape(lse_ref.shape)

    first = ranges[0]
    if len(ranges) == 1:
        attend_range(*refs[:3], first, split)
        return
    pl.when(split < first.splits)(lambda: attend_range(*refs[:3], first, split))
    pl.when(split >= first.splits)(lambda: attend_range(*refs[3:5], None, ranges[1], split - first.splits))
