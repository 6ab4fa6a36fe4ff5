"""Temperature schedules: (remaining steps n, total N) -> temperature."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from diffjax.sampling.checks import is_concrete, require_finite
from diffjax.sampling.statistics import without_fma_contraction


@struct.dataclass
class LinearTemperature:
    """``T(n) = t_min + (t_max - t_min) * n / N`` with ``n`` the remaining steps (N..1).

    transformers' ``LinearTemperatureScheduleLogitsProcessor``. Bitwise equal to what its ``generate``
    computes: there ``cur_step`` is an int32 tensor, so ``n / N`` is a float32 division, ``t_max - t_min``
    is a Python (float64) difference rounded to float32, then one float32 multiply and one float32 add.
    ``_span`` holds that float64 difference, computed at construction (leave it unset). Calling the torch
    processor with a Python ``int`` step instead evaluates everything in float64 and rounds once; that
    differs from ``generate`` by up to one ulp.

    Attributes:
      t_min: final temperature (n -> 0); >= 0 as in transformers (T(n) > t_min for every n >= 1).
      t_max: initial temperature (n = N); must exceed ``t_min``.
    """

    t_min: float = 0.4
    t_max: float = 0.8
    _span: float | None = None

    def __post_init__(self) -> None:
        require_finite("t_min", self.t_min, lambda v: v >= 0.0, ">= 0")
        require_finite("t_max", self.t_max, lambda v: v > 0.0, "> 0")
        if is_concrete(self.t_min) and is_concrete(self.t_max):
            if not float(self.t_max) > float(self.t_min):
                raise ValueError(
                    f"`t_max` must be > `t_min` (got t_max={self.t_max!r}, t_min={self.t_min!r})"
                )
            # Recomputed whenever the ends are concrete, so `replace(t_max=...)` cannot leave it stale.
            object.__setattr__(self, "_span", float(self.t_max) - float(self.t_min))
        elif self._span is None:
            object.__setattr__(self, "_span", self.t_max - self.t_min)

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array:
        n = jnp.asarray(remaining_steps).astype(jnp.float32)
        total = jnp.asarray(num_steps).astype(jnp.float32)
        span = jnp.asarray(self._span, jnp.float32)
        return jnp.asarray(self.t_min, jnp.float32) + without_fma_contraction(span * (n / total))


@struct.dataclass
class NoiseProportionTemperature:
    """Google's JAX sampler annealing (``AnnealingTemperatureShaper`` in google-deepmind/gemma).

    ``T = t_min + (1 - (1 - p) ** exponent) * (t_max - t_min)`` with the noise proportion ``p = n / N``
    of the current step (Google counts steps up, ``p = 1 - step / N``; with ``n = N - step`` remaining
    steps it is the same value). With ``exponent = 1`` this is :class:`LinearTemperature` up to float32
    rounding of the intermediate terms.

    Attributes:
      t_min: temperature as p -> 0 (> 0).
      t_max: temperature at p = 1 (>= t_min).
      exponent: curve shape (> 0); > 1 keeps the temperature high for longer.
    """

    t_min: float = 0.4
    t_max: float = 0.8
    exponent: float = 1.0

    def __post_init__(self) -> None:
        require_finite("t_min", self.t_min, lambda v: v > 0.0, "> 0")
        require_finite("t_max", self.t_max, lambda v: v > 0.0, "> 0")
        require_finite("exponent", self.exponent, lambda v: v > 0.0, "> 0")
        if is_concrete(self.t_min) and is_concrete(self.t_max) and float(self.t_max) < float(self.t_min):
            raise ValueError(f"`t_max` must be >= `t_min` (got t_max={self.t_max!r}, t_min={self.t_min!r})")

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array:
        p = jnp.asarray(remaining_steps).astype(jnp.float32) / jnp.asarray(num_steps).astype(jnp.float32)
        fraction = 1.0 - (1.0 - p) ** jnp.asarray(self.exponent, jnp.float32)
        t_min = jnp.asarray(self.t_min, jnp.float32)
        return fraction * (jnp.asarray(self.t_max, jnp.float32) - t_min) + t_min


@struct.dataclass
class ConstantTemperature:
    """A fixed temperature (``1.0`` leaves the logits as they are)."""

    temperature: float = 1.0

    def __post_init__(self) -> None:
        require_finite("temperature", self.temperature, lambda v: v > 0.0, "> 0")

    def __call__(self, remaining_steps: jax.Array | int, num_steps: jax.Array | int) -> jax.Array:
        del remaining_steps, num_steps
        return jnp.asarray(self.temperature, jnp.float32)
