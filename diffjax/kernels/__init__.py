"""Pallas kernels (NVIDIA GPUs) for the denoising step, each beside its plain-JAX twin.

- `moe.experts_pallas`: grouped gate/up + GELU + down matmuls over expert-sorted tokens (twin:
  `diffjax.layers.experts_grouped` / `experts_dense`); Triton lowering, bf16/fp32/fp8 experts; the layer's
  dense MLP can ride in the same two launches (`mlp=`, `Config.mlp_implementation="pallas"`).
- `moe_mgpu.experts_mgpu`: the same maths through Mosaic GPU (TMA + wgmma; Hopper, bf16/fp16).
- `vocab.vocab_stats_pallas`: LM head, softcap, temperature, logsumexp, entropy, argmax and a Gumbel-max
  sample in one pass over the vocabulary, without float32 logits (twin: `vocab.vocab_stats_reference`).
- `attention.global_attention_pallas`: split-K (flash-decoding) attention of the canvas over a long cache
  (twin: `diffjax.layers.attend`); `attention.attention_inputs_pallas`: its q/k/v inputs, norms and RoPE in
  one launch (twin: `diffjax.layers.attention_inputs`).
- `norms.moe_inputs_pallas`: a layer's residual add and its feed-forward inputs' norms in one launch (twin:
  `diffjax.layers.moe_inputs`); `norms.feedforward_outputs_pallas`: the experts' rows summed, the
  feed-forward outputs' norms and the residual add in one (twin: `diffjax.layers.feedforward_outputs`).
- `routing.route_pallas` / `routing.expert_rows_pallas`: the router (its projection and top-k), and the row
  layout the Triton experts read, one launch each (twins: `diffjax.layers.route`,
  `routing.expert_rows_reference`).

Which path runs is always chosen by the caller (a `Config` field or an argument). The model's Triton
kernels are differentiable: their backward is their twin's (`with_twin_backward`). The vocabulary pass (a
sampling path) and the Mosaic GPU experts have no backward. Every kernel takes
`interpret`: True runs the same kernel body through the Pallas interpreter (CPU tests); the default `None`
means "interpret iff the default backend is not a GPU", since these kernels only compile for GPUs (the
Mosaic GPU ones run in Mosaic GPU's own interpreter, which simulates shared memory, TMA and barriers).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp

_compiling_for_gpu = False


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret` as given, or (None) True exactly when JAX's default backend is not a GPU (and not inside
    `compiling_for_gpu`)."""
    if interpret is not None:
        return bool(interpret)
    return not _compiling_for_gpu and jax.default_backend() != "gpu"


@contextlib.contextmanager
def compiling_for_gpu() -> Iterator[None]:
    """Inside: kernels left to choose (`interpret=None`) are compiled for the GPU, not interpreted, whatever
    the backend, for lowering or compiling on a host without a GPU (`diffjax.compiled`). JAX's trace caches
    are cleared on the way in and out, since a kernel traced before for this host would otherwise be reused."""
    global _compiling_for_gpu
    jax.clear_caches()
    _compiling_for_gpu = True
    try:
        yield
    finally:
        _compiling_for_gpu = False
        jax.clear_caches()


def with_twin_backward(kernel: Callable[..., jax.Array], twin: Callable[..., jax.Array],
                       differentiable: Callable[[tuple[Any, ...]], Sequence[int]]) -> Callable[..., jax.Array]:
    """`kernel(*args)` forward, with the backward of `twin(*args)` (the same maths in plain JAX). Pallas
    kernels have no derivative rules: without this a `jax.grad` through one stops at an assertion deep in
    Pallas. `differentiable(args)` names the positions that get gradients; the others (ids, indices, masks,
    fp8 weights) get none. The backward recomputes the twin's forward, which training can afford."""
    @jax.custom_vjp
    def run(*args: Any) -> jax.Array:
        return kernel(*args)

    def forward(*args: Any) -> tuple[jax.Array, tuple[Any, ...]]:
        return kernel(*args), args

    def backward(args: tuple[Any, ...], cotangent: jax.Array) -> tuple[Any, ...]:
        wrt = tuple(differentiable(args))

        def twin_of(*chosen: Any) -> jax.Array:
            full = list(args)
            for position, value in zip(wrt, chosen, strict=True):
                full[position] = value
            return twin(*full)

        _, vjp = jax.vjp(twin_of, *(args[i] for i in wrt))
        gradients = dict(zip(wrt, vjp(cotangent), strict=True))
        return tuple(gradients.get(i) for i in range(len(args)))

    run.defvjp(forward, backward)
    return run


# Triton's tensor-core dot needs every block dimension >= 16.
MIN_BLOCK = 16
# A finite "minus infinity" for running maxima and masked scores: exp(FINITE_NEG - m) is 0 and
# (FINITE_NEG - m) * 0 stays 0, where -inf would give inf - inf = NaN.
FINITE_NEG = -1e30


def require_block(name: str, value: int) -> None:
    """Raise `ValueError` unless `value` is a valid block dimension: a power of two >= `MIN_BLOCK`."""
    if value < MIN_BLOCK or value & (value - 1):
        raise ValueError(f"{name} must be a power of two >= {MIN_BLOCK}, got {value}")


def require_launch(owner: str, num_warps: int | None, num_stages: int | None = None,
                   splits: int | None = None) -> None:
    """Raise `ValueError` naming `owner`'s invalid Triton launch setting: warps a power of two <= 16, stages and
    splits >= 1 (None: the lowering's or the kernel's choice)."""
    if num_warps is not None and num_warps not in (1, 2, 4, 8, 16):
        raise ValueError(f"{owner}.num_warps must be None or a power of two <= 16, got {num_warps}")
    for name, value in (("num_stages", num_stages), ("splits", splits)):
        if value is not None and value < 1:
            raise ValueError(f"{owner}.{name} must be None or >= 1, got {value}")


def largest_power_of_two_divisor(n: int, cap: int) -> int:
    """The largest power of two <= `cap` dividing `n` (Triton block dimensions are powers of two)."""
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block


# Elements from which a ref's offsets overflow a signed 32-bit integer.
INT32_OFFSET_LIMIT = 2**31


def _use_64bit_offsets_for_large_narrow_refs() -> bool:
    """Make Pallas's Triton lowering index every ref of >= 2**31 elements with 64-bit offsets.

    Why: jax 0.10-0.11 choose 32-bit offsets for any ref of at most 2**32 bytes, but Triton adds offsets to
    pointers as signed integers, so a 1-byte ref (float8) of 2**31..2**32 elements wraps past 2**31 and reads
    out of bounds. The released model's fp8 gate/up stack, read in place by `moe.experts_pallas`, is such a ref
    (5 blocks x 128 experts x 2816 x 1408 = 2.54e9 e4m3 weights): on an H100 the decoder step faulted with
    CUDA_ERROR_ILLEGAL_ADDRESS. The wrapper shows such refs to the offset computation with a 2-byte dtype, which
    only widens the offsets (their values do not depend on the dtype). Returns whether the wrapper is in place;
    `experts_pallas` refuses fp8 stacks that need it when it is not (a JAX whose internals moved).
    """
    try:
        from jax._src.pallas.triton import lowering
    except ImportError:
        return False
    original = getattr(lowering, "_compute_offsets_from_indices", None)
    if original is None or not dataclasses.is_dataclass(getattr(lowering, "BlockInfo", None)):
        return False
    if getattr(original, "diffjax_wide_offsets", False):
        return True

    def compute_offsets(block_info, nd_indexer):
        full = block_info.full_shape_dtype
        if math.prod(full.shape) >= INT32_OFFSET_LIMIT and jnp.dtype(full.dtype).itemsize < 2:
            block_info = dataclasses.replace(block_info, full_shape_dtype=full.update(dtype=jnp.int16))
        return original(block_info, nd_indexer)

    compute_offsets.diffjax_wide_offsets = True
    compute_offsets.wrapped = original
    lowering._compute_offsets_from_indices = compute_offsets
    return True


WIDE_OFFSETS = _use_64bit_offsets_for_large_narrow_refs()
