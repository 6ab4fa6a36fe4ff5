"""Logits filters applied after the temperature: identity, top-k, top-p, chains of them."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import struct

from diffjax.sampling.checks import require_finite
from diffjax.sampling.statistics import MASK_VALUE
from diffjax.validation import require_int


@struct.dataclass
class IdentityFilter:
    """No filtering."""

    def __call__(self, logits: jax.Array) -> jax.Array:
        return logits


@struct.dataclass
class TopKFilter:
    """Keeps the ``k`` largest logits per position; the rest become :data:`MASK_VALUE`.

    Like transformers' ``TopKLogitsWarper`` the cut is by value: every logit equal to the k-th largest is
    kept, so exact ties can keep more than ``k``. ``k`` is static (it is the shape of ``lax.top_k``);
    ``k >= vocab`` keeps everything.
    """

    k: int = struct.field(pytree_node=False, default=50)

    def __post_init__(self) -> None:
        require_int("k", self.k, 1)

    def __call__(self, logits: jax.Array) -> jax.Array:
        if self.k >= logits.shape[-1]:
            return logits
        kth = jax.lax.top_k(logits, self.k)[0][..., -1:]
        return jnp.where(logits >= kth, logits, jnp.asarray(MASK_VALUE, logits.dtype))


@struct.dataclass
class TopPFilter:
    """Nucleus filter: keeps the smallest set of largest-probability tokens whose mass reaches ``p``.

    Tokens sorted by probability (descending) are kept while the mass *before* them is below ``p``; the
    most likely token is always kept, and ties at the cut are kept (the cut is a logit value). The rest
    become :data:`MASK_VALUE`. ``p`` is a leaf: changing it does not recompile. ``p = 1`` keeps all.
    """

    p: float = 0.95

    def __post_init__(self) -> None:
        require_finite("p", self.p, lambda v: 0.0 < v <= 1.0, "in (0, 1]")

    def __call__(self, logits: jax.Array) -> jax.Array:
        sorted_logits = -jnp.sort(-logits, axis=-1)  # descending
        sorted_probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
        mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
        top_p = jnp.asarray(self.p, jnp.float32)
        # p = 1 must keep everything, but a float32 running sum reaches 1.0 before the tail does.
        keep = (mass_before < top_p) | (top_p >= 1.0)
        keep = keep.at[..., 0].set(True)
        # The kept entries form a prefix of the sorted order; the last kept logit is the cut.
        cut = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        return jnp.where(logits >= cut, logits, jnp.asarray(MASK_VALUE, logits.dtype))


@struct.dataclass
class FilterChain:
    """Applies ``filters`` left to right (e.g. top-k then top-p)."""

    filters: tuple[Any, ...] = ()

    def __call__(self, logits: jax.Array) -> jax.Array:
        for f in self.filters:
            logits = f(logits)
        return logits
