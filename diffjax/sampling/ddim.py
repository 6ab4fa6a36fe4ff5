"""Discrete DDIM with a predictor-corrector (diffusers' DiscreteDDIMScheduler)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

from diffjax.sampling.checks import require_finite, require_optional_vocab
from diffjax.sampling.draws import GumbelMaxSampling
from diffjax.sampling.protocols import TokenSampling
from diffjax.sampling.samplers import SamplerState, initial_sampler_state
from diffjax.sampling.statistics import uniform_tokens, vocab_size_or_logits_width
from diffjax.validation import require_int

_CORRECTOR_SELECTIONS = ("lowest_log_margin", "lowest_maxprob", "lowest_current_prob", "random")


def ddim_route_probs(
    same: jax.Array, step_index: jax.Array | int, num_steps: jax.Array | int, vocab_size: int
) -> jax.Array:
    """Posterior route probabilities of one uniform-noise DDIM step from ``t`` to ``s``.

    With ``alpha_t = i / N``, ``alpha_s = (i + 1) / N``, ``a = alpha_t / alpha_s``, ``b = alpha_s`` and ``K``
    the vocabulary size, the unnormalised masses are (all multiplied by ``K``, which cancels):
    clean ``b (1 - a) + a b K [x_t = x0]``, stay ``a (1 - b)``, noise ``(1 - a)(1 - b)``.

    Args:
      same: bool ``[batch, canvas]``, ``x_t == x0``.
      step_index: ``i`` in ``[0, N - 1]`` (clamped there).

    Returns:
      float32 ``[batch, canvas, 3]`` (clean, stay, noise), rows summing to 1.
    """
    total = jnp.asarray(num_steps, jnp.float32)
    i = jnp.clip(jnp.asarray(step_index, jnp.float32), 0.0, total - 1.0)
    alpha_t = i / total
    alpha_s = (i + 1.0) / total
    a = alpha_t / alpha_s
    b = alpha_s
    same = same.astype(jnp.float32)
    clean = b * (1.0 - a) + a * b * float(vocab_size) * same
    stay = jnp.broadcast_to(a * (1.0 - b), same.shape)
    noise = jnp.broadcast_to((1.0 - a) * (1.0 - b), same.shape)
    masses = jnp.stack([clean, stay, noise], axis=-1)
    return masses / jnp.sum(masses, axis=-1, keepdims=True)


def ddim_predictor_update(
    canvas_ids: jax.Array,
    sampled_ids: jax.Array,
    route_uniform: jax.Array,
    noise_ids: jax.Array,
    step_index: jax.Array | int,
    num_steps: jax.Array | int,
    vocab_size: int,
) -> tuple[jax.Array, jax.Array]:
    """Deterministic core of the DDIM predictor step.

    Args:
      canvas_ids: ``x_t``, int32 ``[batch, canvas]``.
      sampled_ids: ``x0`` draws, int32 ``[batch, canvas]``.
      noise_ids: uniform tokens, int32 ``[batch, canvas]``.
      route_uniform: float32 ``[batch, canvas]`` in [0, 1), picks the route by inverse CDF.

    Returns:
      ``(x_s, took_x0)`` with ``took_x0`` the positions that went the clean route. On the last step
      (``i = N - 1``) every position takes ``x0``.
    """
    probs = ddim_route_probs(canvas_ids == sampled_ids, step_index, num_steps, vocab_size)
    clean = route_uniform < probs[..., 0]
    noise = ~clean & (route_uniform >= probs[..., 0] + probs[..., 1])
    out = jnp.where(clean, sampled_ids, canvas_ids)
    return jnp.where(noise, noise_ids, out).astype(jnp.int32), clean


def ddim_corrector_log_probs(logits: jax.Array, canvas_ids: jax.Array, alpha: jax.Array | float,
                             vocab_size: int | None = None) -> jax.Array:
    """One-coordinate conditional ``log Cat(alpha * x0_loo + (1 - alpha) / K)`` of the LOO corrector.

    The leave-one-out denoiser (arXiv 2605.22765, eq. 13) subtracts ``log(1 + K alpha / (1 - alpha))`` from
    the observed token's logit; at ``alpha`` in {0, 1} the logits are used as they are.

    Args:
      logits: float32 ``[batch, canvas, vocab]`` computed on ``canvas_ids``.
      canvas_ids: int32 ``[batch, canvas]``.
      alpha: survival probability at the corrector's time.
      vocab_size: K, the noise's range (ids ``[0, K)``); ``None`` = the logits' width. Ids from K up get no
        uniform mass, only the denoiser's.

    Returns:
      float32 ``[batch, canvas, vocab]`` normalised log-probabilities.
    """
    logits = jnp.asarray(logits, jnp.float32)
    width = logits.shape[-1]
    vocab = vocab_size_or_logits_width(vocab_size, logits)
    alpha = jnp.asarray(alpha, jnp.float32)
    interior = (alpha > 0.0) & (alpha < 1.0)
    safe = jnp.where(interior, alpha, 0.5)
    delta = jnp.where(interior, jnp.log1p(vocab * safe / (1.0 - safe)), 0.0)
    observed = jax.nn.one_hot(canvas_ids, width, dtype=jnp.bool_)
    loo_log_probs = jax.nn.log_softmax(jnp.where(observed, logits - delta, logits), axis=-1)
    log_uniform = jnp.where(jnp.arange(width) < vocab, jnp.log1p(-alpha) - math.log(vocab), -jnp.inf)
    return jnp.logaddexp(jnp.log(alpha) + loo_log_probs, log_uniform)


@struct.dataclass
class DDIMSampler:
    """Discrete DDIM for uniform noise with optional predictor-corrector, after diffusers'
    ``DiscreteDDIMScheduler`` (D3PM posterior; corrector from arXiv 2605.22765).

    Predictor (call ``i`` of the schedule, 0-based): draw ``x0``, then sample each position's route from the
    exact posterior ``q(x_s | x_t, x0)`` (:func:`ddim_route_probs`): take ``x0``, keep ``x_t``, or jump to a
    uniform token. The last predictor step takes ``x0`` everywhere.

    Corrector (``corrector_steps`` sweeps after each predictor step): form the one-coordinate conditional
    at ``alpha_s = (i + 1) / N`` (:func:`ddim_corrector_log_probs`), choose ``corrector_k`` positions by
    Gumbel-top-k on a "least confident" score divided by ``corrector_selection_tau``, and resample them.

    Interleaving: a corrector needs logits computed on the post-predictor canvas, i.e. a fresh forward pass,
    exactly as diffusers' pipeline recomputes them per sweep. So each sampler call does one sub-step and
    the state's step counter says which: call ``c`` is a predictor when ``c % (1 + corrector_steps) == 0``.
    Run the loop for :attr:`num_calls` steps.

    Simplifications vs diffusers: both sub-steps use the loop's processed (temperature-scaled, filtered)
    logits, while diffusers draws ``x0`` at its temperature but runs the corrector on raw logits; the
    corrector runs in float32 (diffusers uses float64); the route and selection draws use JAX's RNG;
    `diffjax.generate` returns the argmax of each canvas's last logits (transformers' rule for every
    sampler), not the final DDIM step's canvas.

    Attributes:
      num_steps: N predictor steps (a leaf).
      corrector_steps: static, sweeps per predictor step (0 = plain ancestral DDIM).
      corrector_k: static, positions resampled per sweep.
      corrector_selection: static, one of ``lowest_log_margin`` (default), ``lowest_maxprob``,
        ``lowest_current_prob``, ``random``.
      corrector_selection_tau: > 0, temperature of the Gumbel-top-k selection.
      vocab_size: renoise range, ``None`` = logits' last dimension.
      sampling: token draw (``x0`` and corrector resamples).
    """

    num_steps: int = 48
    corrector_steps: int = struct.field(pytree_node=False, default=0)
    corrector_k: int = struct.field(pytree_node=False, default=1)
    corrector_selection: str = struct.field(pytree_node=False, default="lowest_log_margin")
    corrector_selection_tau: float = 1.0
    vocab_size: int | None = struct.field(pytree_node=False, default=None)
    sampling: TokenSampling = struct.field(default_factory=GumbelMaxSampling)

    def __post_init__(self) -> None:
        require_finite("num_steps", self.num_steps, lambda v: v >= 1 and float(v).is_integer(), "an integer >= 1")
        require_int("corrector_steps", self.corrector_steps, 0)
        require_int("corrector_k", self.corrector_k, 1)
        if self.corrector_selection not in _CORRECTOR_SELECTIONS:
            raise ValueError(
                f"`corrector_selection` must be one of {_CORRECTOR_SELECTIONS} "
                f"(got {self.corrector_selection!r})"
            )
        require_finite("corrector_selection_tau", self.corrector_selection_tau, lambda v: v > 0.0, "> 0")
        require_optional_vocab(self.vocab_size)

    @property
    def num_calls(self) -> int:
        """Loop steps needed for the full schedule: ``num_steps * (1 + corrector_steps)``."""
        return int(self.num_steps) * (1 + self.corrector_steps)

    def init(self, canvas_ids: jax.Array) -> SamplerState:
        return initial_sampler_state(canvas_ids)

    def _predict(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, index: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        sample_key, route_key, noise_key = jax.random.split(key, 3)
        sampled = self.sampling(sample_key, processed_logits)
        route_uniform = jax.random.uniform(route_key, canvas_ids.shape, jnp.float32)
        vocab = vocab_size_or_logits_width(self.vocab_size, processed_logits)
        noise = uniform_tokens(noise_key, canvas_ids.shape, vocab)
        return ddim_predictor_update(canvas_ids, sampled, route_uniform, noise, index, self.num_steps, vocab)

    def _correct(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, index: jax.Array, key: jax.Array
    ) -> tuple[jax.Array, jax.Array]:
        select_key, sample_key = jax.random.split(key)
        total = jnp.asarray(self.num_steps, jnp.float32)
        alpha = jnp.minimum(jnp.asarray(index, jnp.float32) + 1.0, total) / total
        cond = ddim_corrector_log_probs(processed_logits, canvas_ids, alpha, self.vocab_size)
        batch, length = canvas_ids.shape
        k = min(self.corrector_k, length)
        if self.corrector_selection == "random":
            keys = jax.random.uniform(select_key, (batch, length), jnp.float32)
        else:
            current = jnp.take_along_axis(cond, canvas_ids[..., None], axis=-1)[..., 0]
            if self.corrector_selection == "lowest_maxprob":
                score = -jnp.max(cond, axis=-1)
            elif self.corrector_selection == "lowest_current_prob":
                score = -current
            else:  # lowest_log_margin: small margin of the current token over its best rival
                observed = jax.nn.one_hot(canvas_ids, cond.shape[-1], dtype=jnp.bool_)
                rival = jnp.max(jnp.where(observed, -jnp.inf, cond), axis=-1)
                score = rival - current
            gumbel = jax.random.gumbel(select_key, (batch, length), jnp.float32)
            keys = score / jnp.asarray(self.corrector_selection_tau, jnp.float32) + gumbel
        positions = jax.lax.top_k(keys, k)[1]  # [batch, k]
        chosen = jnp.take_along_axis(cond, positions[..., None], axis=1)  # [batch, k, vocab]
        resampled = self.sampling(sample_key, chosen)
        rows = jnp.arange(batch)[:, None]
        new_canvas = canvas_ids.at[rows, positions].set(resampled)
        changed = jnp.zeros(canvas_ids.shape, jnp.bool_).at[rows, positions].set(True)
        return new_canvas.astype(jnp.int32), changed

    def __call__(
        self, processed_logits: jax.Array, canvas_ids: jax.Array, state: SamplerState, key: jax.Array
    ) -> tuple[jax.Array, jax.Array, SamplerState]:
        period = 1 + self.corrector_steps
        index = state.step // period
        if self.corrector_steps == 0:
            new_canvas, changed = self._predict(processed_logits, canvas_ids, index, key)
        else:
            new_canvas, changed = jax.lax.cond(
                state.step % period == 0,
                lambda: self._predict(processed_logits, canvas_ids, index, key),
                lambda: self._correct(processed_logits, canvas_ids, index, key),
            )
        return new_canvas, changed, SamplerState(step=state.step + 1, committed=changed)
