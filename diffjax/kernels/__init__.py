"""Pallas kernels (Triton lowering, NVIDIA GPUs) for the denoising step, each beside its plain-JAX twin.

- `moe.experts_pallas`: grouped gate/up + GELU + down matmuls over expert-sorted tokens (twin:
  `diffjax.layers.experts_grouped` / `experts_dense`).
- `vocab.vocab_stats_pallas`: LM head, softcap, temperature, logsumexp, entropy, argmax and a Gumbel-max
  sample in one pass over the vocabulary, without float32 logits (twin: `vocab.vocab_stats_reference`).
- `attention.global_attention_pallas`: split-K (flash-decoding) attention of the canvas over a long cache
  (twin: `diffjax.layers.attend`).

Which path runs is always chosen by the caller (a `Config` field or an argument). Every kernel takes
`interpret`: True runs the same kernel body through the Pallas interpreter (CPU tests); the default `None`
means "interpret iff the default backend is not a GPU", since Triton kernels only compile for GPUs.
"""

from __future__ import annotations

import jax


def resolve_interpret(interpret: bool | None) -> bool:
    """`interpret` as given, or (None) True exactly when JAX's default backend is not a GPU."""
    return jax.default_backend() != "gpu" if interpret is None else bool(interpret)


def largest_power_of_two_divisor(n: int, cap: int) -> int:
    """The largest power of two <= `cap` dividing `n` (Triton block dimensions are powers of two)."""
    block = 1
    while block * 2 <= cap and n % (block * 2) == 0:
        block *= 2
    return block
