"""Adaptive stopping rules: when a row's canvas is done."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from diffjax.sampling.checks import require_finite
from diffjax.sampling.statistics import TokenStatistics, token_entropy
from diffjax.validation import require_int


@struct.dataclass
class StopState:
    """State of :class:`StableAndConfidentStopping`.

    Attributes:
      history: int32 ``[stability_threshold, batch, canvas]``, the last argmax canvases, oldest first;
        starts at -1 so no row is stable before it has been seen ``stability_threshold`` times.
    """

    history: jax.Array


@struct.dataclass
class StableAndConfidentStopping:
    """transformers' ``StableAndConfidentStoppingCriteria``.

    A row stops when it is *stable* -- its argmax canvas equals each of the previous
    ``stability_threshold`` argmax canvases (always true for 0) -- and *confident* -- the mean over the
    canvas of the per-position entropy of the processed logits is ``< confidence_threshold``. The
    comparison uses the history before this step's argmax is pushed (oldest dropped).

    Attributes:
      stability_threshold: static int >= 0 (it is the history's length).
      confidence_threshold: > 0 (a leaf).
    """

    stability_threshold: int = struct.field(pytree_node=False, default=1)
    confidence_threshold: float = 0.005

    def __post_init__(self) -> None:
        require_int("stability_threshold", self.stability_threshold, 0)
        require_finite("confidence_threshold", self.confidence_threshold, lambda v: v > 0.0, "> 0")

    def init(self, canvas_ids: jax.Array) -> StopState:
        shape = (self.stability_threshold, *canvas_ids.shape)
        return StopState(history=jnp.full(shape, -1, jnp.int32))

    def __call__(
        self, argmax_ids: jax.Array, processed_logits: jax.Array, state: StopState
    ) -> tuple[jax.Array, StopState]:
        return self._decide(argmax_ids, token_entropy(processed_logits), state)

    def from_statistics(
        self, argmax_ids: jax.Array, stats: TokenStatistics, state: StopState
    ) -> tuple[jax.Array, StopState]:
        return self._decide(argmax_ids, stats.entropy, state)

    def _decide(self, argmax_ids: jax.Array, entropy: jax.Array, state: StopState) -> tuple[jax.Array, StopState]:
        argmax_ids = argmax_ids.astype(jnp.int32)
        # all() over an empty history is True: stability_threshold = 0 means "always stable".
        stable = jnp.all(state.history == argmax_ids[None], axis=(0, 2))
        if self.stability_threshold == 0:
            history = state.history
        else:  # drop the oldest, append the newest (torch.roll(-1) then write the last slot)
            history = jnp.concatenate([state.history[1:], argmax_ids[None]], axis=0)
        mean_entropy = jnp.mean(entropy, axis=-1)
        confident = mean_entropy < jnp.asarray(self.confidence_threshold, jnp.float32)
        return stable & confident, StopState(history=history)


@struct.dataclass
class NeverStop:
    """Runs every denoising step (Google's ``NoEarlyStop``)."""

    def init(self, canvas_ids: jax.Array) -> tuple[()]:
        del canvas_ids
        return ()

    def __call__(
        self, argmax_ids: jax.Array, processed_logits: jax.Array, state: tuple[()]
    ) -> tuple[jax.Array, tuple[()]]:
        del processed_logits
        return jnp.zeros(argmax_ids.shape[:1], jnp.bool_), state

    def from_statistics(
        self, argmax_ids: jax.Array, stats: TokenStatistics, state: tuple[()]
    ) -> tuple[jax.Array, tuple[()]]:
        del stats
        return jnp.zeros(argmax_ids.shape[:1], jnp.bool_), state
