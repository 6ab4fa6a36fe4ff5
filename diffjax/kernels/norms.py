"""The norms between a layer's attention and its feed-forward parts as one Pallas kernel (Triton lowering).

Why: after its attention, a Gemma 4 MoE layer adds the normed attention output to the residual stream, then
norms the sum three ways: with the dense MLP's scale, with the experts' scale, and unscaled for the router. XLA
compiles that to five launches on a GPU (one for the residual add with its norm; then, since the three norms
share their mean square, a reduction, a tiny power and two elementwise passes): 150 of a full-size decoder
step's launches, each of a few microseconds and little work. `moe_inputs_pallas` does it in one, reading the
attention output and the residual once. Twin: `diffjax.layers.moe_inputs`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from diffjax.kernels import resolve_interpret, with_twin_backward
from diffjax.layers import moe_inputs

Array = jax.Array

# Elements of a program's block (8 warps): a float32 [tokens, hidden] block is 32 registers per thread, and the
# kernel keeps two (the attention output, then the new residual). A program takes whole rows: the norms reduce
# over the hidden axis.
_BLOCK_ELEMENTS = 8192


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
    block_tokens = min(max(1, _BLOCK_ELEMENTS // width), pl.next_power_of_2(tokens))
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
