"""How one token per position is drawn (:class:`TokenSampling`): Gumbel-max, exponential race, greedy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from diffjax.sampling.statistics import TokenStatistics, exponential_race


@struct.dataclass
class GumbelMaxSampling:
    """Categorical draw by Gumbel-max, ``argmax(logits + Gumbel)`` (``jax.random.categorical``).

    The default draw; Google's JAX DiffusionGemma sampler uses ``jax.random.categorical`` too.
    """

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        logits = jnp.asarray(logits, jnp.float32)
        perturbed = logits + jax.random.gumbel(key, logits.shape, jnp.float32)
        # The same draw as `jax.random.categorical` (argmax of the same perturbed logits, first index on
        # ties), written as max then min-index: XLA CPU runs argmax's (value, index) reduction ~3x slower.
        top = jnp.max(perturbed, axis=-1, keepdims=True)
        index = jax.lax.broadcasted_iota(jnp.int32, perturbed.shape, perturbed.ndim - 1)
        return jnp.min(jnp.where(perturbed == top, index, perturbed.shape[-1]), axis=-1)

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]:
        return stats.sample, stats.sample_logprob


@struct.dataclass
class ExponentialRaceSampling:
    """Categorical draw as ``argmax(softmax(logits) / Exp(1))``.

    The exponential form of Gumbel-max used by ``torch.multinomial`` (one sample) -- hence by transformers'
    DiffusionGemma loop -- and by vLLM's sampler. Same distribution as :class:`GumbelMaxSampling`.
    """

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        probs = jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1)
        # A float32 Exp(1) draw is exactly 0 with probability 2^-23 (tens of times per full-size step); 0/0
        # would be NaN, which argmax picks. Flooring at `tiny` keeps zero-probability tokens at exactly 0.
        noise = jnp.maximum(
            jax.random.exponential(key, probs.shape, jnp.float32), jnp.finfo(jnp.float32).tiny
        )
        return exponential_race(probs, noise)

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]:
        # Same distribution as the Gumbel-max draw the statistics carry (not the same random stream).
        return stats.sample, stats.sample_logprob


@struct.dataclass
class GreedySampling:
    """``argmax(logits)``: temperature-zero decoding (Fast-dLLM's and diffusers' default)."""

    def __call__(self, key: jax.Array, logits: jax.Array) -> jax.Array:
        del key
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def from_statistics(self, stats: TokenStatistics) -> tuple[jax.Array, jax.Array]:
        return stats.argmax, stats.argmax_logprob
