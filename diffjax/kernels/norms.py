"""A layer's norms around its feed-forward parts as Pallas kernels (Triton lowering), one launch each side.

Why: after its attention, a Gemma 4 MoE layer adds the normed attention output to the residual stream, then
norms the sum three ways: with the dense MLP's scale, with the experts' scale, and unscaled for the router. XLA
compiles that to five launches on a GPU (one for the residual add with its norm; then, since the three norms
share their mean square, a reduction, a tiny power and two elementwise passes): 150 of a full-size decoder
step's launches, each of a few microseconds and little work. `moe_inputs_pallas` does it in one, reading the
attention output and the residual once. Twin: `diffjax.layers.moe_inputs`.

After them, the layer's output: the experts' rows summed per token, the dense MLP's and the experts' outputs
normed, their sum normed and added to the residual, times the layer scalar. With the dense MLP in the expert
launches (`Config.mlp_implementation="pallas"`) XLA made that two launches (the rows' sum, then the norms)
and wrote the float32 sum in between; `feedforward_outputs_pallas` reads the expert kernel's unsummed rows
where they lie and does it in one. Twin: `diffjax.layers.feedforward_outputs` after the sum.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import MIN_BLOCK, largest_power_of_two_divisor, resolve_interpret, with_twin_backward
from diffjax.kernels.moe import sum_expert_rows
from diffjax.layers import feedforward_outputs, moe_inputs, rms_norm

Array = jax.Array

# Elements of a program's block (8 warps): a float32 [tokens, hidden] block is 32 registers per thread, and the
# kernel keeps two (the attention output, then the new residual). A program takes whole rows: the norms reduce
# over the hidden axis.
_BLOCK_ELEMENTS = 8192


# Columns per chunk of `feedforward_outputs_pallas`'s rows (the released hidden size, 2816, is 11 x 256).
_OUTPUTS_CHUNK = 256


def _block_tokens(tokens: int, width: int) -> int:
    return min(max(1, _BLOCK_ELEMENTS // width), pl.next_power_of_2(tokens))


def moe_inputs_pallas(attention_out: Array, residual: Array, post_attention_scale: Array, dense_scale: Array,
                      experts_scale: Array, eps: float, *, interpret: bool | None = None
                      ) -> tuple[Array, Array, Array, Array]:
    """`diffjax.layers.moe_inputs` (same arguments and results) in one launch. attention_out and residual
    `[..., hidden]` of one dtype, the scales `[hidden]`. Differentiable in everything but eps (through the
    twin)."""
    if attention_out.shape != residual.shape or attention_out.dtype != residual.dtype:
        raise ValueError(f"attention_out {attention_out.shape} {attention_out.dtype} and residual {residual.shape} "
                         f"{residual.dtype} must have the same shape and dtype")
    hidden = residual.shape[-1]
    for name, scale in (("post_attention_scale", post_attention_scale), ("dense_scale", dense_scale),
                        ("experts_scale", experts_scale)):
        if scale.shape != (hidden,):
            raise ValueError(f"{name} must be [hidden={hidden}], got {scale.shape}")
    kernel = functools.partial(_moe_inputs, eps=eps, interpret=resolve_interpret(interpret))
    return with_twin_backward(kernel, functools.partial(moe_inputs, eps=eps), lambda _: (0, 1, 2, 3, 4))(
        attention_out, residual, post_attention_scale, dense_scale, experts_scale)


@functools.partial(jax.jit, static_argnames=("eps", "interpret"))
def _moe_inputs(attention_out: Array, residual: Array, post_attention_scale: Array, dense_scale: Array,
                experts_scale: Array, *, eps: float, interpret: bool) -> tuple[Array, Array, Array, Array]:
    shape, hidden = residual.shape, residual.shape[-1]
    tokens = residual.size // hidden
    width = pl.next_power_of_2(hidden)  # Triton blocks are powers of two: a wider one, masked
    block_tokens = _block_tokens(tokens, width)
    outputs = pl.pallas_call(
        functools.partial(_moe_inputs_kernel, tokens=tokens, hidden=hidden, width=width, block_tokens=block_tokens,
                          eps=eps),
        grid=(pl.cdiv(tokens, block_tokens),),
        out_shape=[jax.ShapeDtypeStruct((tokens, hidden), residual.dtype)] * 4,
        in_specs=[pl.no_block_spec] * 5,
        out_specs=[pl.no_block_spec] * 4,
        compiler_params=plgpu.CompilerParams(num_warps=8),
        interpret=interpret,
        name="moe_inputs",
    )(attention_out.reshape(tokens, hidden), residual.reshape(tokens, hidden), post_attention_scale, dense_scale,
      experts_scale)
    return tuple(out.reshape(shape) for out in outputs)


def _moe_inputs_kernel(attention_ref, residual_ref, post_attention_ref, dense_ref, experts_ref,
                       new_residual_ref, dense_in_ref, experts_in_ref, router_in_ref, *, tokens, hidden, width,
                       block_tokens, eps):
    first = pl.program_id(0) * block_tokens
    rows = pl.ds(first, block_tokens)
    columns = pl.ds(0, width)
    in_columns = jnp.arange(width, dtype=jnp.int32) < hidden
    mask = (first + jnp.arange(block_tokens, dtype=jnp.int32) < tokens)[:, None] & in_columns[None, :]
    dtype = residual_ref.dtype

    def scale(ref):
        return plgpu.load(ref.at[columns], mask=in_columns, other=0.0).astype(jnp.float32)[None, :]

    def inverse_rms(x):  # masked columns hold zeros
        return jax.lax.rsqrt(jnp.sum(x * x, axis=1, keepdims=True) / hidden + eps)

    attention = plgpu.load(attention_ref.at[rows, columns], mask=mask, other=0.0).astype(jnp.float32)
    post_attention = (attention * inverse_rms(attention) * scale(post_attention_ref)).astype(dtype)
    # The add in the activation dtype, as the unfused layer rounds it.
    new_residual = plgpu.load(residual_ref.at[rows, columns], mask=mask, other=0.0) + post_attention
    plgpu.store(new_residual_ref.at[rows, columns], new_residual, mask=mask)
    x = new_residual.astype(jnp.float32)
    normed = x * inverse_rms(x)
    plgpu.store(dense_in_ref.at[rows, columns], (normed * scale(dense_ref)).astype(dtype), mask=mask)
    plgpu.store(experts_in_ref.at[rows, columns], (normed * scale(experts_ref)).astype(dtype), mask=mask)
    plgpu.store(router_in_ref.at[rows, columns], normed.astype(dtype), mask=mask)


def feedforward_outputs_pallas(residual: Array, dense: Array, expert_rows: Array, top_k: int, dense_scale: Array,
                               experts_scale: Array, output_scale: Array, layer_scalar: Array, eps: float,
                               next_scale: Array | None = None, *, interpret: bool | None = None
                               ) -> Array | tuple[Array, Array]:
    """`diffjax.layers.feedforward_outputs` in one launch, from the experts' rows before each token's sum:
    residual and dense `[..., hidden]` of one dtype, expert_rows `[>= tokens * top_k, hidden]` in it (row
    `token * top_k + j`, as `experts_pallas(..., sum_rows=False)` writes them; rows past those are not read),
    the scales `[hidden]`, layer_scalar `[1]`. The rows are summed in float32 and rounded, as
    `experts_pallas` sums them. With `next_scale` `[hidden]` (the next layer's input norm, or the final norm)
    returns `(out, rms_norm(out, next_scale))`: that norm's launch saved too. Differentiable in everything but
    top_k and eps (through the twin)."""
    hidden = residual.shape[-1]
    tokens = residual.size // hidden
    if dense.shape != residual.shape or dense.dtype != residual.dtype or expert_rows.dtype != residual.dtype:
        raise ValueError(f"residual {residual.shape} {residual.dtype}, dense {dense.shape} {dense.dtype} and "
                         f"expert_rows {expert_rows.dtype} must share the residual's shape and dtype")
    if expert_rows.ndim != 2 or expert_rows.shape[1] != hidden or expert_rows.shape[0] < tokens * top_k:
        raise ValueError(f"expert_rows must be [>= tokens * top_k = {tokens * top_k}, hidden={hidden}], got "
                         f"{expert_rows.shape}")
    for name, scale in (("dense_scale", dense_scale), ("experts_scale", experts_scale),
                        ("output_scale", output_scale), ("next_scale", next_scale)):
        if scale is not None and scale.shape != (hidden,):
            raise ValueError(f"{name} must be [hidden={hidden}], got {scale.shape}")
    if layer_scalar.shape != (1,):
        raise ValueError(f"layer_scalar must be [1], got {layer_scalar.shape}")
    if hidden % MIN_BLOCK:
        raise ValueError(f"feedforward_outputs_pallas needs hidden to be a multiple of {MIN_BLOCK}, got {hidden}")
    kernel = functools.partial(_feedforward_outputs, top_k=top_k, eps=eps, interpret=resolve_interpret(interpret))

    def twin(residual, dense, expert_rows, dense_scale, experts_scale, output_scale, layer_scalar, next_scale):
        experts = sum_expert_rows(expert_rows, tokens, top_k).reshape(residual.shape)
        out = feedforward_outputs(residual, dense, experts, dense_scale, experts_scale, output_scale, layer_scalar,
                                  eps)
        return out if next_scale is None else (out, rms_norm(out, next_scale, eps))

    differentiable = (0, 1, 2, 3, 4, 5, 6) + ((7,) if next_scale is not None else ())
    return with_twin_backward(kernel, twin, lambda _: differentiable)(
        residual, dense, expert_rows, dense_scale, experts_scale, output_scale, layer_scalar, next_scale)


@functools.partial(jax.jit, static_argnames=("top_k", "eps", "interpret"))
def _feedforward_outputs(residual: Array, dense: Array, expert_rows: Array, dense_scale: Array,
                         experts_scale: Array, output_scale: Array, layer_scalar: Array, next_scale: Array | None, *,
                         top_k: int, eps: float, interpret: bool) -> Array | tuple[Array, Array]:
    shape, hidden = residual.shape, residual.shape[-1]
    tokens = residual.size // hidden
    chunk = largest_power_of_two_divisor(hidden, _OUTPUTS_CHUNK)
    block_tokens = _block_tokens(tokens, hidden)
    inputs = (residual.reshape(tokens, hidden), dense.reshape(tokens, hidden), expert_rows, dense_scale,
              experts_scale, output_scale, layer_scalar) + (() if next_scale is None else (next_scale,))
    outputs = pl.pallas_call(
        functools.partial(_feedforward_outputs_kernel, tokens=tokens, hidden=hidden, chunk=chunk,
                          block_tokens=block_tokens, top_k=top_k, eps=eps),
        grid=(pl.cdiv(tokens, block_tokens),),
        out_shape=[jax.ShapeDtypeStruct((tokens, hidden), residual.dtype)] * (1 + (next_scale is not None)),
        in_specs=[pl.no_block_spec] * len(inputs),
        out_specs=[pl.no_block_spec] * (1 + (next_scale is not None)),
        compiler_params=plgpu.CompilerParams(num_warps=8),
        interpret=interpret,
        name="feedforward_outputs",
    )(*inputs)
    outputs = [out.reshape(shape) for out in outputs]
    return outputs[0] if next_scale is None else tuple(outputs)


def _feedforward_outputs_kernel(residual_ref, dense_ref, rows_ref, dense_scale_ref, experts_scale_ref,
                                output_scale_ref, scalar_ref, *refs, tokens, hidden, chunk, block_tokens, top_k, eps):
    """A block of whole rows, as column chunks that tile `hidden` exactly (Triton blocks are powers of two):
    every read is in bounds and unmasked, which a gather of expert rows needs, and only the stores of a tail
    block's rows past the end are masked. refs: (next_scale,) out (, its norm)."""
    next_scale_ref, out_ref, next_ref = refs if len(refs) == 3 else (None, *refs, None)
    first = pl.program_id(0) * block_tokens
    token_ids = first + jnp.arange(block_tokens, dtype=jnp.int32)
    safe_tokens = jnp.minimum(token_ids, tokens - 1)  # a tail block's extra rows repeat the last token's
    chunks = [pl.ds(c * chunk, chunk) for c in range(hidden // chunk)]
    dtype = residual_ref.dtype

    def normed(parts, scale_ref):  # as `rms_norm`: float32 over the whole row, rounded to the activation dtype
        parts = [part.astype(jnp.float32) for part in parts]
        inverse_rms = jax.lax.rsqrt(sum(jnp.sum(p * p, axis=1, keepdims=True) for p in parts) / hidden + eps)
        return [(p * inverse_rms * scale_ref[c].astype(jnp.float32)[None, :]).astype(dtype)
                for p, c in zip(parts, chunks, strict=True)]

    # Each token's experts' rows summed in order, in float32, then rounded as `experts_pallas` rounds its sum.
    experts = [sum(rows_ref[safe_tokens * top_k + j, c].astype(jnp.float32) for j in range(top_k)).astype(dtype)
               for c in chunks]
    dense = [dense_ref[safe_tokens, c] for c in chunks]
    mixed = [d + e for d, e in zip(normed(dense, dense_scale_ref), normed(experts, experts_scale_ref), strict=True)]
    scalar = scalar_ref[0].astype(dtype)
    in_rows = (token_ids < tokens)[:, None]
    outs = [(residual_ref[safe_tokens, c] + part) * scalar
            for c, part in zip(chunks, normed(mixed, output_scale_ref), strict=True)]
    stores = [(out_ref, outs)] + ([] if next_ref is None else [(next_ref, normed(outs, next_scale_ref))])
    for ref, parts in stores:
        for c, part in zip(chunks, parts, strict=True):
            plgpu.store(ref.at[pl.ds(first, block_tokens), c], part, mask=in_rows)
