"""Per-position quantities of a logits row: scaled logits, entropy, probabilities, a counter-based Gumbel
draw, and the :class:`TokenStatistics` one vocabulary pass yields.

Floating point notes (why some helpers look odd):

* XLA rewrites ``x / broadcast(t)`` into ``x * broadcast(1 / t)``, which is up to one ulp away from the
  IEEE quotient torch computes; :func:`scale_logits` divides exactly.
* XLA (CPU at least) contracts ``a + b * c`` into a fused multiply-add, which rounds differently from
  torch's separate multiply and add; :func:`without_fma_contraction` forces the product to be rounded first.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

# Filtered-out logits are set to this finite value rather than -inf: softmax still gives them exactly zero
# probability, but entropies, `p * log p` and the self-conditioning product stay NaN-free, and the value
# survives a cast to bfloat16 (float32's own minimum would overflow to -inf there).
MASK_VALUE = -1e30


def without_fma_contraction(x: jax.Array) -> jax.Array:
    """Returns ``x`` unchanged, but stops XLA from contracting it into a following add (FMA).

    The select has a data-dependent predicate, so the simplifier cannot remove it and LLVM cannot fuse
    the multiply producing ``x`` with its consumer.
    """
    return jnp.where(jnp.isnan(x), jnp.asarray(jnp.nan, x.dtype), x)


def scale_logits(logits: jax.Array, temperature: jax.Array | float) -> jax.Array:
    """``logits / temperature`` with an IEEE division, as torch computes it.

    Args:
      logits: float ``[batch, canvas, vocab]`` (any shape).
      temperature: scalar (or broadcastable) temperature.

    XLA turns a division by a broadcast scalar into a multiplication by its reciprocal (up to one ulp
    off). Making the divisor depend on each element (NaN where ``logits`` is NaN, where the quotient is NaN
    anyway) keeps a true division; it fuses into one elementwise pass, so nothing is materialised.
    """
    logits = jnp.asarray(logits)
    temperature = jnp.asarray(temperature, logits.dtype)
    divisor = jnp.where(jnp.isnan(logits), jnp.asarray(jnp.nan, logits.dtype), temperature)
    return logits / divisor


def token_entropy(logits: jax.Array) -> jax.Array:
    """Entropy of ``softmax(logits)`` over the last axis, as ``torch.distributions.Categorical`` does.

    Args:
      logits: float32 ``[batch, canvas, vocab]``.

    Returns:
      float32 ``[batch, canvas]``. Follows torch's recipe (normalise by logsumexp, softmax of the normalised
      logits, clamp log-probs at the float minimum so ``0 * log 0`` is ``0``); agrees with torch to float32
      rounding, not bitwise (reduction order differs).
    """
    logits = jnp.asarray(logits, jnp.float32)
    log_probs = logits - jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    probs = jax.nn.softmax(log_probs, axis=-1)
    log_probs = jnp.maximum(log_probs, jnp.finfo(jnp.float32).min)
    return -jnp.sum(log_probs * probs, axis=-1)


def sampled_token_probs(logits: jax.Array, token_ids: jax.Array) -> jax.Array:
    """``softmax(logits)[..., token_ids]``: float32 ``[batch, canvas]`` for logits ``[batch, canvas, vocab]``.

    The "confidence" of a draw in diffusers' block refinement and in Fast-dLLM.
    """
    log_probs = jax.nn.log_softmax(jnp.asarray(logits, jnp.float32), axis=-1)
    picked = jnp.take_along_axis(log_probs, token_ids[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.exp(picked)


class TokenStatistics(NamedTuple):
    """Per-position statistics of ``softmax(z)`` for processed logits ``z [..., vocab]``, each ``[...]``.

    What the statistics path of the loop hands to ``from_statistics``: enough for the entropy-bound,
    confidence and block-refinement samplers and the stopping rules, and small enough that the
    ``[..., vocab]`` logits never have to exist in float32 (``diffjax.kernels.vocab`` computes it in one
    pass over the vocabulary; :func:`token_statistics` is the plain-JAX twin).
    """

    logsumexp: jax.Array  # float32
    entropy: jax.Array  # float32, nats
    argmax: jax.Array  # int32, first index among ties
    argmax_logprob: jax.Array  # float32, z[argmax] - logsumexp
    sample: jax.Array  # int32, argmax(z + gumbel_noise(seed, row, token))
    sample_logprob: jax.Array  # float32, z[sample] - logsumexp


def _mix32(x: jax.Array) -> jax.Array:
    """MurmurHash3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * jnp.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def gumbel_noise(seed: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
    """Standard Gumbel noise, a pure function of (uint32 seed, row index, token index), broadcasting.

    Counter-based, so a kernel walking the vocabulary in tiles and a plain-JAX twin holding all logits draw
    the same noise. Within a row, distinct token ids get distinct 32-bit words (xor with the row's word and
    the finaliser are bijections); the first round decorrelates rows and seeds. The top 23 bits make a
    uniform in [2**-24, 1 - 2**-24] (so the noise is finite, within about [-2.8, 16.6]). 24 bits would not:
    float32 rounds 2**24 - 0.5 up to 2**24, u to 1 and the noise to +inf for one word in 2**24 (a few
    tokens per row of a 262144-token vocabulary, each then drawn whatever its probability).
    """
    x = _mix32(rows.astype(jnp.uint32) * jnp.uint32(0x9E3779B9) ^ seed)
    x = _mix32(x ^ cols.astype(jnp.uint32))
    u = ((x >> 9).astype(jnp.float32) + 0.5) * (1.0 / (1 << 23))
    return -jnp.log(-jnp.log(u))


def token_statistics(processed_logits: jax.Array, seed: jax.Array | int) -> TokenStatistics:
    """:class:`TokenStatistics` of float ``processed_logits [..., vocab]`` (rows numbered in C order).

    ``seed`` (uint32 scalar) picks the Gumbel noise of the draw; the same seed gives the same draw as
    ``diffjax.kernels.vocab.vocab_stats_pallas`` on the same logits.
    """
    z = jnp.asarray(processed_logits, jnp.float32)
    lse = jax.nn.logsumexp(z, axis=-1)
    rows = jnp.arange(z.size // z.shape[-1], dtype=jnp.uint32).reshape(z.shape[:-1])[..., None]
    cols = jnp.arange(z.shape[-1], dtype=jnp.uint32)
    seed = jnp.asarray(seed).astype(jnp.uint32).reshape(())
    sample = jnp.argmax(z + gumbel_noise(seed, rows, cols), axis=-1).astype(jnp.int32)
    argmax = jnp.argmax(z, axis=-1).astype(jnp.int32)

    log_probs = jax.nn.log_softmax(z, axis=-1)  # as `sampled_token_probs` rounds it

    def logprob(ids: jax.Array) -> jax.Array:
        return jnp.take_along_axis(log_probs, ids[..., None], axis=-1)[..., 0]

    return TokenStatistics(lse, token_entropy(z), argmax, logprob(argmax), sample, logprob(sample))


def exponential_race(probs: jax.Array, exp_noise: jax.Array) -> jax.Array:
    """``argmax(probs / exp_noise)``: a categorical draw given Exp(1) noise of the same shape.

    This is exactly what ``torch.multinomial(probs, 1)`` computes on its one-sample fast path (and what
    vLLM's sampler does), so feeding the same exponential draws reproduces torch's sample.

    Args:
      probs: float32 ``[..., vocab]``.
      exp_noise: float32 ``[..., vocab]``, i.i.d. Exp(1).

    Returns:
      int32 ``[...]``.
    """
    return jnp.argmax(probs / exp_noise, axis=-1).astype(jnp.int32)


def uniform_tokens(key: jax.Array, shape: tuple[int, ...], vocab_size: int) -> jax.Array:
    """Renoise tokens: uniform over `[0, vocab_size)`, int32 of `shape`."""
    return jax.random.randint(key, shape, 0, vocab_size, dtype=jnp.int32)


def draw_and_noise(
    sampling: Any, vocab_size: int | None, processed_logits: jax.Array, canvas_shape: tuple[int, ...],
    key: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """One draw per position and a uniform renoise token per position: (sampled_ids, noise_ids)."""
    sample_key, noise_key = jax.random.split(key)
    sampled = sampling(sample_key, processed_logits)
    return sampled, uniform_tokens(noise_key, canvas_shape, vocab_size_or_logits_width(vocab_size, processed_logits))


def vocab_size_or_logits_width(vocab_size: int | None, logits: jax.Array) -> int:
    """A component's vocabulary: its own `vocab_size` if set, else the logits' last dimension."""
    return int(logits.shape[-1]) if vocab_size is None else int(vocab_size)


def draw_and_noise_from_statistics(
    sampling: Any, vocab_size: int | None, stats: TokenStatistics, canvas_shape: tuple[int, ...],
    key: jax.Array, model_vocab_size: int,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The statistics path's `draw_and_noise`: (sampled_ids, their probabilities, noise_ids).

    The noise comes from the same key split as `draw_and_noise`'s, so both paths renoise identically.
    """
    sampled, log_probs = sampling.from_statistics(stats)
    _, noise_key = jax.random.split(key)
    noise = uniform_tokens(noise_key, canvas_shape, model_vocab_size if vocab_size is None else int(vocab_size))
    return sampled, jnp.exp(log_probs), noise
